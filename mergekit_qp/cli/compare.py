"""`mergekit-qp compare`: merge one set of experts with several methods through the stock
`mergekit-yaml`, and put them side by side on one scale (design §4).

From an output_qp config (base_model, models with `calibration:`) it derives one config per
method, runs `mergekit-yaml CONFIG OUT` in its own process for each (wall time and peak RSS of
that process tree, by the shared runner of runner.py), measures ρ overall, per task and per
layer of every merged model on the config's calibration statistics (computed once, cached),
optionally the held-out loss per task of every model, and the spectrum (ρ against rank) of
the experts. Writes compare.json / compare.md / compare.png (compare_report.py) and
spectrum.json / .md / .png.

The command line lives in cli/__init__.py; this module holds the logic. mergekit itself is
reached through mergekit_qp.plugin only.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .compare_report import plot_compare, render_markdown
from .method_defaults import per_expert_defaults
from .runner import MergeFailed, heldout_loss, load_causal_lm, run_merge, write_config

DEFAULT_METHODS = ("output_qp", "ties", "dare_ties", "task_arithmetic")
RESULT_FILES = ("compare.json", "compare.md", "compare.png", "spectrum.json", "spectrum.md", "spectrum.png")
# Built-in methods get the per-expert defaults of method_defaults.py; any other method gets
# weight 1.0 where it requires a weight.
OUTPUT_QP = "output_qp"
__all__ = ["CompareError", "MethodPlan", "compare", "parse_eval", "plan_methods", "run_plan"]


class CompareError(ValueError):
    """A user-facing problem with the compare command's inputs, or a merge that failed."""


# -- methods and their configs -----------------------------------------------------------------
@dataclass
class MethodPlan:
    name: str  # the method name, also the row label and the file stem
    config: Dict[str, Any]  # the derived mergekit config
    per_model: Dict[str, Any] = field(default_factory=dict)  # parameters given to every expert
    shared: Dict[str, Any] = field(default_factory=dict)  # top-level parameters (overrides only for built-ins)


def parse_overrides(items: Sequence[str], methods: Sequence[str],
                    command: str = "compare") -> Dict[str, Dict[str, Any]]:
    """`METHOD:NAME=VALUE` items as {method: {name: value}}; VALUE is read as YAML (0.3, true, rank-4)."""
    overrides: Dict[str, Dict[str, Any]] = {}
    for item in items:
        method, colon, rest = item.partition(":")
        name, equals, value = rest.partition("=")
        if not (colon and equals and method.strip() and name.strip()):
            raise CompareError(f"{command}: --param {item!r} is not METHOD:NAME=VALUE (e.g. ties:density=0.3)")
        method, name = method.strip(), name.strip()
        if method not in methods:
            raise CompareError(f"{command}: --param {item!r} names method {method!r}, which is not in --methods "
                               f"({', '.join(methods)})")
        overrides.setdefault(method, {})[name] = yaml.safe_load(value) if value.strip() else None
    return overrides


