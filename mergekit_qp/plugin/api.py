"""Python functions over a merge configuration: the calibration problem of its experts, the
merge report (ρ) of any merged checkpoint, and the rank spectrum (used by `mergekit-qp
diagnose` and `compare`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..reports import merge_report
from .config_api import load_merge_config
from .parameters import CALIBRATION_SETTINGS, METHOD_NAME, PARAMETERS


@dataclass
class CalibrationProblem:
    """What every diagnostic of one set of experts shares: their folders, statistics and task
    weights, and the output_qp settings they were taken from."""

    base_dir: str
    expert_dirs: List[str]
    names: List[str]
    statistics: List[Any]
    weights: List[float]
    settings: Dict[str, Any]  # output_qp's calibration settings (and ridge) of the source config


def calibration_problem(config_path: str, calibration_config: Optional[str] = None,
                        device: str = "cpu", command: str = "diagnose") -> CalibrationProblem:
    """The experts of a `models:` config with their calibration statistics (cached): calibration
    data and settings from the config's own `calibration` parameters or from an output_qp config
    of the same experts."""
    from ..calibration.cache import STATISTICS, CalibrationSettings
    from ..calibration.models import local_model_path

    config = load_merge_config(config_path)
    source = load_merge_config(calibration_config) if calibration_config else config
    if not config.models or config.base_model is None:
        raise ValueError(f"{command}: {config_path} needs `base_model:` and `models:` (slices are not supported)")
    calibration_of = {str(m.model): (m.parameters or {}).get("calibration") for m in source.models or []}
    artifact_of = {str(m.model): (m.parameters or {}).get("statistics") for m in source.models or []}
    # Task weights ω of the objective: those of the output_qp config when there is one, so that
    # every method is measured on the objective output_qp optimises.
    top = source.parameters or {}
    # mergekit's order for a per-model parameter: the model's own value, then the top-level one.
    weight_of = {}
    for m in source.models or []:
        value = (m.parameters or {}).get("weight", top.get("weight", 1.0)) if source.merge_method == METHOD_NAME else 1.0
        if not isinstance(value, (int, float)):
            raise ValueError(f"{command}: the weight of {m.model} is given per tensor ({value!r}); the objective's "
                             "task weights ω take one number per expert")
        weight_of[str(m.model)] = float(value)
    shared = {p.name: p.validate(top.get(p.name, p.default)) for p in PARAMETERS if p.name in CALIBRATION_SETTINGS}
    # The ridge of the spectrum: output_qp's own when the source is an output_qp config.
    ridge_spec = next(p for p in PARAMETERS if p.name == "ridge")
    ridge = ridge_spec.validate(top.get("ridge", ridge_spec.default)) if source.merge_method == METHOD_NAME \
        else ridge_spec.default
    settings = CalibrationSettings.from_params(shared)
    experts = [m for m in config.models if m.model != config.base_model]
    stats, weights = [], []
    for m in experts:
        calibration = calibration_of.get(str(m.model)) or top.get("calibration")
        artifact = artifact_of.get(str(m.model))
        if not isinstance(calibration, str) and not isinstance(artifact, str):
            where = calibration_config or config_path
            raise ValueError(f"{command}: no calibration for {m.model} in {where}: give it a `calibration:` (or "
                             "`statistics:`) parameter or pass --calibration-config with the output_qp config of the "
                             "same experts")
        stats.append(STATISTICS.expert_statistics(m.model, config.base_model, calibration, settings, torch.device(device),
                                                  artifact=artifact))
        weights.append(weight_of.get(str(m.model), 1.0))
    return CalibrationProblem(
        base_dir=local_model_path(config.base_model),
        expert_dirs=[local_model_path(m.model) for m in experts],
        names=[str(m.model) for m in experts],
        statistics=stats,
        weights=weights,
        settings={"merge_method": config.merge_method, **{k: v for k, v in shared.items() if k != "cache_dir"},
                  "ridge": ridge},
    )


def diagnose(config_path: str, merged_path: str, calibration_config: Optional[str] = None,
             device: str = "cpu", problem: Optional[CalibrationProblem] = None) -> Dict[str, Any]:
    """The merge report (ρ per tensor, layer, task) of any merged checkpoint of a `models:`
    config, whatever its method: calibration data and settings come from the config's own
    `calibration` parameters or from an output_qp config of the same experts (or from
    `problem`, when the caller has them already)."""
    from ..reports.diagnose import linear_diagnostic

    problem = problem or calibration_problem(config_path, calibration_config, device)
    result = linear_diagnostic(problem.base_dir, problem.expert_dirs, problem.statistics, merged_path,
                               problem.weights, problem.names)
    settings = {k: v for k, v in problem.settings.items() if k != "ridge"}
    return merge_report.build_report(result.tensors, problem.names, {**settings, "merged": merged_path})


def spectrum(problem: CalibrationProblem, ridge: Optional[float] = None) -> Dict[str, Any]:
    """Energy captured against rank (spectrum.build_spectrum) of the experts of `problem`, with
    output_qp's ridge of the source config unless `ridge` is given."""
    from ..core.spectrum import build_spectrum
    from ..reports.diagnose import linear_spectra

    ridge = problem.settings["ridge"] if ridge is None else float(ridge)
    tensors = linear_spectra(problem.base_dir, problem.expert_dirs, problem.statistics, problem.weights, ridge)
    return build_spectrum(tensors, problem.names, {"ridge": ridge, "basis": "rank-N of the full basis"})
