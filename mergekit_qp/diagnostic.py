"""Residual energy captured by a merge (design §3.3): ρ = 1 − J(Δ)/E, for any merged model.

Works for `output_qp` and for built-in methods alike: it needs only the base, the experts,
their calibration statistics and the merged checkpoint, so every method is measured on one
scale. Linear maps only (weight and bias jointly, in homogeneous coordinates).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from safetensors import safe_open

from . import qp
from .spectrum import TensorSpectrum, tensor_spectrum
from .statistics import ModelStatistics


class Checkpoint:
    """Tensor access to a saved model folder (single file or sharded safetensors)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fp:
                files = json.load(fp)["weight_map"]
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
                files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"no safetensors checkpoint in {directory}")
        self.directory = directory
        self.files = files

    def name(self, wanted: str) -> Optional[str]:
        """The stored name for a tensor name, tolerant of a model prefix (bert.…)."""
        if wanted in self.files:
            return wanted
        matches = sorted((k for k in self.files if k.endswith("." + wanted) or wanted.endswith("." + k)), key=len)
        return matches[0] if matches else None

    def get(self, wanted: str, required: bool = False) -> Optional[torch.Tensor]:
        key = self.name(wanted)
        if key is None:
            if required:
                raise KeyError(f"{self.directory} has no tensor {wanted}")
            return None
        with safe_open(os.path.join(self.directory, self.files[key]), "pt") as f:
            return f.get_tensor(key)


@dataclass
class Diagnostic:
    weights: List[float]
    tensors: List[Dict] = field(default_factory=list)

    def _sum(self, key: str) -> float:
        return sum(t[key] for t in self.tensors)

    @property
    def rho(self) -> float:
        return qp.energy_captured(self._sum("objective"), self._sum("energy"))

    @property
    def rho_by_task(self) -> List[float]:
        out = []
        for k in range(len(self.weights)):
            energy = sum(t["energy_per_task"][k] for t in self.tensors)
            objective = sum(t["objective_per_task"][k] for t in self.tensors)
            out.append(qp.energy_captured(objective, energy))
        return out


@dataclass
class LinearProblem:
    """One linear map's side of the objective: the experts' updates and input Grams, with the
    bias as a last column (and the Gram of [x, 1]) where the map has one."""

    module: str
    deltas: List[torch.Tensor]
    grams: List[torch.Tensor]
    has_bias: bool


def linear_problems(base: Checkpoint, experts: Sequence[Checkpoint],
                    statistics: Sequence[ModelStatistics]) -> Iterator[LinearProblem]:
    """Every linear map with calibration statistics and a weight of its own in the base (float64)."""
    for module in statistics[0].linear_modules():
        w0 = base.get(f"{module}.weight")
        if w0 is None or w0.ndim != 2:
            continue  # e.g. a tied lm_head: not a tensor of its own
        found = [s.lookup(module) for s in statistics]
        deltas = [e.get(f"{module}.weight", required=True).double() - w0.double() for e in experts]
        grams = [f.gram.double() for f in found]
        b0 = base.get(f"{module}.bias")
        if b0 is not None:
            deltas = [torch.cat([d, (e.get(f"{module}.bias", required=True).double() - b0.double())[:, None]], 1)
                      for d, e in zip(deltas, experts)]
            grams = [augmented_gram(g, f.mean.double()) for g, f in zip(grams, found)]
        yield LinearProblem(module, deltas, grams, b0 is not None)


def linear_diagnostic(base_dir: str, expert_dirs: Sequence[str], statistics: Sequence[ModelStatistics],
                      merged_dir: str, weights: Sequence[float]) -> Diagnostic:
    """ρ of the merged checkpoint, per linear map and overall, on the experts' calibration data."""
    base, merged = Checkpoint(base_dir), Checkpoint(merged_dir)
    experts = [Checkpoint(d) for d in expert_dirs]
    result = Diagnostic(weights=list(weights))
    for problem in linear_problems(base, experts, statistics):
        module = problem.module
        wm = merged.get(f"{module}.weight")
        if wm is None:
            continue
        update = wm.double() - base.get(f"{module}.weight").double()
        if problem.has_bias:
            update = torch.cat([update, (merged.get(f"{module}.bias", required=True).double()
                                         - base.get(f"{module}.bias").double())[:, None]], 1)
        obj = qp.objective(update, problem.deltas, problem.grams, list(weights))
        result.tensors.append({
            "name": f"{module}.weight",
            "objective": obj.total,
            "energy": obj.energy,
            "objective_per_task": [w * j for w, j in zip(weights, obj.per_task)],
            "energy_per_task": [w * e for w, e in zip(weights, obj.energy_per_task)],
            "rho": obj.rho,
        })
    return result


def linear_spectra(base_dir: str, expert_dirs: Sequence[str], statistics: Sequence[ModelStatistics],
                   weights: Sequence[float], ridge: float) -> List[TensorSpectrum]:
    """ρ against rank of every linear map (spectrum.tensor_spectrum), on the experts' calibration data."""
    base = Checkpoint(base_dir)
    experts = [Checkpoint(d) for d in expert_dirs]
    return [tensor_spectrum(f"{p.module}.weight", p.deltas, p.grams, list(weights), ridge)
            for p in linear_problems(base, experts, statistics)]


def augmented_gram(gram: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The Gram of [x, 1] (homogeneous coordinates) from E[x xᵀ] and E[x]."""
    d = gram.shape[0]
    out = gram.new_ones((d + 1, d + 1))
    out[:d, :d] = gram
    out[:d, d] = mean
    out[d, :d] = mean
    return out
