"""Self-contained demo assets: tiny models built locally, merged with `mergekit-yaml`, compared.

`run_comparison` builds (or reuses) the demo's models (demo_assets.py), writes a mergekit YAML per
method, runs the stock ``mergekit-yaml`` CLI in a subprocess (runner.py) and evaluates the held-out
loss and ρ of every merged model per domain; `format_table` renders the result. This module never
imports mergekit.

Command line: ``mergekit-qp demo [--workdir DIR] [--quick] [--methods a,b,c]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .demo_assets import DemoAssets, build_demo, read_jsonl_texts
from .method_defaults import per_expert_defaults
from .runner import heldout_loss, load_causal_lm, padded_batches, run_merge, write_config

__all__ = ["DEFAULT_METHODS", "format_table", "heldout_file_loss", "main", "merge_config_dict", "method_defaults",
           "run_comparison", "write_merge_config"]

# Built-in methods compared by default, in the table's order; their per-expert parameters are
# those of method_defaults.py (ties/dare_ties: weight 1, density 0.5; task_arithmetic: 1/3, the
# average update, equal to a uniform `linear` merge here).
DEFAULT_METHODS: Tuple[str, ...] = ("output_qp", "task_arithmetic", "ties", "dare_ties")
# output_qp: each expert calibrated on the train split of its own domain.
OUTPUT_QP_PARAMETERS: Dict[str, Any] = {"calibration": "{calibration}"}
# Methods whose config takes no base_model.
_NO_BASE_METHODS = {"linear"}
# Reserved keys of an `extra_parameters` dict (everything else is a per-model parameter).
_RESERVED = ("parameters", "per_model", "config", "merge_method")
MERGE_OPTIONS = ("--copy-tokenizer", "--random-seed", "0", "--quiet")


def method_defaults(merge_method: str, experts: int) -> Dict[str, Any]:
    """The per-expert parameters of `merge_method` in the demo, before any extra parameters."""
    if merge_method == "output_qp":
        return dict(OUTPUT_QP_PARAMETERS)
    return per_expert_defaults(merge_method, experts)


def _offline() -> Dict[str, str]:
    """The merges never reach the Hub (unless the caller's environment says otherwise)."""
    return {name: os.environ.get(name, "1") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}


def heldout_file_loss(model_dir: Path, heldout_file: Path, *, max_tokens: int = 32_768,
                      batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of a saved model on a JSONL of texts.

    Each text is encoded as ``<s> text`` and cut into windows of the model's context length;
    padding is excluded.  At most `max_tokens` target tokens are scored (texts in file order),
    in batches of `batch_size` windows, logits in float32.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_causal_lm(model_dir)
    ctx = int(getattr(model.config, "max_position_embeddings", 128) or 128)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    windows: List[List[int]] = []
    budget = max_tokens
    for text in read_jsonl_texts(Path(heldout_file)):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        for s in range(0, len(ids), ctx):
            w = ids[s:s + ctx]
            if len(w) < 2 or budget <= 0:
                continue
            windows.append(w)
            budget -= len(w) - 1
        if budget <= 0:
            break
    if not windows:
        raise ValueError(f"no evaluable text in {heldout_file}")
    return heldout_loss(model, padded_batches(windows, batch_size, pad), logits_dtype="float32")


def _fill(value: Any, fields: Mapping[str, str]) -> Any:
    if isinstance(value, str) and "{" in value:
        try:
            return value.format(**fields)
        except (KeyError, IndexError, ValueError):
            return value
    return value


def merge_config_dict(assets: DemoAssets, method: str,
                      extra_parameters: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The mergekit config (as a dict) that `write_merge_config` writes.

    `extra_parameters` (all optional):

    * ``parameters``: top-level ``parameters:`` of the config;
    * ``per_model``: ``{domain: {name: value}}`` for one expert only;
    * ``config``: other top-level keys (e.g. ``tokenizer_source``);
    * ``merge_method``: the mergekit method to use when `method` is only a label;
    * any other key: a parameter of every expert, overriding the method's defaults
      (`method_defaults`).

    String values may use ``{domain}``, ``{calibration}``, ``{heldout}``, ``{model}`` and
    ``{base}``; they are filled per expert, e.g. ``{"calibration": "{calibration}"}`` gives
    every expert its own calibration file.
    """
    extra = dict(extra_parameters or {})
    merge_method = str(extra.get("merge_method") or method)
    shared = {k: v for k, v in extra.items() if k not in _RESERVED}
    per_model = extra.get("per_model") or {}
    models = []
    for domain, path in assets.experts.items():
        fields = {"domain": domain, "calibration": str(assets.calibration[domain]),
                  "heldout": str(assets.heldout[domain]), "model": str(path), "base": str(assets.base)}
        params = method_defaults(merge_method, len(assets.experts))
        params.update(shared)
        params.update(per_model.get(domain, {}))
        params = {k: _fill(v, fields) for k, v in params.items()}
        entry: Dict[str, Any] = {"model": str(path)}
        if params:
            entry["parameters"] = params
        models.append(entry)
    config: Dict[str, Any] = {"merge_method": merge_method}
    if merge_method not in _NO_BASE_METHODS:
        config["base_model"] = str(assets.base)
    config["models"] = models
    top = extra.get("parameters") or {}
    base_fields = {"base": str(assets.base)}
    if top:
        config["parameters"] = {k: _fill(v, base_fields) for k, v in top.items()}
    config["dtype"] = "float32"
    config.update(extra.get("config") or {})
    return config


def write_merge_config(path: Path, assets: DemoAssets, method: str,
                       extra_parameters: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the mergekit YAML for merging the demo experts into the base with `method`."""
    return write_config(path, merge_config_dict(assets, method, extra_parameters), comment=f"mergekit_qp demo: {method}")


def _ensure_tokenizer(model_dir: Path, tokenizer_dir: Path) -> None:
    """mergekit's --copy-tokenizer logs and continues on failure: make sure one is there."""
    if not (model_dir / "tokenizer.json").is_file():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, model_dir / f.name)


def _row(method: str, kind: str, model_dir: Path, assets: DemoAssets, wall: Optional[float],
         max_tokens: int, rho) -> Dict[str, Any]:
    losses = {d: heldout_file_loss(model_dir, assets.heldout[d], max_tokens=max_tokens) for d in assets.domains}
    return {"method": method, "kind": kind, "losses": losses,
            "mean": sum(losses.values()) / len(losses), "wall_s": wall, "model_dir": str(model_dir),
            "rho": rho(model_dir)}


def _calibration_parameters(assets: DemoAssets, workdir: Path) -> Dict[str, Any]:
    """output_qp's shared settings in the demo: every calibration text, the models' context."""
    return {"calibration_samples": assets.settings.calibration_samples,
            "calibration_seq_len": assets.settings.context,
            "cache_dir": str(workdir / "statistics")}


def _rho_function(assets: DemoAssets, workdir: Path):
    """ρ (residual energy captured on the calibration data, design §3.3) of any model folder,
    on the same statistics output_qp uses (computed once, then read from the cache)."""
    import torch

    from ..calibration.cache import CalibrationSettings, expert_statistics
    from ..reports.diagnose import linear_diagnostic

    params = _calibration_parameters(assets, workdir)
    settings = CalibrationSettings(samples=params["calibration_samples"], seq_len=params["calibration_seq_len"],
                                   cache_dir=params["cache_dir"])
    experts = [str(assets.experts[d]) for d in assets.domains]
    stats = [expert_statistics(str(assets.experts[d]), str(assets.base), str(assets.calibration[d]), settings,
                               torch.device("cpu")) for d in assets.domains]
    return lambda model_dir: linear_diagnostic(str(assets.base), experts, stats, str(model_dir),
                                               [1.0] * len(experts)).rho


def run_comparison(workdir: Path, methods: Sequence[str],
                   method_parameters: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
                   quick: bool = False, assets: Optional[DemoAssets] = None,
                   max_tokens: int = 32_768, include_references: bool = True,
                   verbose: bool = False) -> List[Dict[str, Any]]:
    """Build (or reuse) the demo, merge with each method via mergekit-yaml, evaluate.

    Returns rows ``{"method", "kind" ("reference" | "merge"), "losses" {domain: nats/token},
    "mean", "wall_s" (merge subprocess wall time; None for references), "model_dir"}``:
    first ``base`` and ``expert:<domain>``, then one per method, in order.
    """
    workdir = Path(workdir)
    assets = assets or build_demo(workdir, quick=quick, verbose=verbose)
    method_parameters = method_parameters or {}
    rows: List[Dict[str, Any]] = []
    rho = _rho_function(assets, workdir)
    if include_references:
        rows.append(_row("base", "reference", assets.base, assets, None, max_tokens, rho))
        for d, path in assets.experts.items():
            rows.append(_row(f"expert:{d}", "reference", path, assets, None, max_tokens, rho))
    for method in methods:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
        extra = dict(method_parameters.get(method) or {})
        if (extra.get("merge_method") or method) == "output_qp":
            extra["parameters"] = {**_calibration_parameters(assets, workdir), **(extra.get("parameters") or {})}
        config = write_merge_config(workdir / "configs" / f"{safe}.yaml", assets, method, extra)
        out = workdir / "merges" / safe
        if verbose:
            print(f"[demo] mergekit-yaml {config} ...", file=sys.stderr, flush=True)
        wall = run_merge(config, out, options=MERGE_OPTIONS, env=_offline(), timeout=600).wall_s
        _ensure_tokenizer(out, assets.tokenizer)
        rows.append(_row(method, "merge", out, assets, round(wall, 2), max_tokens, rho))
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: method | loss per domain | mean | merge wall time."""
    domains: List[str] = []
    for r in rows:
        for d in r["losses"]:
            if d not in domains:
                domains.append(d)
    header = ["method", *domains, "mean", "rho", "wall s"]
    body = []
    for r in rows:
        cells = [str(r["method"])]
        cells += [f"{r['losses'][d]:.4f}" if d in r["losses"] else "-" for d in domains]
        cells.append(f"{r['mean']:.4f}")
        cells.append("-" if r.get("rho") is None else f"{r['rho']:.3f}")
        cells.append("-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}")
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(c) for c in body]
    lines.append("(held-out cross-entropy, nats/token, lower is better; rho = share of the experts' output "
                 "change on calibration data that the model keeps, linear layers, higher is better; "
                 "wall s = mergekit-yaml run)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mergekit-qp demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="demo_workdir", help="where models, data and merges go")
    p.add_argument("--quick", action="store_true", help="tiny fast variant (for smoke tests)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated merge methods (default: %(default)s)")
    p.add_argument("--method-parameters", default=None,
                   help='JSON {method: extra_parameters}, e.g. \'{"output_qp": {"calibration": "{calibration}"}}\'')
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    assets = build_demo(Path(args.workdir), quick=args.quick, verbose=True)
    print(f"demo models ready in {time.perf_counter() - t0:.1f}s under {assets.workdir}", flush=True)
    if args.build_only:
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    params = json.loads(args.method_parameters) if args.method_parameters else {}
    rows = run_comparison(Path(args.workdir), methods, params, assets=assets, verbose=True)
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
