"""`mergekit-qp compare`: merge one set of experts with several methods through the stock
`mergekit-yaml`, and put them side by side on one scale (design §4).

From an output_qp config (base_model, models with `calibration:`) it derives one config per
method, runs `mergekit-yaml CONFIG OUT` in its own process for each (wall time and peak RSS
of that process, read with os.wait4 by a thin launcher), measures ρ overall, per task and per
layer of every merged model on the config's calibration statistics (computed once, cached),
optionally the held-out loss per task of every model, and the spectrum (ρ against rank) of
the experts. Writes compare.json / compare.md / compare.png and spectrum.json / .md / .png.

The command line lives in cli.py; this module holds the logic.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

DEFAULT_METHODS = ("output_qp", "ties", "dare_ties", "task_arithmetic")
RESULT_FILES = ("compare.json", "compare.md", "compare.png", "spectrum.json", "spectrum.md", "spectrum.png")
# Per-expert defaults of built-in methods. Sign-consensus methods (ties family, which
# normalise or rescale their kept task vectors) take every expert at weight 1 keeping half of
# its task vector; plain sums (task_arithmetic, dare_linear, …) take weight 1/K, the average
# task vector (the full sum of K task vectors usually overshoots). A `_svc` method uses its
# inner method's defaults. Any other method gets weight 1.0 where it requires a weight.
AVERAGE = "1/K"
BUILTIN_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "della": {"weight": 1.0, "density": 0.5},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    "task_arithmetic": {"weight": AVERAGE},
    "dare_linear": {"weight": AVERAGE, "density": 0.5},
    "della_linear": {"weight": AVERAGE, "density": 0.5},
    "breadcrumbs": {"weight": AVERAGE, "density": 0.9, "gamma": 0.01},
    "linear": {"weight": 1.0},
}
OUTPUT_QP = "output_qp"


class CompareError(ValueError):
    """A user-facing problem with the compare command's inputs, or a merge that failed."""


# -- methods and their configs -----------------------------------------------------------------
@dataclass
class MethodPlan:
    name: str  # the method name, also the row label and the file stem
    config: Dict[str, Any]  # the derived mergekit config
    per_model: Dict[str, Any] = field(default_factory=dict)  # parameters given to every expert
    shared: Dict[str, Any] = field(default_factory=dict)  # top-level parameters (overrides only for built-ins)


