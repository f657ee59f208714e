"""Singular value calibration (SVC, arXiv 2602.05536): undo spectral over-accumulation.

When K experts share a direction, summing their updates counts it K times and inflates its
singular value. For a merged update Δm = U Σ Vᵀ (out × in) and the experts' own updates Δi:

    a_ir = u_rᵀ Δi          expert i's component along the merged left singular vector u_r
    m_r  = u_rᵀ Δm = σ_r v_rᵀ  the merge's component there
    s_ir = ⟨m_r, a_ir⟩ / ‖a_ir‖²   how many times the merge counts expert i's component
    σ'_r = σ_r / η_r             singular vectors unchanged

with one of two divisors η_r (docs/svc.md has their history):

    paper   η_r = mean_i max(α, s_ir)   every direction; the authors' corrected code
            (lyymuwu/SVC "Method Correction", 2026-03-18) and FusionBench's γ_r = K / Σ_i max(α, s_ir)
    shared  η_r = max(α, mean_i s_ir)   only where every s_ir > 0 (a direction all experts share),
            else 1; the authors' first release (2026-02-05)

They agree on a direction all experts share with s_ir ≥ α. Where some expert is absent or
opposed, `paper` counts it as α (so a direction one expert owns in a plain sum is boosted by
K / (1 + (K−1)α)) and `shared` leaves the direction as the merge made it. α defaults to 1/K.

Both rules treat a component that is zero to working precision as absent (s = 0): without that,
rounding noise of an expert orthogonal to a direction gives |s| ≈ σ/ε, which under either rule
would erase or blow up the direction at random.

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
    eta: torch.Tensor  # the divisor of each direction


RULES = ("paper", "shared")
DEFAULT_RULE = "shared"


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


def divisors(scores: torch.Tensor, alpha: float, rule: str) -> torch.Tensor:
    """η_r for each direction (row of `scores`, one column per expert) under `rule`."""
    if rule == "paper":
        return scores.clamp_min(alpha).mean(1)
    if rule == "shared":
        shared = (scores > 0).all(1)
        return torch.where(shared, scores.mean(1).clamp_min(alpha), torch.ones_like(scores[:, 0]))
    raise ValueError(f"svc_rule must be one of {list(RULES)}; got {rule!r}")


def calibrate(merged: torch.Tensor, experts: Sequence[torch.Tensor], alpha: Optional[float] = None,
              rule: str = DEFAULT_RULE) -> Calibration:
    """Rescale the singular values of the merged update `merged` (out × in) against the experts'
    updates `experts` (each out × in). `alpha` defaults to 1/K; `rule` is one of RULES."""
    if rule not in RULES:
        raise ValueError(f"svc_rule must be one of {list(RULES)}; got {rule!r}")
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
    eta = divisors(scores, alpha, rule)
    update = (u * (sigma / eta)) @ vh
    return Calibration(update.to(merged.dtype), sigma, eta)
