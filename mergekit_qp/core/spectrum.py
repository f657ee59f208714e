"""The spectrum of a merge (docs/method.md: bases, rank-N; diagnostic): residual energy captured ρ by the best
update of rank ≤ N, for N = 1, 2, 4, … up to full rank, per linear map, per layer and overall.

For one linear map, `qp.low_rank_directions` gives the full-basis optimum Δ* and the output
directions u_1, u_2, … (best first) with Δ_N = U_N U_Nᵀ Δ* (what `basis: rank-N` writes). Per
task k the objective of Δ_N splits over directions,

    J_k(Δ_N) = E_k + Σ_{i≤N} (u_iᵀ Δ* G_k Δ*ᵀ u_i − 2 u_iᵀ Δ* G_k Δ_kᵀ u_i),

so one factorisation and two r×d products per task give every rank at once (float64). ρ is
measured on J without the ridge, like every other ρ the package reports; at full rank it is the
ρ of output_qp's full-basis merge with the same ridge. Aggregates are energy-weighted like
report.py: ρ(N) = 1 − ΣJ(N) / ΣE over the tensors of a layer (or of the model).

Pure maths (torch only); rendering is reports/spectrum_report.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import qp
from .objective import aggregate_rho, layer_of
from .objective import objective as evaluate_objective

_F64 = torch.float64


@dataclass
class TensorSpectrum:
    """One linear map: objective[k][N − 1] is ω_k J_k of its best rank-N update for
    N = 1 … full_rank (the last entry is the full-basis optimum); energy[k] is ω_k E_k."""

    name: str
    objective: List[List[float]]
    energy: List[float]

    @property
    def full_rank(self) -> int:
        return len(self.objective[0])

    def objective_at(self, rank: int) -> List[float]:
        """ω_k J_k per task at rank N (ranks beyond this map's full rank give the full optimum)."""
        return [row[min(rank, self.full_rank) - 1] for row in self.objective]


def tensor_spectrum(name: str, task_vectors, grams, weights, ridge: float = 0.0) -> TensorSpectrum:
    """ω-weighted J of the best rank-N update of one linear map, for every N (see module doc)."""
    full, U = qp.low_rank_directions(task_vectors, grams, weights, ridge)
    at_full = evaluate_objective(full, task_vectors, grams, weights)
    full_rank = min(full.shape)
    along = U[:, : full_rank - 1].mT @ full  # Δ* seen along each output direction (r−1 × d)
    objective, energy = [], []
    for k, (delta, gram) in enumerate(zip(task_vectors, grams)):
        gk = gram.to(full.device, _F64)
        gk = (gk + gk.mT) / 2
        dk = delta.to(full.device, _F64)
        projected = along @ gk
        # Change of J_k from adding direction i: its quadratic term minus twice its cross term.
        steps = (projected * along).sum(1) - 2 * (projected * (U[:, : full_rank - 1].mT @ dk)).sum(1)
        e_k = at_full.energy_per_task[k]
        # J ≥ 0 exactly; the clamp only removes rounding (as core.objective.objective does).
        partial = [max(0.0, e_k + float(s)) for s in torch.cumsum(steps, 0)]
        w = float(weights[k])
        objective.append([w * j for j in partial] + [w * at_full.per_task[k]])
        energy.append(w * e_k)
    return TensorSpectrum(name, objective, energy)


def rank_grid(full_ranks: Sequence[int]) -> List[int]:
    """1, 2, 4, … below the largest full rank, then the largest full rank itself."""
    largest = max(full_ranks)
    grid, n = [], 1
    while n < largest:
        grid.append(n)
        n *= 2
    return grid + [largest]


def _rho_curve(tensors: Sequence[TensorSpectrum], grid: Sequence[int], task: Optional[str] = None,
               tasks: Sequence[str] = ()) -> List[float]:
    """ρ(N) = 1 − ΣJ(N)/ΣE over the tensors, for all tasks (task None) or one task."""
    names = list(tasks) or [str(k) for k in range(len(tensors[0].energy))]
    return [aggregate_rho(({"objective_by_task": dict(zip(names, t.objective_at(n))),
                            "energy_by_task": dict(zip(names, t.energy))} for t in tensors), task) for n in grid]


def _aggregate(tensors: Sequence[TensorSpectrum], grid: Sequence[int], tasks: Sequence[str]) -> Dict:
    return {"rho": _rho_curve(tensors, grid),
            "rho_by_task": {name: _rho_curve(tensors, grid, name, tasks) for name in tasks}}


def build_spectrum(tensors: Sequence[TensorSpectrum], tasks: Sequence[str], settings: Optional[Dict] = None) -> Dict:
    """The spectrum as a dict: `ranks` (the last one is full rank for every tensor), overall
    `rho` and `rho_by_task` (one value per rank), `layers` and `tensors` likewise."""
    if not tensors:
        raise ValueError("spectrum: no linear map with calibration statistics to measure")
    grid = rank_grid([t.full_rank for t in tensors])
    by_layer: Dict[str, List[TensorSpectrum]] = {}
    for t in tensors:
        by_layer.setdefault(layer_of(t.name), []).append(t)
    order = sorted(by_layer, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return {
        "ranks": grid,
        "tasks": list(tasks),
        "settings": settings or {},
        **_aggregate(tensors, grid, tasks),
        "layers": [{"layer": int(k) if k.isdigit() else k, **_aggregate(by_layer[k], grid, tasks)} for k in order],
        "tensors": [{"name": t.name, "full_rank": t.full_rank, "rho": _rho_curve([t], grid)}
                    for t in sorted(tensors, key=lambda t: t.name)],
    }
