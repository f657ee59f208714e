"""The residual-energy diagnostic ρ (see docs/method.md, "Diagnostic") and its one aggregation.

For an update Δ of one linear map, per task k: J_k = tr((Δ − Δk) Gk (Δ − Δk)ᵀ), the error of the
merged outputs against expert k's on its calibration inputs, and E_k = tr(Δk Gk Δkᵀ), the expert's
own output change. ρ = 1 − ΣωJ / ΣωE over any set of tensors and tasks: the share of the experts'
output change that a merge keeps. Pure torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from .qp import _f64, _factorise, _out, _ridge, _scaled_ridge, _seq, _symmetric_f64, _tensor, _validate, _weights

__all__ = ["FullSystem", "Objective", "aggregate_rho", "energy_captured", "full_update_by_rows", "full_update_with_objective",
           "layer_of", "objective", "solve_by_rows"]

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Objective:
    """J_k = tr((Δ − Δk) Gk (Δ − Δk)ᵀ) and E_k = tr(Δk Gk Δkᵀ) per task (unweighted),
    total = Σ ωk J_k, energy = Σ ωk E_k. ρ = 1 − total/energy is the share of the experts'
    output change the merge keeps: 0 for the base (Δ = 0), 1 for a perfect fit. Where the
    energy is 0, ρ is 1.0 if the residual is 0 too and 0.0 otherwise (never ±inf or NaN)."""

    per_task: tuple
    energy_per_task: tuple
    total: float
    energy: float

    @property
    def rho(self) -> float:
        return energy_captured(self.total, self.energy)

    @property
    def rho_per_task(self) -> tuple:
        return tuple(energy_captured(j, e) for j, e in zip(self.per_task, self.energy_per_task))


def energy_captured(objective_value: float, energy: float) -> float:
    """ρ = 1 − J/E; where E = 0: 1.0 if J = 0 too, else 0.0 (never ±inf or NaN)."""
    if energy > 0:
        return 1.0 - objective_value / energy
    return 1.0 if objective_value == 0 else 0.0


def objective(update, task_vectors, grams, weights) -> Objective:
    """Evaluate the residual-energy diagnostic of an update (J_k clamped at ≥ 0 against
    rounding; the Grams are assumed PSD)."""
    vs, w, wsum, dev, shape = _validate(task_vectors, weights)
    gs = _seq("grams", grams, len(vs), (shape[1], shape[1]))
    u = _f64(_tensor("update", update, shape), dev)
    per, energy = [], []
    for v, g in zip(vs, gs):
        vk, gk = _f64(v, dev), _f64(g, dev)
        r = u - vk
        per.append(max(0.0, float(((r @ gk) * r).sum())))
        energy.append(max(0.0, float(((vk @ gk) * vk).sum())))
    raw = [wk * wsum for wk in w]
    return Objective(tuple(per), tuple(energy), sum(a * j for a, j in zip(raw, per)),
                     sum(a * e for a, e in zip(raw, energy)))


class FullSystem:
    """What a full-basis solve takes from the statistics alone: the weights, λ and Ĝ + λI
    factorised once. Projections that read one input (q/k/v, gate/up) share it, so one
    factorisation serves three solves (core/problems.py, SharedSystems). Holds the factor
    (and Ĝ only where Ĝ + λI is singular); the tasks' float64 Grams are made one at a time
    from the stored ones unless `hold_grams` keeps them (the blocked solve reuses each per block)."""

    def __init__(self, grams, weights, ridge: float):
        self.weights, self.wsum = _weights(weights, len(grams))
        d = grams[0].shape[-1] if hasattr(grams[0], "shape") else len(grams[0])
        self._grams = _seq("grams", grams, len(self.weights), (d, d))
        self.device, self.width = self._grams[0].device, d
        G = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        for wk, g in zip(self.weights, self._grams):
            G.add_(_symmetric_f64(g, self.device), alpha=wk)
        self.lam = _scaled_ridge(G, _ridge(ridge))
        self.solve = _factorise(G, self.lam, overwrite=True)  # G is now Ĝ + λI
        # The deviation form (below) needs Ĝ; the direct form does not.
        self.gram_sum = None
        if not self.solve.invertible:
            G.diagonal().sub_(self.lam)
            self.gram_sum = G
        self._held = None

    def hold_grams(self) -> None:
        if self._held is None:
            self._held = [_symmetric_f64(g, self.device) for g in self._grams]

    def gram(self, k: int) -> torch.Tensor:
        """Task k's Gram, symmetric, float64."""
        return self._held[k] if self._held is not None else _symmetric_f64(self._grams[k], self.device)

    def update(self, S: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The minimiser Δ from S = Σ ωk Δk Gk and Δ̄: Δ (Ĝ + λI) = S + λΔ̄, one solve and no
        Δ̄ Ĝ product. Where Ĝ + λI is singular, Δ̄ + (S − Δ̄Ĝ)(Ĝ + λI)⁺: the minimiser
        nearest Δ̄ (what qp.full_update gives)."""
        if self.gram_sum is None:
            return self.solve(S + self.lam * mean)
        return mean + self.solve(S - mean @ self.gram_sum)


def full_update_with_objective(task_vectors, grams, weights, ridge: float = 0.0,
                               system: Optional[FullSystem] = None):
    """The full-basis update (qp.full_update's minimiser, float32) and its Objective, with the
    objective's terms taken from the solve's own products instead of 2K more d-wide products.

    Per task Nk = Δk Gk (S needs it anyway) gives Ek = ⟨Δk, Nk⟩; with S = Σ ωk Nk and the
    solve Δ (Ĝ + λI) = S + λΔ̄, Σ ωk tr(Δ Gk Δᵀ) = ⟨Δ, S + λ(Δ̄ − Δ)⟩ and Σ ωk ⟨Δ, Nk⟩ = ⟨Δ, S⟩.
    Tasks 1…K−1 take Δ Gk (one product each) for tr(Δ Gk Δᵀ) and ⟨Δ Gk, Δk⟩; task K's terms
    follow from the sums: 2K products of m × d by d × d in all. Jk = tr(Δ Gk Δᵀ) − 2⟨Δ, Nk⟩ + Ek
    in float64, clamped at ≥ 0 against rounding. Holds the factor, one task's Gram and three
    m × d float64 buffers, whatever K. `system`: a factorisation of these Grams to reuse."""
    vs, w, wsum, dev, (m, d) = _validate(task_vectors, weights)
    system = system if system is not None else FullSystem(grams, weights, ridge)
    if system.width != d:
        raise ValueError(f"statistics of width {system.width} for task vectors of width {d}")
    mean = sum(wk * _f64(v, dev) for wk, v in zip(w, vs))
    S = torch.zeros(m, d, dtype=torch.float64, device=dev)
    energy = []
    for k, v in enumerate(vs):
        vk = _f64(v, dev)
        nk = vk @ system.gram(k)
        energy.append(max(0.0, float((vk * nk).sum())))
        S.add_(nk, alpha=w[k])
        del vk, nk
    update = system.update(S, mean)
    total_cross = float((update * S).sum())
    S.add_(mean, alpha=system.lam).sub_(update, alpha=system.lam)  # now Δ Ĝ
    total_quadratic = float((update * S).sum())
    del S, mean
    quadratic, cross = [], []
    for k in range(len(vs) - 1):
        product = update @ system.gram(k)
        quadratic.append(float((product * update).sum()))
        cross.append(float((product * _f64(vs[k], dev)).sum()))
        del product
    quadratic.append((total_quadratic - sum(wk * q for wk, q in zip(w, quadratic))) / w[-1])
    cross.append((total_cross - sum(wk * c for wk, c in zip(w, cross))) / w[-1])
    return _out(update, dev), _from_terms(quadratic, cross, energy, w, wsum)


def _from_terms(quadratic, cross, energy, w, wsum) -> Objective:
    """The Objective from each task's tr(Δ Gk Δᵀ), ⟨Δ, Δk Gk⟩ and Ek (normalised weights w):
    Jk = quadratic − 2 cross + Ek, clamped at ≥ 0 against rounding."""
    per = [max(0.0, q - 2 * c + e) for q, c, e in zip(quadratic, cross, energy)]
    raw = [wk * wsum for wk in w]
    return Objective(tuple(per), tuple(energy), sum(a * j for a, j in zip(raw, per)),
                     sum(a * e for a, e in zip(raw, energy)))


def solve_by_rows(m: int, d: int, tasks: int, block_bytes: int = 1 << 25) -> int:
    """The output rows per block for an m × d full-basis solve of `tasks` tasks, or 0 for the
    direct solve: blocks pay when the direct solve's K + 4 float64 m × d buffers would exceed
    the K + 1 float64 d × d Grams the blocked solve keeps (output heads, MLP up-projections)."""
    if m * (tasks + 4) <= d * (tasks + 1):
        return 0
    return max(256, block_bytes // (8 * d))


def full_update_by_rows(rows_of, m: int, system: FullSystem, write, block_rows: int) -> Objective:
    """full_update_with_objective of an m × d update (d = system.width), solved in blocks of
    output rows: with Ĝ + λI factorised once, the problem separates over rows. `rows_of(rows)` gives the K task
    vectors' rows (a slice), `write(rows, update rows as float32)` takes the result, so no
    m × d float64 buffer is ever whole. Holds the K tasks' float64 Grams, the factor and one
    block. The same minimiser and objective terms, summed over blocks."""
    system.hold_grams()
    w, wsum, lam, dev = system.weights, system.wsum, system.lam, system.device
    K, last = len(w), len(w) - 1
    energy, quadratic, cross = [0.0] * K, [0.0] * K, [0.0] * K
    for start in range(0, m, block_rows):
        rows = slice(start, min(start + block_rows, m))
        vs = [_f64(_tensor(f"task_vectors[{k}] rows {rows.start}:{rows.stop}", v), dev)
              for k, v in enumerate(rows_of(rows))]
        mean = sum(wk * v for wk, v in zip(w, vs))
        S = torch.zeros_like(mean)
        for k in range(K):
            nk = vs[k] @ system.gram(k)
            energy[k] += float((vs[k] * nk).sum())
            S.add_(nk, alpha=w[k])
            vs[k] = nk  # only Δk Gk is needed from here on
        update = system.update(S, mean)
        S.add_(mean, alpha=lam).sub_(update, alpha=lam)  # Δ Ĝ over these rows
        block_quadratic = float((update * S).sum())
        del S, mean
        for k in range(K):
            cross[k] += float((update * vs[k]).sum())  # ⟨Δ Gk, Δk⟩ = ⟨Δ, Δk Gk⟩ (Gk symmetric)
            if k < last:
                q = float(((update @ system.gram(k)) * update).sum())
                quadratic[k] += q
                block_quadratic -= w[k] * q
        quadratic[last] += block_quadratic / w[last]
        write(rows, _out(update, dev))
        del vs, update
    return _from_terms(quadratic, cross, energy, w, wsum)


def aggregate_rho(terms: Iterable[Mapping[str, Mapping[str, float]]], task: Optional[str] = None) -> float:
    """ρ of many tensors together: 1 − ΣωJ / ΣωE (energy-weighted), over all tasks or one.

    Each term holds `objective_by_task` and `energy_by_task`, ω-weighted and keyed by task name,
    so tensors merged from different experts (a `slices:` config) aggregate by name. The one
    aggregation of the package: the merge report, diagnose and the spectrum all use it."""
    objective_sum = energy_sum = 0.0
    for term in terms:
        for name, value in term["objective_by_task"].items():
            if task is None or name == task:
                objective_sum += value
                energy_sum += term["energy_by_task"][name]
    return energy_captured(objective_sum, energy_sum)


def layer_of(name: str) -> str:
    """The layer index of a tensor name as a string ("3" for model.layers.3.mlp…), else "other"."""
    match = _LAYER.search(name)
    return match.group(1) if match else "other"