def parse_overrides(items: Sequence[str], methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """`METHOD:NAME=VALUE` items as {method: {name: value}}; VALUE is read as YAML (0.3, true, rank-4)."""
    overrides: Dict[str, Dict[str, Any]] = {}
    for item in items:
        method, colon, rest = item.partition(":")
        name, equals, value = rest.partition("=")
        if not (colon and equals and method.strip() and name.strip()):
            raise CompareError(f"compare: --param {item!r} is not METHOD:NAME=VALUE (e.g. ties:density=0.3)")
        method, name = method.strip(), name.strip()
        if method not in methods:
            raise CompareError(f"compare: --param {item!r} names method {method!r}, which is not in --methods "
                               f"({', '.join(methods)})")
        overrides.setdefault(method, {})[name] = yaml.safe_load(value) if value.strip() else None
    return overrides


def _spec(method: str):
    from mergekit.merge_methods import registry

    from . import register

    register()
    try:
        return registry.get(method).spec
    except RuntimeError:
        known = sorted(m.spec.name for m in registry.registered_methods())
        close = difflib.get_close_matches(method, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CompareError(f"compare: unknown merge method {method!r}.{hint} Known methods: {', '.join(known)}") from None


def _builtin_defaults(method: str, spec, experts: int) -> Dict[str, Any]:
    inner = method[:-4] if method.endswith("_svc") else method
    chosen = dict(BUILTIN_DEFAULTS.get(inner, {}))
    names = {p.name for p in spec.parameters}
    if "weight" in names and "weight" not in chosen and any(p.name == "weight" and p.required for p in spec.parameters):
        chosen["weight"] = 1.0
    return {k: (1.0 / experts if v == AVERAGE else v) for k, v in chosen.items() if k in names}


def _check_parameters(method: str, spec, given: Dict[str, Any]) -> None:
    names = [p.name for p in spec.parameters]
    for name, value in given.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CompareError(f"compare: {method} has no parameter {name!r}.{hint} "
                               f"Parameters of {method}: {', '.join(names) or 'none'}")
        spec_of = next(p for p in spec.parameters if p.name == name)
        try:
            spec_of.validate(value)
        except Exception as error:
            raise CompareError(f"compare: bad value {value!r} for {method}:{name}: {error}") from None


def read_config(path: str) -> Dict[str, Any]:
    """The YAML of CONFIG, checked for what compare needs: base_model, models, calibration."""
    try:
        with open(path, encoding="utf-8") as fp:
            raw = yaml.safe_load(fp)
    except (OSError, yaml.YAMLError) as error:
        raise CompareError(f"compare: cannot read {path}: {error}") from None
    if not isinstance(raw, dict) or not raw.get("base_model") or not raw.get("models"):
        raise CompareError(f"compare: {path} needs `base_model:` and `models:` (slices and modules are not supported)")
    if raw.get("slices") or raw.get("modules"):
        raise CompareError(f"compare: {path} uses slices/modules; compare needs a plain `models:` list")
    default = (raw.get("parameters") or {}).get("calibration")
    for entry in raw["models"]:
        if str(entry.get("model")) == str(raw["base_model"]):
            continue
        if not isinstance((entry.get("parameters") or {}).get("calibration", default), str):
            raise CompareError(f"compare: expert {entry.get('model')} in {path} has no `calibration:` parameter; "
                               "compare needs an output_qp config whose experts carry their calibration data")
    return raw


def plan_methods(raw: Dict[str, Any], methods: Sequence[str], overrides: Dict[str, Dict[str, Any]]) -> List[MethodPlan]:
    """One derived config per method: same base, models, dtype and tokenizer settings; the
    method's parameters are the defaults above plus the overrides, checked before anything runs."""
    from mergekit.config import MergeConfiguration

    from .plugin import check_config

    if len(set(methods)) != len(methods):
        raise CompareError(f"compare: --methods lists a method twice: {', '.join(methods)}")
    base = str(raw["base_model"])
    experts = [m for m in raw["models"] if str(m.get("model")) != base]
    kept = {k: v for k, v in raw.items() if k not in ("merge_method", "parameters", "models", "base_model")}
    plans = []
    for method in methods:
        spec = _spec(method)
        given = overrides.get(method, {})
        _check_parameters(method, spec, given)
        scope = {p.name: p.scope.value for p in spec.parameters}
        per_model = {k: v for k, v in given.items() if scope[k] != "shared"}
        shared = {k: v for k, v in given.items() if scope[k] == "shared"}
        if method == OUTPUT_QP:
            # The config's own output_qp settings (when it is one), the overrides on top.
            own = (raw.get("parameters") or {}) if raw.get("merge_method") == OUTPUT_QP else {}
            shared = {**own, **shared}
            models = [{**m, "parameters": {**(m.get("parameters") or {}), **per_model}}
                      if str(m.get("model")) != base else dict(m) for m in raw["models"]]
        else:
            per_model = {**_builtin_defaults(method, spec, len(experts)), **per_model}
            missing = [p.name for p in spec.parameters if p.required and p.name not in per_model and p.name not in shared]
            if missing:
                raise CompareError(f"compare: {method} needs parameter {missing[0]!r}: give it with "
                                   f"--param {method}:{missing[0]}=VALUE")
            # Our calibration parameters mean nothing to a built-in method: each expert gets the
            # method's own parameters only.
            models = [{**{k: v for k, v in m.items() if k != "parameters"}, "parameters": dict(per_model)}
                      for m in experts]
        config: Dict[str, Any] = {"merge_method": method}
        if spec.contract.base.value == "ignored":
            # e.g. linear: the base would be averaged in as one more model.
            models = [m for m in models if str(m.get("model")) != base]
        else:
            config["base_model"] = raw["base_model"]
        config["models"] = models
        if shared:
            config["parameters"] = shared
        config.update(kept)
        try:
            check_config(MergeConfiguration.model_validate(config))
        except Exception as error:
            raise CompareError(f"compare: the {method} config is invalid: {error}") from None
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
    from .calibration import CalibrationSource, load_records, tokenize_calibration

    source = CalibrationSource(path=path, field=field_name)
    return tokenize_calibration(load_records(source), tokenizer, samples=samples, seq_len=seq_len, seed=0,
                                source_name=path)


def heldout_loss(model_dir: str, sequences, device: str, pad_id: int) -> float:
    """Mean next-token cross-entropy (nats/token) of the causal LM in model_dir on the sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from .calibration import batches

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    model = model.to(device).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask in batches(sequences, max_tokens=4096, pad_id=pad_id):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask.long()).logits.double()
            targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int(mask[:, 1:].sum())
    del model
    if count == 0:
        raise CompareError("compare --eval: the held-out data has no sequence of two or more tokens")
    return total / count


# -- merging ------------------------------------------------------------------------------------
# Peak memory is read by a thin launcher, not by this process: on Linux a child's ru_maxrss
# starts from the memory of the process it was forked from, so a parent holding models would
# add its own size to every merge (same approach as benchmarks/harness.py).
LAUNCHER = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fp:
    json.dump({"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
               "peak_rss_mb": usage.ru_maxrss / 1024}, fp)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def mergekit_yaml() -> str:
    beside = Path(sys.executable).parent / "mergekit-yaml"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mergekit-yaml")
    if not found:
        raise CompareError("compare: mergekit-yaml not found; install mergekit in this environment")
    return found


def run_merge(plan: MethodPlan, out_dir: Path, device: str) -> Dict[str, Any]:
    """`mergekit-yaml CONFIG OUT` in its own process: returns wall s, CPU s and peak RSS MB.
    A failure raises CompareError naming the method, with the tail of its log."""
    configs, logs = out_dir / "configs", out_dir / "logs"
    configs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    config_path = configs / f"{plan.name}.yml"
    config_path.write_text(yaml.safe_dump(plan.config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    model_dir = out_dir / "models" / plan.name
    shutil.rmtree(model_dir, ignore_errors=True)
    log_path, cost_path = logs / f"{plan.name}.log", logs / f"{plan.name}.cost.json"
    cost_path.unlink(missing_ok=True)
    command = [mergekit_yaml(), str(config_path), str(model_dir), "--random-seed", "0", "--device", device]
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(cost_path), *command], stdout=log,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not (model_dir / "config.json").is_file():
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise CompareError(f"compare: the {plan.name} merge failed (mergekit-yaml exit {proc.returncode}); "
                           f"config {config_path}, last lines of {log_path}:\n{tail}")
    cost = json.loads(cost_path.read_text())
    cost.update(config_file=str(config_path), log=str(log_path), model_dir=str(model_dir))
    return cost


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

    from . import plugin

    # Everything that can be checked is checked before any merge or forward pass.
    if not methods:
        raise CompareError("compare: --methods is empty")
    raw = read_config(config_path)
    plans = plan_methods(raw, list(methods), parse_overrides(params, list(methods)))
    from mergekit.config import MergeConfiguration

    from .calibrate import load_tokenizer, local_model_path

    parsed = MergeConfiguration.model_validate(raw)
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
    from .spectrum import write_spectrum

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

    def measure(model_dir: str) -> Dict[str, Any]:
        row = _rho_row(plugin.diagnose(config_path, model_dir, problem=problem), names, problem.names)
        row["loss_by_task"] = ({n: heldout_loss(model_dir, sequences[n], device, pad_id) for n in names}
                               if eval_files else None)
        return row

    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=len(plans), desc="compare", unit="merge", file=sys.stderr)
    try:
        for plan in plans:
            bar.set_description(f"merging {plan.name}")
            cost = run_merge(plan, out, device)
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


# -- rendering ------------------------------------------------------------------------------------
def _cells(result: Dict[str, Any], row: Dict[str, Any]) -> List[str]:
    def num(value, digits):
        return "–" if value is None else f"{value:.{digits}f}"

    cells = [row["name"], num(row["rho"], 4), *[num(row["rho_by_task"][t], 4) for t in result["tasks"]]]
    if result["eval"]:
        cells += [num(row["loss_by_task"][t], 4) for t in result["tasks"]]
    cells += [num(row.get("wall_s"), 1), num(row.get("wall_vs_baseline"), 2), num(row.get("peak_rss_mb"), 0)]
    return cells


def _header(result: Dict[str, Any]) -> List[str]:
    header = ["method", "ρ", *[f"ρ {t}" for t in result["tasks"]]]
    if result["eval"]:
        header += [f"loss {t}" for t in result["tasks"]]
    return header + ["wall s", f"× {result['baseline']}", "peak RSS MB"]


def format_table(result: Dict[str, Any]) -> str:
    """The plain-text table printed by the command."""
    header = _header(result)
    body = [_cells(result, r) for r in result["rows"]]
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def render_markdown(result: Dict[str, Any]) -> str:
    header = _header(result)
    spectrum = result["spectrum"]
    lines = [
        "# mergekit-qp compare",
        "",
        f"Config `{result['config']}`; experts {', '.join(f'`{t}`' for t in result['tasks'])}.",
        "",
        "ρ: residual energy captured on the calibration data (1 − J/E over the linear maps, energy-weighted; "
        "1 = the experts' output changes kept exactly, 0 = no better than the base, < 0 worse)."
        + (" loss: held-out mean next-token cross-entropy, nats/token." if result["eval"] else "")
        + f" wall s and peak RSS: the `mergekit-yaml` process; × {result['baseline']}: wall time relative to it.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *["| " + " | ".join(_cells(result, r)) + " |" for r in result["rows"]],
        "",
        "![ρ per layer and per task](compare.png)",
        "",
    ]
    if spectrum is not None:
        ranks = ["full" if i == len(spectrum["ranks"]) - 1 else str(r) for i, r in enumerate(spectrum["ranks"])]
        lines += [
            "## Spectrum of the experts",
            "",
            "ρ of the best update of rank ≤ N (output_qp `basis: rank-N`); details per layer in "
            "[spectrum.md](spectrum.md).",
            "",
            "| N | " + " | ".join(ranks) + " |",
            "|---|" + "---:|" * len(ranks),
            "| ρ | " + " | ".join(f"{v:.4f}" for v in spectrum["rho"]) + " |",
            "",
        ]
    lines += [
        "## Methods",
        "",
    ]
    for r in result["rows"]:
        if r["kind"] == "merge":
            lines.append(f"- **{r['name']}**: per expert {json.dumps(r['per_model_parameters'])}, "
                         f"shared {json.dumps(r['parameters'])}; config `{r['config_file']}`")
    return "\n".join(lines) + "\n"


def plot_compare(result: Dict[str, Any], path: str) -> None:
    """ρ per layer for each model (left) and ρ, or held-out loss, per task (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in result["rows"] if r["kind"] == "merge" or r["name"] == "base"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        layers = [layer for layer in r["layers"] if layer["layer"] != "other"]
        left.plot([layer["layer"] for layer in layers], [layer["rho"] for layer in layers], marker="o", label=r["name"])
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("layer")
    left.set_ylabel("ρ (residual energy captured)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    key, label = ("loss_by_task", "held-out loss (nats/token)") if result["eval"] else ("rho_by_task", "ρ")
    bars = result["rows"] if result["eval"] else rows
    width = 0.8 / len(bars)
    for i, r in enumerate(bars):
        right.bar([t + i * width for t in range(len(result["tasks"]))], [r[key][t] for t in result["tasks"]],
                  width=width, label=r["name"])
    right.set_xticks([t + 0.4 - width / 2 for t in range(len(result["tasks"]))], result["tasks"])
    if result["eval"]:  # losses differ by a few percent: an axis from 0 would hide that
        values = [r[key][t] for r in bars for t in result["tasks"]]
        spread = max(values) - min(values)
        right.set_ylim(min(values) - 0.1 * spread - 1e-6, max(values) + 0.1 * spread + 1e-6)
    right.set_ylabel(label)
    right.set_xlabel("task")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