def _parameter_specs(method: str, command: str) -> list:
    from ..plugin import UnknownMergeMethod, method_parameter_specs

    try:
        return method_parameter_specs(method)
    except UnknownMergeMethod as error:
        close = difflib.get_close_matches(method, error.known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CompareError(f"{command}: unknown merge method {method!r}.{hint} "
                           f"Known methods: {', '.join(error.known)}") from None


def _check_parameters(method: str, specs: list, given: Dict[str, Any], command: str) -> None:
    names = [p.name for p in specs]
    for name, value in given.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CompareError(f"{command}: {method} has no parameter {name!r}.{hint} "
                               f"Parameters of {method}: {', '.join(names) or 'none'}")
        spec_of = next(p for p in specs if p.name == name)
        try:
            spec_of.validate(value)
        except Exception as error:
            raise CompareError(f"{command}: bad value {value!r} for {method}:{name}: {error}") from None


def read_config(path: str, command: str = "compare") -> Dict[str, Any]:
    """The YAML of CONFIG, checked for what `command` needs: base_model, models, and calibration
    data (or a statistics artifact) for every expert."""
    try:
        with open(path, encoding="utf-8") as fp:
            raw = yaml.safe_load(fp)
    except (OSError, yaml.YAMLError) as error:
        raise CompareError(f"{command}: cannot read {path}: {error}") from None
    if not isinstance(raw, dict) or not raw.get("base_model") or not raw.get("models"):
        raise CompareError(f"{command}: {path} needs `base_model:` and `models:` (slices and modules are not supported)")
    if raw.get("slices") or raw.get("modules"):
        raise CompareError(f"{command}: {path} uses slices/modules; {command} needs a plain `models:` list")
    default = (raw.get("parameters") or {}).get("calibration")
    for entry in raw["models"]:
        if str(entry.get("model")) == str(raw["base_model"]):
            continue
        own = entry.get("parameters") or {}
        if not isinstance(own.get("calibration", default), str) and not isinstance(own.get("statistics"), str):
            raise CompareError(f"{command}: expert {entry.get('model')} in {path} has no `calibration:` (or "
                               f"`statistics:`) parameter; {command} needs an output_qp config whose experts carry "
                               "their calibration data")
    return raw


def plan_methods(raw: Dict[str, Any], methods: Sequence[str], overrides: Dict[str, Dict[str, Any]],
                 command: str = "compare") -> List[MethodPlan]:
    """One derived config per method: same base, models, dtype and tokenizer settings; the
    method's parameters are the defaults above plus the overrides, checked before anything runs."""
    from ..plugin import check_config, load_merge_config, method_ignores_base_model

    if len(set(methods)) != len(methods):
        raise CompareError(f"{command}: --methods lists a method twice: {', '.join(methods)}")
    base = str(raw["base_model"])
    experts = [m for m in raw["models"] if str(m.get("model")) != base]
    kept = {k: v for k, v in raw.items() if k not in ("merge_method", "parameters", "models", "base_model")}
    plans = []
    for method in methods:
        specs = _parameter_specs(method, command)
        given = overrides.get(method, {})
        _check_parameters(method, specs, given, command)
        scope = {p.name: p.scope.value for p in specs}
        per_model = {k: v for k, v in given.items() if scope[k] != "shared"}
        shared = {k: v for k, v in given.items() if scope[k] == "shared"}
        if method == OUTPUT_QP:
            # The config's own output_qp settings (when it is one), the overrides on top.
            own = (raw.get("parameters") or {}) if raw.get("merge_method") == OUTPUT_QP else {}
            shared = {**own, **shared}
            models = [{**m, "parameters": {**(m.get("parameters") or {}), **per_model}}
                      if str(m.get("model")) != base else dict(m) for m in raw["models"]]
        else:
            per_model = {**per_expert_defaults(method, len(experts), specs), **per_model}
            missing = [p.name for p in specs if p.required and p.name not in per_model and p.name not in shared]
            if missing:
                raise CompareError(f"{command}: {method} needs parameter {missing[0]!r}: give it with "
                                   f"--param {method}:{missing[0]}=VALUE")
            # Our calibration parameters mean nothing to a built-in method: each expert gets the
            # method's own parameters only.
            models = [{**{k: v for k, v in m.items() if k != "parameters"}, "parameters": dict(per_model)}
                      for m in experts]
        config: Dict[str, Any] = {"merge_method": method}
        if method_ignores_base_model(method):
            # e.g. linear: the base would be averaged in as one more model.
            models = [m for m in models if str(m.get("model")) != base]
        else:
            config["base_model"] = raw["base_model"]
        config["models"] = models
        if shared:
            config["parameters"] = shared
        config.update(kept)
        try:
            check_config(load_merge_config(config))
        except Exception as error:
            raise CompareError(f"{command}: the {method} config is invalid: {error}") from None
        plans.append(MethodPlan(method, config, per_model, shared))
    return plans


# -- held-out data ------------------------------------------------------------------------------
def parse_eval(items: Sequence[str], experts: Sequence[str], names: Sequence[str]) -> Dict[str, str]:
    """--eval values as {task name: file}: one FILE per expert in config order, or EXPERT=FILE
    pairs (EXPERT: the model as written in the config, or its task name)."""
    if not items:
        return {}
    def task_of(item):  # an EXPERT=FILE pair only when EXPERT names an expert (a path may hold '=')
        who = item.partition("=")[0]
        return next((n for e, n in zip(experts, names) if who in (e, n)), None) if "=" in item else None

    tasks = [task_of(item) for item in items]
    result: Dict[str, str] = {}
    if any(tasks) and not all(tasks):
        odd = next(item for item, task in zip(items, tasks) if task is None)
        raise CompareError(f"compare: --eval {odd!r} is not EXPERT=FILE with EXPERT one of the experts "
                           f"({', '.join(names)}), while other --eval values are: use one form for all")
    if all(tasks):
        for item, task in zip(items, tasks):
            result[task] = item.partition("=")[2]
    else:
        if len(items) != len(experts):
            raise CompareError(f"compare: --eval got {len(items)} files for {len(experts)} experts: give one per "
                               f"expert in config order ({', '.join(names)}) or EXPERT=FILE pairs")
        result = dict(zip(names, items))
    missing = [n for n in names if n not in result]
    if missing:
        raise CompareError(f"compare: --eval has no file for {', '.join(missing)}")
    for name, path in result.items():
        if not os.path.exists(path):
            raise CompareError(f"compare: --eval file for {name} does not exist: {path}")
    return result


def check_causal_lm(model_dir: str) -> None:
    """Held-out loss is next-token loss: the model must be a causal LM (by its architectures)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architectures = list(config.architectures or [])
    if not set(architectures) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise CompareError(f"compare --eval: {model_dir} is not a causal LM (architectures: "
                           f"{', '.join(architectures) or 'none'}); held-out loss needs next-token prediction")


def heldout_sequences(path: str, tokenizer, samples: int, seq_len: int, field_name: Optional[str]):
    """The held-out file read like calibration data: each record tokenised with the base
    tokenizer (its special tokens included), cut into windows of ≤ seq_len tokens; at most
    `samples` windows (a seeded choice, as for calibration)."""
    from ..calibration.data import CalibrationSource, load_records, tokenize_calibration

    source = CalibrationSource(path=path, field=field_name)
    return tokenize_calibration(load_records(source), tokenizer, samples=samples, seq_len=seq_len, seed=0,
                                source_name=path)


# -- merging ------------------------------------------------------------------------------------
def run_plan(plan: MethodPlan, out_dir: Path, device: str) -> Dict[str, Any]:
    """`mergekit-yaml CONFIG OUT` in its own process (runner.py): returns wall s, CPU s and peak
    RSS MB. A failure raises CompareError naming the method, with the tail of its log."""
    config_path = write_config(out_dir / "configs" / f"{plan.name}.yml", plan.config)
    model_dir = out_dir / "models" / plan.name
    log_path = out_dir / "logs" / f"{plan.name}.log"
    try:
        run = run_merge(config_path, model_dir, options=["--random-seed", "0", "--device", device], log=log_path)
    except MergeFailed as error:
        tail = "\n".join(error.run.output_tail.splitlines()[-25:])
        raise CompareError(f"compare: the {plan.name} merge failed (mergekit-yaml exit {error.run.returncode}); "
                           f"config {config_path}, last lines of {log_path}:\n{tail}") from None
    return {**run.cost(), "config_file": str(config_path), "log": str(log_path), "model_dir": str(model_dir)}


# -- the comparison -----------------------------------------------------------------------------
def task_names(experts: Sequence[str]) -> List[str]:
    """Short task names: the experts' folder names where those are unique, else the full names."""
    short = [os.path.basename(str(e).rstrip("/")) or str(e) for e in experts]
    return short if len(set(short)) == len(short) else [str(e) for e in experts]


def _rho_row(report: Dict[str, Any], names: Sequence[str], experts: Sequence[str]) -> Dict[str, Any]:
    return {
        "rho": report["rho"],
        "rho_by_task": {n: report["rho_by_task"][e] for n, e in zip(names, experts)},
        "layers": [{"layer": layer["layer"], "rho": layer["rho"],
                    "rho_by_task": {n: layer["rho_by_task"][e] for n, e in zip(names, experts)}}
                   for layer in report["layers"]],
    }


def _short_task_names(spectrum: Dict[str, Any], names: Sequence[str], experts: Sequence[str]) -> Dict[str, Any]:
    """The spectrum with the table's task names in place of the experts' full references."""
    rename = dict(zip(experts, names))
    return {**spectrum, "tasks": list(names),
            "rho_by_task": {rename[e]: v for e, v in spectrum["rho_by_task"].items()},
            "layers": [{**layer, "rho_by_task": {rename[e]: v for e, v in layer["rho_by_task"].items()}}
                       for layer in spectrum["layers"]]}


def compare(config_path: str, methods: Sequence[str], params: Sequence[str] = (), eval_items: Sequence[str] = (),
            out_dir: str = "compare-out", device: str = "cpu", keep_models: bool = False,
            eval_samples: int = 256, eval_seq_len: Optional[int] = None, with_spectrum: bool = True) -> Dict[str, Any]:
    """Run the comparison and write its files; returns the compare.json payload. `with_spectrum`:
    also the rank spectrum (one SVD per linear map: on a large model it can outlast the merges)."""
    from tqdm.auto import tqdm

    from .. import plugin

    # Everything that can be checked is checked before any merge or forward pass.
    if not methods:
        raise CompareError("compare: --methods is empty")
    raw = read_config(config_path)
    plans = plan_methods(raw, list(methods), parse_overrides(params, list(methods)))
    from ..calibration.models import load_tokenizer, local_model_path

    parsed = plugin.load_merge_config(raw)
    base_dir = local_model_path(parsed.base_model)
    expert_refs = [str(m.model) for m in parsed.models if m.model != parsed.base_model]
    names = task_names(expert_refs)
    eval_files = parse_eval(list(eval_items), expert_refs, names)
    if eval_files:
        check_causal_lm(base_dir)
    if eval_samples < 1 or (eval_seq_len is not None and eval_seq_len < 2):
        raise CompareError("compare: --eval-samples must be ≥ 1 and --eval-seq-len ≥ 2")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:  # nothing from an earlier run may pass for this run's results
        (out / name).unlink(missing_ok=True)

    import transformers

    # One progress line per merge is the command's output; per-model loading bars would bury it.
    transformers.utils.logging.disable_progress_bar()
    # Calibration statistics once (cached on disk: the output_qp merge below reuses them).
    problem = plugin.calibration_problem(config_path, None, device)
    qp_plan = next((p for p in plans if p.name == OUTPUT_QP), None)
    ridge = float((qp_plan.shared if qp_plan else {}).get("ridge", problem.settings["ridge"]))
    spectrum = _short_task_names(plugin.spectrum(problem, ridge), names, problem.names) if with_spectrum else None
    from ..reports.spectrum_report import write_spectrum

    sequences, pad_id = {}, 0
    if eval_files:
        tokenizer = load_tokenizer(base_dir)
        if tokenizer is None:
            raise CompareError(f"compare --eval: the base model {base_dir} has no tokenizer to read the held-out text")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        seq_len = eval_seq_len or int(problem.settings["calibration_seq_len"])
        from transformers import AutoConfig

        context = getattr(AutoConfig.from_pretrained(base_dir, local_files_only=True), "max_position_embeddings", None)
        seq_len = min(seq_len, context) if context else seq_len
        sequences = {n: heldout_sequences(eval_files[n], tokenizer, eval_samples, seq_len,
                                          problem.settings.get("calibration_field")) for n in names}
        for n in names:
            if not any(len(s) >= 2 for s in sequences[n]):
                raise CompareError(f"compare --eval: the held-out data of {n} has no sequence of two or more tokens")

    def losses(model_dir: str) -> Dict[str, float]:
        """Held-out loss per task: every token weighs the same, logits in float64."""
        from ..calibration.data import batches

        model = load_causal_lm(model_dir, device)
        return {n: heldout_loss(model, batches(sequences[n], max_tokens=4096, pad_id=pad_id), device=device)
                for n in names}

    def measure(model_dir: str) -> Dict[str, Any]:
        row = _rho_row(plugin.diagnose(config_path, model_dir, problem=problem), names, problem.names)
        row["loss_by_task"] = losses(model_dir) if eval_files else None
        return row

    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=len(plans), desc="compare", unit="merge", file=sys.stderr)
    try:
        for plan in plans:
            bar.set_description(f"merging {plan.name}")
            cost = run_plan(plan, out, device)
            bar.set_description(f"measuring {plan.name}")
            row = {"name": plan.name, "kind": "merge", "merge_method": plan.name,
                   "per_model_parameters": plan.per_model, "parameters": plan.shared, **measure(cost["model_dir"]),
                   "wall_s": cost["wall_s"], "cpu_s": cost["cpu_s"], "peak_rss_mb": cost["peak_rss_mb"],
                   "config_file": cost["config_file"], "log": cost["log"],
                   "model_dir": cost["model_dir"] if keep_models else None}
            if not keep_models:
                shutil.rmtree(cost["model_dir"], ignore_errors=True)
            rows.append(row)
            bar.update()
            bar.write(f"{plan.name}: merged in {cost['wall_s']:.1f} s, peak RSS {cost['peak_rss_mb']:.0f} MB, "
                      f"ρ = {row['rho']:.4f}", file=sys.stderr)  # stdout is for the table
    finally:
        bar.close()
    references = [{"name": "base", "kind": "reference", "model_dir": base_dir, **measure(base_dir)}]
    for name, expert_dir in zip(names, problem.expert_dirs):
        references.append({"name": f"expert:{name}", "kind": "reference", "model_dir": expert_dir,
                           **measure(expert_dir)})

    merged = {r["name"]: r for r in rows}
    baseline = "ties" if "ties" in merged else next((r["name"] for r in rows if r["name"] != OUTPUT_QP), rows[0]["name"])
    for r in rows:
        r["wall_vs_baseline"] = r["wall_s"] / merged[baseline]["wall_s"] if merged[baseline]["wall_s"] > 0 else None
    result = {
        "config": os.path.abspath(config_path),
        "methods": [p.name for p in plans],
        "tasks": names,
        "experts": dict(zip(names, expert_refs)),
        "eval": eval_files or None,
        "baseline": baseline,
        "device": device,
        "calibration": {k: v for k, v in problem.settings.items() if k != "merge_method"},
        "rows": [*rows, *references],
        "spectrum": spectrum,
    }
    if spectrum is not None:
        write_spectrum(str(out), spectrum)
    plot_compare(result, str(out / "compare.png"))
    (out / "compare.md").write_text(render_markdown(result), encoding="utf-8")
    # compare.json last, and atomically: its presence means a complete run.
    tmp = out / "compare.json.part"
    tmp.write_text(json.dumps(_finite(result), indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(out / "compare.json")
    return result


def _finite(value):
    """JSON has no NaN/Inf: none should arise, but a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
