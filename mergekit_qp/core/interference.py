"""Interference between experts, from the calibration statistics alone (docs/plan.md). Pure torch.

For one linear map with task vectors Δ_1 … Δ_K (m × d) and input Grams G_1 … G_K (task k's
calibration inputs, d × d), the cross energies

    C[k, i, j] = tr(Δ_i G_k Δ_jᵀ)

are the inner products of expert i's and expert j's output changes on task k's inputs. Summed
over linear maps they give everything `mergekit-qp plan` reports about the experts:

- E_k = C[k, k, k], expert k's output change on its own data (the objective's energy);
- I[j, k] = C[k, j, j] / E_k, how strongly expert j moves task k's outputs, relative to expert k;
- cos[k, i, j] = C[k, i, j] / √(C[k, i, i] C[k, j, j]), the angle between two experts' output
  changes on task k (−1: one undoes the other there).

Cost per map: K Gram products Δ_i G_k per task (K² products of m × d × d), one m × d float64
product held at a time besides the deltas; the Grams are converted to float64 one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

F64 = torch.float64
# A task vector whose output change is at least this share of the task's own (I ≥ 0.1) counts
# as moving that task's outputs; two such with cosine ≤ OPPOSITE_COSINE pull against each other.
MOVES_TASK = 0.1
OPPOSITE_COSINE = -0.3
DOMINANCE_RATIO = 4.0  # one expert's weighted energy ≥ 4 × the others' median
LOW_RHO = 0.5  # no planned method keeps half of a task's output change

__all__ = ["Interference", "cross_energies", "residual_energies"]


def cross_energies(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """C[k, i, j] = tr(Δ_i G_k Δ_jᵀ) for one linear map (K × K × K, float64; symmetric in i, j)."""
    count = len(deltas)
    if len(grams) != count:
        raise ValueError(f"cross_energies: {count} task vectors but {len(grams)} Grams")
    out = torch.zeros((count, count, count), dtype=F64)
    for k, gram in enumerate(grams):
        gk = gram.to(F64)
        for i in range(count):
            product = deltas[i].to(F64) @ gk
            for j in range(i, count):
                out[k, i, j] = out[k, j, i] = float((product * deltas[j].to(F64)).sum())
            del product
        del gk
    return out


def residual_energies(update: torch.Tensor, deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> List[float]:
    """J_k = tr((U − Δ_k) G_k (U − Δ_k)ᵀ) per task, clamped at ≥ 0 against rounding."""
    out = []
    for delta, gram in zip(deltas, grams):
        residual = update.to(F64) - delta.to(F64)
        out.append(max(0.0, float(((residual @ gram.to(F64)) * residual).sum())))
    return out


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return 0.0 if not ordered else ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 else None


@dataclass(frozen=True)
class Interference:
    """The cross energies of a set of experts summed over linear maps, with task names and the
    objective's task weights ω."""

    cross: torch.Tensor  # K × K × K
    tasks: Tuple[str, ...]
    weights: Tuple[float, ...]

    @property
    def energy(self) -> List[float]:
        """E_k: each expert's output change on its own calibration data."""
        return [float(self.cross[k, k, k]) for k in range(len(self.tasks))]

    def matrix(self) -> List[List[Optional[float]]]:
        """I[j][k] = tr(Δ_j G_k Δ_jᵀ) / E_k (row: the expert that moves, column: the task);
        None where E_k = 0. The diagonal is 1."""
        count = len(self.tasks)
        return [[_ratio(max(0.0, float(self.cross[k, j, j])), float(self.cross[k, k, k])) for k in range(count)]
                for j in range(count)]

    def cosine(self, task: int) -> List[List[Optional[float]]]:
        """cos[i][j] of the experts' output changes on task `task`'s inputs; None where one is 0."""
        c = self.cross[task]
        count = len(self.tasks)
        # energies clamped at 0: low-precision Grams can leave a tiny negative one (no complex root)
        own = [max(0.0, float(c[i, i])) for i in range(count)]
        return [[_ratio(float(c[i, j]), (own[i] * own[j]) ** 0.5) for j in range(count)] for i in range(count)]

    def warnings(self, best_rho: Optional[Mapping[str, Tuple[float, str]]] = None) -> List[str]:
        """Plain-words warnings: an expert that dominates the objective, two experts that pull a
        task's outputs in opposite directions, a task no planned method keeps half of
        (`best_rho`: task → (best ρ, the method reaching it))."""
        out = []
        count = len(self.tasks)
        weighted = [w * e for w, e in zip(self.weights, self.energy)]
        for k in range(count):
            others = [weighted[j] for j in range(count) if j != k]
            median = _median(others)
            if count > 1 and weighted[k] > 0 and weighted[k] >= DOMINANCE_RATIO * median:
                times = f"{weighted[k] / median:.1f}×" if median > 0 else "infinitely"
                out.append(f"{self.tasks[k]} dominates the objective: its weighted output change is {times} the "
                           "others' (median), so output_qp fits it first; lower its `weight` or check that its "
                           "calibration data is comparable")
        strength = self.matrix()
        for k in range(count):
            cos = self.cosine(k)
            for i in range(count):
                for j in range(i + 1, count):
                    si, sj, c = strength[i][k], strength[j][k], cos[i][j]
                    if None in (si, sj, c) or min(si, sj) < MOVES_TASK or c > OPPOSITE_COSINE:
                        continue
                    out.append(f"on {self.tasks[k]}'s data, {self.tasks[i]} and {self.tasks[j]} move the outputs in "
                               f"opposite directions (cosine {c:.2f}; strengths {si:.2f} and {sj:.2f} of "
                               f"{self.tasks[k]}'s own change): a merge keeps at most part of both")
        for task, (rho, method) in (best_rho or {}).items():
            if rho < LOW_RHO:
                out.append(f"{task}: no planned method keeps half of its output change (best ρ {rho:.3f}, {method})")
        return out
