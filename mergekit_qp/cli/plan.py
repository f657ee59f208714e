"""`mergekit-qp plan`: before merging, what each method would keep of each expert, and how the
experts interfere, from the calibration statistics alone (docs/plan.md). No model is written.

From an output_qp config (base_model, models with `calibration:` or `statistics:`), per linear
map: the experts' cross energies (core/interference.py), and for each planned method the weight
it would write (plugin/prediction.py) scored by the objective, so the ρ it predicts is the ρ
`diagnose` measures on that merge. Writes plan.json / plan.md / plan.png (plan_report.py).

The command line lives in cli/__init__.py; this module holds the logic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from ..calibration.checkpoint import Checkpoint
from ..core.interference import Interference, cross_energies, residual_energies
from ..core.objective import Objective, aggregate_rho
from ..reports.diagnose import linear_problems
from ..reports.merge_report import tensor_record
from .compare import CompareError, parse_overrides, plan_methods, read_config, task_names
from .plan_report import plot_interference, render_markdown
from .runner import write_config

DEFAULT_METHODS = ("output_qp", "linear", "task_arithmetic", "ties")
DEFAULT_BASES = ("full", "diagonal", "task")
RESULT_FILES = ("plan.json", "plan.md", "plan.png")
CONFIGS = "plan-configs"  # a folder of plan's own: only its *.yml are ever replaced
OUTPUT_QP = "output_qp"
__all__ = ["DEFAULT_BASES", "DEFAULT_METHODS", "plan"]


def planned_configs(raw: Dict[str, Any], methods: Sequence[str], params: Sequence[str],
                    bases: Sequence[str]) -> List[tuple]:
    """(row label, derived config) per planned method: output_qp once per basis of `bases` (unless
    --param gives it a basis), every other method once, each checked as `compare` checks it."""
    from ..plugin.prediction import planned_calibration_overrides

    for what, values in (("--methods", methods), ("--bases", bases)):
        if not values and (what == "--methods" or OUTPUT_QP in methods):
            raise CompareError(f"plan: {what} is empty")
        if len(set(values)) != len(values):
            raise CompareError(f"plan: {what} lists a value twice: {', '.join(values)}")
    for key in ("tokenizer", "tokenizer_source"):
        if raw.get(key):
            raise CompareError(f"plan: CONFIG sets `{key}`: a merged tokenizer re-orders vocabulary rows, which plan "
                               "does not predict; plan the experts without it")
    overrides = parse_overrides(params, methods, command="plan")
    changed = planned_calibration_overrides(overrides.get(OUTPUT_QP, {}))
    if changed:
        raise CompareError(f"plan: -p output_qp:{changed[0]}=… would change the calibration statistics, which plan "
                           "takes from CONFIG: set it in CONFIG instead")
    rows = []
    for method in methods:
        given = overrides.get(method, {})
        if method == OUTPUT_QP and "basis" not in given:
            for basis in bases:
                (one,) = plan_methods(raw, [method], {method: {**given, "basis": basis}}, command="plan")
                rows.append((f"{method} {basis}", one.config))
        else:
            (one,) = plan_methods(raw, [method], {method: given} if given else {}, command="plan")
            rows.append((method, one.config))
    return rows


def checked_plan(config_path: str, methods: Sequence[str], params: Sequence[str], bases: Sequence[str]):
    """Everything about CONFIG and the planned methods that can be checked before any forward pass:
    (rows, one MethodPredictor per row, the experts' names as written)."""
    from ..plugin.prediction import MethodPredictor

    raw = read_config(config_path, command="plan")
    rows = planned_configs(raw, methods, params, bases)
    base_name = str(raw["base_model"])
    expert_names = [str(m["model"]) for m in raw["models"] if str(m["model"]) != base_name]
    try:
        return rows, [MethodPredictor(label, config, expert_names, base_name) for label, config in rows], expert_names
    except ValueError as error:  # PlanError
        raise CompareError(str(error)) from None


def plan(config_path: str, methods: Sequence[str] = DEFAULT_METHODS, params: Sequence[str] = (),
         bases: Sequence[str] = DEFAULT_BASES, out_dir: Optional[str] = "plan-out", device: str = "cpu",
         interference: bool = True) -> Dict[str, Any]:
    """Predicted ρ (overall and per task) of each planned method, the experts' energies,
    interference matrix and cosines, and warnings; written to `out_dir` when given.
    `interference=False` skips the cross energies (K² products per map): ρ only, as checkpoint
    selection needs (its energies and interference are then zero)."""
    from ..plugin import calibration_problem
    from ..plugin.prediction import weight_infos

    rows, predictors, expert_names = checked_plan(config_path, methods, params, bases)
    try:
        problem = calibration_problem(config_path, device=device, command="plan")
    except ValueError as error:  # PlanError and the calibration data's own errors
        raise CompareError(str(error)) from None
    if len(problem.names) != len(expert_names):
        raise CompareError(f"plan: {config_path} lists {len(expert_names)} experts but mergekit reads "
                           f"{len(problem.names)} ({', '.join(problem.names)})")
    infos = weight_infos(problem.base_dir)
    tasks = task_names(problem.names)
    weights = list(problem.weights)
    base = Checkpoint(problem.base_dir)
    experts = [Checkpoint(d) for d in problem.expert_dirs]
    count = len(experts)
    cross = torch.zeros((count, count, count), dtype=torch.float64)
    records: Dict[str, List[Dict]] = {p.label: [] for p in predictors}
    try:
        maps = linear_problems(base, experts, problem.statistics, tasks)
        for linear in tqdm(maps, desc="plan: linear maps", file=sys.stderr, disable=None):
            if interference:
                block = cross_energies(linear.deltas, linear.grams)
                cross += block
                energy = [float(block[k, k, k]) for k in range(count)]
            else:
                energy = residual_energies(torch.zeros_like(linear.deltas[0]), linear.deltas, linear.grams)
            for predictor in predictors:
                weight, bias = predictor.merged(f"{linear.module}.weight", linear.base_weight, linear.expert_weights,
                                                linear.statistics, linear.base_bias, linear.expert_biases, infos)
                residual = residual_energies(linear.update(weight, bias), linear.deltas, linear.grams)
                objective = Objective(tuple(residual), tuple(energy), sum(w * j for w, j in zip(weights, residual)),
                                      sum(w * e for w, e in zip(weights, energy)))
                records[predictor.label].append(tensor_record(f"{linear.module}.weight", objective, weights, tasks))
                del weight, bias
            del linear
    except ValueError as error:  # statistics that do not fit the checkpoints
        raise CompareError(f"plan: {error}") from None
    if not any(records.values()):
        raise CompareError(f"plan: no linear map of {problem.base_dir} has calibration statistics")
    result = summarise(Interference(cross, tuple(tasks), tuple(weights)), records, rows, problem, config_path)
    if out_dir is not None:
        write(result, rows, Path(out_dir))
    return result


def summarise(interference: Interference, records: Dict[str, List[Dict]], rows: Sequence[tuple], problem,
              config_path: str) -> Dict[str, Any]:
    tasks = list(interference.tasks)
    methods = []
    for label, config in rows:
        terms = records[label]
        methods.append({"name": label, "method": config["merge_method"], "rho": aggregate_rho(terms),
                        "rho_by_task": {t: aggregate_rho(terms, t) for t in tasks},
                        "random": "dare" in str(config["merge_method"]) or "della" in str(config["merge_method"]),
                        "parameters": config.get("parameters") or {},
                        "per_expert": (config["models"][-1].get("parameters") or {}) if config["models"] else {}})
    best = {t: max(((m["rho_by_task"][t], m["name"]) for m in methods), key=lambda x: x[0]) for t in tasks}
    energy = interference.energy
    weighted = [w * e for w, e in zip(interference.weights, energy)]
    total = sum(weighted)
    return {
        "config": str(config_path),
        "tasks": tasks,
        "experts": list(problem.names),
        "weights": list(interference.weights),
        "settings": {k: v for k, v in problem.settings.items()},
        "energy": dict(zip(tasks, energy)),
        "energy_share": {t: (w / total if total > 0 else None) for t, w in zip(tasks, weighted)},
        "interference": interference.matrix(),
        "cosine": {t: interference.cosine(k) for k, t in enumerate(tasks)},
        "methods": methods,
        "best": {t: {"rho": r, "method": m} for t, (r, m) in best.items()},
        "warnings": interference.warnings(best),
        "linear_maps": len(next(iter(records.values()))),
        "configs": {label: f"{CONFIGS}/{config_stem(label)}.yml" for label, _ in rows},
    }


def config_stem(label: str) -> str:
    return label.replace(" ", "-")


def write(result: Dict[str, Any], rows: Sequence[tuple], out: Path) -> None:
    """plan.json, plan.md, plan.png and plan-configs/LABEL.yml (each planned method's config, ready for
    `mergekit-yaml`) in `out`; the files of an earlier plan there are replaced."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)  # never leave an earlier run's file beside this one's
    folder = out / CONFIGS
    for old in folder.glob("*.yml") if folder.is_dir() else ():  # an earlier plan's configs
        old.unlink()
    for label, config in rows:
        write_config(folder / f"{config_stem(label)}.yml", config)
    (out / "plan.md").write_text(render_markdown(result), encoding="utf-8")
    plot_interference(result, out / "plan.png")
    (out / "plan.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
