"""What both benchmark suites share: the method grid, merging through the stock `mergekit-yaml`
with per-process wall/CPU/peak-memory, ρ of any merged model, and the result files.

Every merge is a real `mergekit-yaml CONFIG OUT` subprocess (the path users take; the plugin is
loaded by its start-up hook), run by the runner `mergekit-qp compare` and the demo use
(mergekit_qp/cli/runner.py). Peak memory and CPU time come from `os.wait4` in a thin launcher,
so they are the merge process tree's own, not the benchmark's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergekit_qp.cli import runner
from mergekit_qp.cli.method_defaults import PER_EXPERT_DEFAULTS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Method:
    """One row of the tables: a mergekit method with its parameters."""

    name: str
    merge_method: str
    model_parameters: dict = field(default_factory=dict)  # per expert
    parameters: dict = field(default_factory=dict)  # top level
    svc_of: str | None = None  # singular value calibration of this other row's method

    @property
    def calibrated(self) -> bool:
        return self.merge_method == "output_qp"


def with_svc(method: Method, rule: str | None = None) -> Method:
    """The same row with singular value calibration: `<method>_svc`, or `svc: true` on output_qp;
    `rule` sets `svc_rule` (named in the row), None leaves the default."""
    extra, suffix = ({"svc_rule": rule}, f" svc_rule={rule}") if rule else ({}, "")
    if method.calibrated:
        return Method(f"{method.name} svc{suffix}", method.merge_method, method.model_parameters,
                      {**method.parameters, "svc": True, **extra}, svc_of=method.name)
    inner, _, rest = method.name.partition(" ")
    return Method(f"{inner}_svc{' ' + rest if rest else ''}{suffix}", f"{method.merge_method}_svc",
                  method.model_parameters, {**method.parameters, **extra}, svc_of=method.name)


def method_grid(*, rank: int, smoke: bool = False) -> list[Method]:
    """Built-ins beside every output_qp basis, a small ridge sweep, task-basis variants and sequential.

    linear, ties and dare_ties take the per-expert defaults compare and the demo use
    (mergekit_qp/cli/method_defaults.py: weight 1.0, density 0.5); task arithmetic is swept over λ."""
    linear = Method("linear", "linear", dict(PER_EXPERT_DEFAULTS["linear"]))
    ties = Method("ties", "ties", dict(PER_EXPERT_DEFAULTS["ties"]))
    if smoke:
        return [
            linear,
            ties,
            Method("output_qp", "output_qp"),
            Method("output_qp task", "output_qp", parameters={"basis": "task"}),
            Method("output_qp sequential", "output_qp", parameters={"sequential": True}),
            with_svc(ties),
        ]
    task_arithmetic = [Method(f"task_arithmetic λ={lam}", "task_arithmetic", {"weight": lam}) for lam in (0.3, 0.5, 1.0)]
    dare_ties = Method("dare_ties", "dare_ties", dict(PER_EXPERT_DEFAULTS["dare_ties"]))
    output_qp = Method("output_qp", "output_qp")  # the defaults: basis full, ridge 1e-4
    return [
        linear,
        *[row for m in task_arithmetic for row in (m, with_svc(m), with_svc(m, "paper"))],
        ties, with_svc(ties), with_svc(ties, "paper"),
        dare_ties, with_svc(dare_ties), with_svc(dare_ties, "paper"),
        output_qp, with_svc(output_qp), with_svc(output_qp, "paper"),
        Method("output_qp ridge=1e-2", "output_qp", parameters={"ridge": 1e-2}),
        Method("output_qp ridge=1e-1", "output_qp", parameters={"ridge": 1e-1}),
        Method("output_qp diagonal", "output_qp", parameters={"basis": "diagonal"}),
        Method("output_qp task", "output_qp", parameters={"basis": "task"}),
        Method("output_qp task nonneg", "output_qp", parameters={"basis": "task", "nonneg": True}),
        Method(f"output_qp rank-{rank}", "output_qp", parameters={"basis": f"rank-{rank}"}),
        # layer-wise: each layer's statistics on the inputs the already-merged layers produce
        Method("output_qp sequential", "output_qp", parameters={"sequential": True, "target": "merged_inputs"}),
        Method("output_qp sequential expert_outputs", "output_qp",
               parameters={"sequential": True, "target": "expert_outputs"}),
    ]


def merge_config(method: Method, base: Path, experts: dict[str, Path], calibration: dict[str, Path],
                 calibration_parameters: dict, cache_dir: Path) -> dict:
    models = []
    for task, path in experts.items():
        params = dict(method.model_parameters)
        if method.calibrated:
            params["calibration"] = str(calibration[task])
        models.append({"model": str(path), **({"parameters": params} if params else {})})
    config: dict[str, Any] = {"merge_method": method.merge_method, "base_model": str(base),
                              "models": models, "dtype": "float32"}
    if method.merge_method == "linear":  # linear would average the base in too (and want its weight)
        del config["base_model"]
    parameters = dict(method.parameters)
    if method.calibrated:
        parameters = {**calibration_parameters, "cache_dir": str(cache_dir), **parameters}
    if parameters:
        config["parameters"] = parameters
    return config


def run_merge(config: dict, out: Path, log_dir: Path, threads: int | None = None) -> dict:
    """`mergekit-yaml CONFIG OUT` in its own process; wall, CPU and peak RSS of its process tree
    (the config and the merge's log go to log_dir as OUT's name .yml / .log).

    `threads` caps torch's threads in the merge (OMP_NUM_THREADS), so that two suites can run
    side by side on a small machine without oversubscribing it."""
    config_path = runner.write_config(log_dir / f"{out.name}.yml", config)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    run = runner.run_merge(config_path, out, options=["--copy-tokenizer", "--random-seed", "0"],
                           log=log_dir / f"{out.name}.log", env=env)
    return run.cost()


def svc_seconds(base: Path, experts: dict[str, Path], merged: Path) -> float:
    """Time of singular value calibration alone on a merged model: `svc.calibrate` on every
    2-D weight it applies to (not embeddings or output heads), in this process (same threads
    as the merges). An SVD's cost depends on the shape, not on the values, so this is the SVC
    share of the `_svc` merge without the noise of two separate merge processes."""
    import time

    from mergekit_qp.core import svc
    from mergekit_qp.calibration.checkpoint import Checkpoint

    base_ck, merged_ck = Checkpoint(str(base)), Checkpoint(str(merged))
    expert_ck = [Checkpoint(str(p)) for p in experts.values()]
    total = 0.0
    for name in sorted(merged_ck.files):
        tensor = merged_ck.get(name)
        if tensor.ndim != 2 or "embed" in name or "lm_head" in name:
            continue
        b = base_ck.get(name).float()
        deltas = [e.get(name).float() - b for e in expert_ck]
        start = time.perf_counter()
        svc.calibrate(tensor.float() - b, deltas)
        total += time.perf_counter() - start
        del deltas, b, tensor
    return total


def svc_cost_lines(methods: dict[str, dict]) -> list[str]:
    """Markdown: each `_svc` row's calibration time against its inner method's merge time."""
    rows = [(name, m) for name, m in methods.items() if m.get("svc_of") and m.get("svc_s") is not None]
    if not rows:
        return []
    lines = ["SVC cost: singular value calibration alone (every 2-D weight, timed in the benchmark process) "
             "against the whole `mergekit-yaml` merge of the inner method, same run.", "",
             "| row | SVC s | inner merge s | SVC × inner merge |", "|---|---:|---:|---:|"]
    for name, m in rows:
        inner = methods[m["svc_of"]].get("wall_s")
        ratio = f"{m['svc_s'] / inner:.3f}" if inner else "–"
        lines.append(f"| {name} | {m['svc_s']:.2f} | {fmt(inner, 1)} | {ratio} |")
    return lines


def rho_function(base: Path, experts: dict[str, Path], calibration: dict[str, Path],
                 calibration_parameters: dict, cache_dir: Path) -> Callable[[Path], dict]:
    """ρ overall and per task of any model folder, on the statistics output_qp uses (cached)."""
    import torch

    from mergekit_qp.calibration.cache import CalibrationSettings, expert_statistics
    from mergekit_qp.reports.diagnose import linear_diagnostic

    settings = CalibrationSettings(samples=calibration_parameters["calibration_samples"],
                                   seq_len=calibration_parameters["calibration_seq_len"], cache_dir=str(cache_dir))
    tasks = list(experts)
    stats = [expert_statistics(str(experts[t]), str(base), str(calibration[t]), settings, torch.device("cpu"))
             for t in tasks]

    def rho(model_dir: Path) -> dict:
        diag = linear_diagnostic(str(base), [str(experts[t]) for t in tasks], stats, str(model_dir),
                                 [1.0] * len(tasks))
        return {"rho": diag.rho, "rho_by_task": dict(zip(tasks, diag.rho_by_task))}

    return rho


def provenance(threads: int) -> dict:
    """Commit, date, machine and library versions of a benchmark run, for its result's `meta`."""
    import os
    import platform
    import subprocess
    import time

    import mergekit
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip() or "unknown"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "mergekit": getattr(mergekit, "__version__", "0.1.5"), "threads": threads}


# ----------------------------------------------------------------------------- summaries


def mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def stderr(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = mean(rx), mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False,
                              default=lambda o: None) + "\n")
    tmp.replace(path)


def clean_nan(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_nan(v) for v in obj]
    return obj
