"""Residual energy captured by a merge (docs/method.md): ρ = 1 − J(Δ)/E, for any merged model.

Works for `output_qp` and for built-in methods alike: it needs only the base, the experts,
their calibration statistics and the merged checkpoint, so every method is measured on one
scale. Linear maps only (weight and bias jointly, in homogeneous coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..calibration.checkpoint import Checkpoint
from ..calibration.store import ModelStatistics
from ..core.statistics import LinearStats
from ..core.objective import aggregate_rho, objective
from ..core.problems import augmented_gram
from ..core.spectrum import TensorSpectrum, tensor_spectrum
from .merge_report import tensor_record


@dataclass
class Diagnostic:
    """ρ of a merged checkpoint: one record per linear map (reports.merge_report.tensor_record)."""

    weights: List[float]
    tasks: List[str]
    tensors: List[Dict] = field(default_factory=list)

    @property
    def rho(self) -> float:
        return aggregate_rho(self.tensors)

    @property
    def rho_by_task(self) -> List[float]:
        return [aggregate_rho(self.tensors, t) for t in self.tasks]


@dataclass
class LinearProblem:
    """One linear map's side of the objective: the experts' updates and input Grams in the solved
    layout (out × in; GPT-2 Conv1D weights are stored in × out), with the bias as a last column
    (and the Gram of [x, 1]) where the map has one; and the stored tensors they came from."""

    module: str
    deltas: List[torch.Tensor]
    grams: List[torch.Tensor]
    has_bias: bool
    transposed: bool = False
    base_weight: Optional[torch.Tensor] = None
    base_bias: Optional[torch.Tensor] = None
    expert_weights: List[torch.Tensor] = field(default_factory=list)
    expert_biases: Optional[List[torch.Tensor]] = None
    statistics: List[LinearStats] = field(default_factory=list)

    def solved(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """A stored weight (and bias) of this map in the solved layout, float64, bias as last column."""
        w = weight.double().T if self.transposed else weight.double()
        return w if bias is None else torch.cat([w, bias.double()[:, None]], 1)

    def update(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The update of a merged weight (and bias) of this map over the base, as the deltas are laid out."""
        return self.solved(weight, bias) - self.solved(self.base_weight, self.base_bias)


def linear_problems(base: Checkpoint, experts: Sequence[Checkpoint], statistics: Sequence[ModelStatistics],
                    names: Optional[Sequence[str]] = None) -> Iterator[LinearProblem]:
    """Every linear map with calibration statistics and a weight of its own in the base (float64).
    `names`: the experts' names, for the error when one expert's statistics lack a map."""
    for module in statistics[0].linear_modules():
        w0 = base.get(f"{module}.weight")
        if w0 is None or w0.ndim != 2:
            continue  # e.g. a tied lm_head: not a tensor of its own
        found = [s.lookup(module) for s in statistics]
        for k, f in enumerate(found):
            if not isinstance(f, LinearStats):
                who = names[k] if names is not None else f"expert {k + 1}"
                raise ValueError(f"the calibration statistics of {who} have no linear map {module} (the first "
                                 "expert's do): statistics of different architectures or settings")
        weights = [e.get(f"{module}.weight", required=True) for e in experts]
        b0 = base.get(f"{module}.bias")
        biases = None if b0 is None else [e.get(f"{module}.bias", required=True) for e in experts]
        problem = LinearProblem(module, [], [], b0 is not None, found[0].transposed, w0, b0, weights, biases, found)
        problem.deltas = [problem.update(w, None if biases is None else biases[k]) for k, w in enumerate(weights)]
        problem.grams = [f.gram.double() if b0 is None else augmented_gram(f.gram, f.mean.double()) for f in found]
        yield problem


def linear_diagnostic(base_dir: str, expert_dirs: Sequence[str], statistics: Sequence[ModelStatistics],
                      merged_dir: str, weights: Sequence[float], tasks: Optional[Sequence[str]] = None) -> Diagnostic:
    """ρ of the merged checkpoint, per linear map and overall, on the experts' calibration data
    (tasks: the experts' names, default their folders)."""
    base, merged = Checkpoint(base_dir), Checkpoint(merged_dir)
    experts = [Checkpoint(d) for d in expert_dirs]
    tasks = list(tasks) if tasks is not None else [str(d) for d in expert_dirs]
    result = Diagnostic(weights=list(weights), tasks=tasks)
    for problem in linear_problems(base, experts, statistics, tasks):
        module = problem.module
        wm = merged.get(f"{module}.weight")
        if wm is None:
            continue
        bm = merged.get(f"{module}.bias", required=True) if problem.has_bias else None
        obj = objective(problem.update(wm, bm), problem.deltas, problem.grams, list(weights))
        result.tensors.append(tensor_record(f"{module}.weight", obj, list(weights), tasks))
    return result


def linear_spectra(base_dir: str, expert_dirs: Sequence[str], statistics: Sequence[ModelStatistics],
                   weights: Sequence[float], ridge: float) -> List[TensorSpectrum]:
    """ρ against rank of every linear map (spectrum.tensor_spectrum), on the experts' calibration data."""
    base = Checkpoint(base_dir)
    experts = [Checkpoint(d) for d in expert_dirs]
    return [tensor_spectrum(f"{p.module}.weight", p.deltas, p.grams, list(weights), ridge)
            for p in linear_problems(base, experts, statistics)]
