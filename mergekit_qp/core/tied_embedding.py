"""A tied input/output embedding solved for both of its roles (no mergekit, no I/O).

The same matrix E (m × d) is the input embedding (token t reads row t) and the output head
(logit t = ⟨h, E[t]⟩). Its merge weighs both output errors, so each row's system matrix is the
output head's Gram plus that token's frequency (see `tied_rowwise_update`); one
eigendecomposition of the head Gram serves every row. The notation is core/qp.py's.
"""
from __future__ import annotations

import torch

from .qp import _F64, _f64, _out, _ridge, _rtol, _scaled_ridge, _seq, _symmetric_f64, _validate, _weights

__all__ = ["TiedEmbeddingSystem", "tied_rowwise_update"]


class TiedEmbeddingSystem:
    """What a tied embedding's solve takes from the output-head Grams alone: Ĝ = Σ ωk Gk
    diagonalised once (Ĝ = Q diag(ℓ) Qᵀ), λ, and the tasks' Grams; rows are then solved in
    blocks (tied_rowwise_update)."""

    def __init__(self, head_grams, weights, ridge: float = 0.0, device=None):
        self.weights, _ = _weights(weights, len(head_grams))
        d = head_grams[0].shape[-1]
        grams = _seq("head_grams", head_grams, len(self.weights), (d, d))
        self.device = grams[0].device if device is None else device
        self.grams = [_symmetric_f64(g, self.device) for g in grams]
        G = sum(wk * g for wk, g in zip(self.weights, self.grams))
        self.lam = _scaled_ridge(G, _ridge(ridge))
        values, self.Q = torch.linalg.eigh(G)
        self.values = values.clamp_min(0.0)
        self.width = d


def tied_rowwise_update(task_vectors, row_counts, system: TiedEmbeddingSystem) -> torch.Tensor:
    """A tied embedding E (m × d) is both the input embedding (one-hot inputs: token t reads row
    t with normalised frequency ckt) and the output head (logit t = ⟨h, E[t]⟩ for the final
    hidden state h, Gram Gk = E[h hᵀ]). Both output errors, per calibration token, summed:

        J_λ(Δ) = Σk ωk Σt [ (Δ[t] − Δk[t]) (Gk + ckt I) (Δ[t] − Δk[t])ᵀ ] + λ ‖Δ − Δ̄‖²_F.

    Rows are independent, and row t's system matrix Ĝ + (st + λ) I, st = Σk ωk ckt, shares Ĝ's
    eigenvectors: Δ[t] = Δ̄[t] + rt Q diag(1 / (ℓ + st + λ)) Qᵀ with rt = Σk ωk (Δk[t] − Δ̄[t]) (Gk +
    ckt I); zero denominators (no data, no ridge) keep Δ̄ (the minimiser nearest it)."""
    vs, w, _, _, (m, d) = _validate(task_vectors, system.weights)
    if d != system.width:
        raise ValueError(f"head Grams of width {system.width} for an embedding of width {d}")
    counts = _seq("row_counts", row_counts, len(vs), (m,), nonneg=True)
    dev = system.device
    vs = [_f64(v, dev) for v in vs]
    counts = [_f64(c, dev) for c in counts]
    mean = sum(wk * v for wk, v in zip(w, vs))
    R = torch.zeros_like(mean)
    s = torch.zeros(m, dtype=_F64, device=dev)
    for wk, v, c, g in zip(w, vs, counts, system.grams):
        deviation = v - mean
        R += wk * (deviation @ g + c[:, None] * deviation)
        s += wk * c
    den = system.values[None, :] + s[:, None] + system.lam
    tol = _rtol(d) * max(float(system.values.max()), float(s.max()), system.lam, 0.0)
    Y = R @ system.Q
    Y = torch.where(den > tol, Y / torch.where(den > tol, den, 1.0), 0.0)
    return _out(mean + Y @ system.Q.T, dev)
