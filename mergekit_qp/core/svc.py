"""Singular value calibration (SVC, arXiv 2602.05536): undo spectral over-accumulation.

When K experts share a direction, summing their updates counts it K times and inflates its
singular value. For a merged update Δm = U Σ Vᵀ (out × in) and the experts' own updates Δi:

    a_ir = u_rᵀ Δi          expert i's component along the merged left singular vector u_r
    m_r  = u_rᵀ Δm = σ_r v_rᵀ  the merge's component there
    s_ir = ⟨m_r, a_ir⟩ / ‖a_ir‖²   how many times the merge counts expert i's component
    η_r  = max(α, mean_i s_ir)   if every s_ir > 0 (a direction all experts share), else 1
    σ'_r = σ_r / η_r             singular vectors unchanged

This is the rule of the authors' first code release (their `coef_cal_multi_ranks`, default
α = 1/K; docs/svc.md). The form σ·K / Σ_i max(α, s_ir) would also rescale directions that only some
experts have (boosting a direction unique to one expert by K/(1 + (K−1)α) in a plain sum). Here
only shared directions move: a direction summed K times from K identical components comes back
to single-expert size, one that a single expert owns is left as the merge made it.

Pure torch; no mergekit. Computed in float32, or float64 when the input is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Calibration:
    update: torch.Tensor  # the calibrated merged update, in the input's dtype
    sigma: torch.Tensor  # singular values before
    eta: torch.Tensor  # the divisor of each (1 where the direction is not shared)


def default_alpha(experts: int) -> float:
    return 1.0 / experts


def overlap_scores(merged: torch.Tensor, experts: Sequence[torch.Tensor], u: torch.Tensor, sigma: torch.Tensor,
                   vh: torch.Tensor) -> torch.Tensor:
    """s_ir for every direction r (rows) and expert i (columns).

    A component that is zero to working precision (‖a_ir‖ below ~1e3 ulp of ‖Δi‖) scores 0:
    the expert is absent from that direction. Without this, rounding noise of size ε in an
    orthogonal expert gives s ≈ σ/ε and would wrongly shrink a direction it does not have."""
    tol = 1e3 * torch.finfo(merged.dtype).eps
    scores = []
    for delta in experts:
        a = u.T @ delta  # r × in: a_ir as rows
        norm2 = (a * a).sum(1)
        inner = sigma * (a * vh).sum(1)  # ⟨σ_r v_r, a_ir⟩
        floor = (tol * torch.linalg.matrix_norm(delta)) ** 2
        present = norm2 > floor
        scores.append(torch.where(present, inner / torch.where(present, norm2, torch.ones_like(norm2)),
                                  torch.zeros_like(norm2)))
    return torch.stack(scores, 1)


def calibrate(merged: torch.Tensor, experts: Sequence[torch.Tensor], alpha: Optional[float] = None) -> Calibration:
    """Rescale the singular values of the merged update `merged` (out × in) against the experts'
    updates `experts` (each out × in). `alpha` defaults to 1/K."""
    if merged.ndim != 2:
        raise ValueError(f"singular value calibration needs a 2-D update, got shape {tuple(merged.shape)}")
    if not experts:
        raise ValueError("singular value calibration needs at least one expert update")
    if any(e.shape != merged.shape for e in experts):
        raise ValueError(f"expert updates {[tuple(e.shape) for e in experts]} do not match the merge {tuple(merged.shape)}")
    alpha = default_alpha(len(experts)) if alpha is None else float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"svc_alpha must be finite and > 0; got {alpha}")
    dtype = torch.float64 if merged.dtype == torch.float64 else torch.float32
    dm = merged.to(dtype)
    deltas = [e.to(device=dm.device, dtype=dtype) for e in experts]
    if not bool(torch.isfinite(dm).all()) or not all(bool(torch.isfinite(d).all()) for d in deltas):
        raise ValueError("singular value calibration: the merged or an expert update is not finite (NaN/Inf)")
    try:
        u, sigma, vh = torch.linalg.svd(dm, full_matrices=False)
    except RuntimeError:  # LAPACK did not converge (rare, ill-conditioned float32): retry in float64
        u, sigma, vh = (t.to(dtype) for t in torch.linalg.svd(dm.double(), full_matrices=False))
    scores = overlap_scores(dm, deltas, u, sigma, vh)
    shared = (scores > 0).all(1)
    eta = torch.where(shared, scores.mean(1).clamp_min(alpha), torch.ones_like(sigma))
    update = (u * (sigma / eta)) @ vh
    return Calibration(update.to(merged.dtype), sigma, eta)
