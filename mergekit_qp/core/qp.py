"""Closed-form output-space merges of one linear map y = W x (no mergekit, no I/O).

Base W0 (m×d), experts Wk = W0 + Δk, task weights ωk > 0 and per-task input Grams
Gk = Xkᵀ Xk / nk (d×d, symmetric PSD, possibly singular). The merged update Δ minimises

    J(Δ)   = Σk ωk tr((Δ − Δk) Gk (Δ − Δk)ᵀ)  =  tr(Δ Ĝ Δᵀ) − 2 tr(Δ Pᵀ) + E,
    J_λ(Δ) = J(Δ) + λ ‖Δ − Δ̄‖²_F,

with Ĝ = Σ ωk Gk, P = Σ ωk Δk Gk, E = Σ ωk tr(Δk Gk Δkᵀ), Δ̄ = Σ ωk Δk / Σ ωk and
λ = ridge · tr(Ĝ)/d. The ridge is centred on Δ̄, not on 0, so for any ridge ≥ 0 identical
experts give that expert, equal Grams give Δ̄, and directions no data excites get Δ̄.

Everything is solved in float64 on the inputs' device; tensors come back as float32. The
minimiser is always written Δ* = Δ̄ + R (Ĝ + λI)⁻¹ with R = Σ ωk (Δk − Δ̄) Gk = P − Δ̄Ĝ:
solving for the deviation from Δ̄ keeps the special cases exact up to rounding, and where
Ĝ + λI is singular the pseudo-inverse gives the minimiser closest to Δ̄.
"""
from __future__ import annotations

import itertools
import math

import torch

__all__ = [
    "combine_task_vectors", "diagonal_update", "featurewise_affine_update",
    "drift_corrected_task_vector", "full_update", "low_rank_directions", "low_rank_update",
    "rowwise_ridge", "rowwise_update",
    "task_update", "update_spectrum",
]

_F64 = torch.float64
_MAX_ENUMERATED_TASKS = 12


# Eigenvalues below _rtol(n) × the largest count as zero in the pseudo-inverse. A Cholesky
# pivot below _pivot_tol(n) × its diagonal entry means "numerically singular": rank-deficient
# PSD matrices often factorise "successfully" with pivots ~1e-12 of their diagonal.
def _rtol(n: int) -> float:
    return 64 * max(n, 1) * torch.finfo(_F64).eps


def _pivot_tol(n: int) -> float:
    return 1e4 * max(n, 1) * torch.finfo(_F64).eps


# -- validation ------------------------------------------------------------------------------
def _tensor(name: str, x, shape: tuple | None = None, nonneg: bool = False) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=_F64)  # lists: no float32 detour
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if nonneg and bool((t < 0).any()):
        raise ValueError(f"{name} has negative entries; it must be ≥ 0")
    return t


def _seq(name: str, items, count: int, shape: tuple, nonneg: bool = False) -> list[torch.Tensor]:
    """K tensors of one shape, checked (not yet converted: conversion happens one at a time)."""
    if isinstance(items, torch.Tensor) or not hasattr(items, "__len__"):
        items = list(items)
    if len(items) != count:
        raise ValueError(f"{name} has {len(items)} entries; expected {count} (one per task vector)")
    return [_tensor(f"{name}[{k}]", x, shape, nonneg) for k, x in enumerate(items)]


def _validate(task_vectors, weights, ndim: int = 2, name: str = "task_vectors"):
    """Check the task vectors (K tensors of one shape, ndim dims) and weights (K floats > 0).
    Returns (tensors, normalised weights as floats, Σω, device, shape)."""
    if isinstance(task_vectors, torch.Tensor) or not hasattr(task_vectors, "__len__"):
        task_vectors = list(task_vectors)
    if len(task_vectors) == 0:
        raise ValueError(f"{name} is empty; need at least one task vector")
    first = _tensor(f"{name}[0]", task_vectors[0])
    if first.dim() != ndim:
        raise ValueError(f"{name}[0] has shape {tuple(first.shape)}; expected {ndim} dimensions")
    vs = _seq(name, task_vectors, len(task_vectors), tuple(first.shape))
    w, total = _weights(weights, len(vs))
    return vs, w, total, first.device, tuple(first.shape)


def _weights(weights, count: int):
    """(normalised weights as floats, Σω) of K task weights, each finite and > 0."""
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != count:
        raise ValueError(f"weights has {len(w)} entries; expected {count} (one per task vector)")
    for k, x in enumerate(w):
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"weights[{k}] = {x}; task weights must be finite and > 0")
    total = sum(w)
    return [x / total for x in w], total


def _ridge(ridge) -> float:
    ridge = float(ridge)
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge = {ridge}; it must be finite and ≥ 0")
    return ridge


def _f64(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=_F64)


def _out(t: torch.Tensor, device) -> torch.Tensor:
    out = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("the merged update does not fit in float32 (inputs too large)")
    return out


# -- linear algebra ----------------------------------------------------------------------------
def _solve_dev(A: torch.Tensor, R: torch.Tensor, lam: float, overwrite: bool = False) -> torch.Tensor:
    """X with X (A + λI) = R (rows of R; batched over leading dims), i.e. the minimiser of
    tr(X A Xᵀ) − 2 tr(X Rᵀ) + λ‖X‖² (see _factorise)."""
    return _factorise(A, lam, overwrite)(R)


def _factorise(A: torch.Tensor, lam: float, overwrite: bool = False):
    """A solver R ↦ X with X (A + λI) = R, factorising once (the blocked solves reuse it);
    its `invertible` says whether A + λI was (the pseudo-inverse path otherwise).
    Cholesky first; where it fails or a pivot is tiny relative to its diagonal entry (a
    scale-invariant singularity test, so badly scaled but well-posed Grams stay on the fast
    path) the eigen pseudo-inverse: eigenvalues below a relative tolerance count as zero,
    giving the minimum-norm X. `overwrite`: A is symmetric and the caller's to spend."""
    unbatched = A.dim() == 2
    if unbatched:
        A = A[None]
    n = A.shape[-1]
    if overwrite:
        # (A + Aᵀ)/2 is A exactly, and λI only moves the diagonal: three d × d temporaries saved.
        H = A
        H.diagonal(dim1=-2, dim2=-1).add_(lam)
    else:
        H = (A + A.mT) / 2 + lam * torch.eye(n, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(H)
    pivots = L.diagonal(dim1=-2, dim2=-1) ** 2
    ok = (info == 0) & (pivots > _pivot_tol(n) * H.diagonal(dim1=-2, dim2=-1)).all(-1)
    if bool(ok.all()):  # the usual case; no masked copies of (possibly large) H and L
        def solve(R):
            X = torch.cholesky_solve((R[None] if unbatched else R).mT, L).mT
            return X[0] if unbatched else X
        solve.invertible = True
        return solve
    L_ok = L[ok] if bool(ok.any()) else None
    mu, V = torch.linalg.eigh(H[~ok])
    del H, L
    keep = mu > _rtol(n) * mu.amax(-1, keepdim=True).clamp(min=0)
    inv = torch.where(keep, 1 / torch.where(keep, mu, 1.0), 0.0)

    def solve_any(R):
        R = R[None] if unbatched else R
        X = torch.empty_like(R)
        if L_ok is not None:
            X[ok] = torch.cholesky_solve(R[ok].mT, L_ok).mT
        X[~ok] = ((R[~ok] @ V) * inv.unsqueeze(-2)) @ V.mT
        return X[0] if unbatched else X
    solve_any.invertible = False  # the minimum-norm X: callers solve for a deviation instead
    return solve_any


def _sqrt_factor(H: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = H: Cholesky, or V √μ from an eigen-decomposition when H is singular."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L
    mu, V = torch.linalg.eigh((H + H.mT) / 2)
    return V * mu.clamp(min=0).sqrt()


# -- full basis --------------------------------------------------------------------------------
def _symmetric_f64(g: torch.Tensor, device, block: int = 128) -> torch.Tensor:
    """(g + gᵀ)/2 in float64, built in one d × d buffer: blocks of rows at a time instead of
    three full-size temporaries (a 7B down_proj Gram is 1.6 GB in float64). Elementwise the
    same operations as (g + gᵀ)/2, so the same values."""
    out = _f64(g, device)
    if out.data_ptr() == g.data_ptr():
        out = out.clone()  # never symmetrise the caller's tensor in place
    d = out.shape[0]
    for i in range(0, d, block):
        rows = slice(i, min(i + block, d))
        avg = (out[rows, i:] + out[i:, rows].mT) / 2
        out[rows, i:] = avg
        out[i:, rows] = avg.mT
    return out


def _full_stats(task_vectors, grams, weights, ridge):
    """(Δ̄, Ĝ, R, λ, Σω) with normalised weights; the solution is Δ̄ + R (Ĝ + λI)⁻¹. One
    task's float64 Gram at a time: peak 2 d × d float64 buffers whatever K."""
    vs, w, wsum, dev, (m, d) = _validate(task_vectors, weights)
    gs, ridge = _seq("grams", grams, len(vs), (d, d)), _ridge(ridge)
    mean = sum(wk * _f64(v, dev) for wk, v in zip(w, vs))
    G = torch.zeros(d, d, dtype=_F64, device=dev)
    R = torch.zeros(m, d, dtype=_F64, device=dev)
    for wk, v, g in zip(w, vs, gs):
        gk = _symmetric_f64(g, dev)
        term = (_f64(v, dev) - mean) @ gk
        term *= wk
        R += term
        del term
        gk *= wk
        G += gk
        del gk
    return mean, G, R, _scaled_ridge(G, ridge), wsum


def _scaled_ridge(G: torch.Tensor, ridge: float) -> float:
    """λ = ridge · tr(Ĝ)/d (ridge itself where Ĝ has no trace)."""
    tr = float(G.trace())
    return ridge * tr / G.shape[0] if tr > 0 else ridge


def full_update(task_vectors, grams, weights, ridge: float = 0.0) -> torch.Tensor:
    """Δ* = (P + λΔ̄)(Ĝ + λI)⁻¹, the exact minimiser of J_λ (minimum ‖Δ − Δ̄‖ if not unique)."""
    mean, G, R, lam, _ = _full_stats(task_vectors, grams, weights, ridge)
    return _out(mean + _solve_dev(G, R, lam, overwrite=True), mean.device)


def _low_rank_parts(task_vectors, grams, weights, ridge):
    mean, G, R, lam, wsum = _full_stats(task_vectors, grams, weights, ridge)
    full = mean + _solve_dev(G, R, lam)
    L = _sqrt_factor(G + lam * torch.eye(G.shape[0], dtype=_F64, device=G.device))
    U, S, _ = torch.linalg.svd(full @ L, full_matrices=False)
    return full, U, S, wsum


def low_rank_update(task_vectors, grams, weights, ridge: float, rank: int) -> torch.Tensor:
    """Best Δ of rank ≤ N for J_λ (reduced-rank regression): with Ĝ + λI = L Lᵀ,
    J_λ(Δ) = ‖(Δ − Δ*) L‖² + const, so Δ_N = U_N U_Nᵀ Δ*, U_N the top-N left singular
    vectors of Δ* L. rank ≥ min(m, d) gives Δ* itself."""
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank = {rank!r}; it must be an integer ≥ 1")
    if rank >= min(_validate(task_vectors, weights)[4]):
        return full_update(task_vectors, grams, weights, ridge)
    full, U, _, _ = _low_rank_parts(task_vectors, grams, weights, ridge)
    U = U[:, : int(rank)]
    return _out(U @ (U.mT @ full), full.device)


def low_rank_directions(task_vectors, grams, weights, ridge: float = 0.0):
    """(Δ*, U): the full-basis minimiser of J_λ and the output-space directions (columns of U,
    best first) from which `low_rank_update` builds Δ_N = U_N U_Nᵀ Δ* for N < min(m, d).
    Both float64, so that every rank of a spectrum is evaluated from one factorisation."""
    full, U, _, _ = _low_rank_parts(task_vectors, grams, weights, ridge)
    return full, U


def update_spectrum(task_vectors, grams, weights, ridge: float = 0.0) -> torch.Tensor:
    """Squared singular values of Δ* L (descending, in the units of J with the given ω):
    the J_λ that a rank-N update gives up is the sum of the entries after the N-th.
    Returned as float64, since these energies can exceed float32's range."""
    _, _, S, wsum = _low_rank_parts(task_vectors, grams, weights, ridge)
    return S.square() * wsum


# -- diagonal / row-wise / feature-wise ----------------------------------------------------------
def _diagonal_merge(vs, w, dev, diags, ridge, n, axis, lam=None):
    """Per column (axis=-1) or row (axis=0) i: (Σ ωk gki Δk + λ Δ̄) / (Σ ωk gki + λ),
    λ = ridge · Σi Σk ωk gki / n unless given; Δ̄ where the denominator vanishes."""
    def shaped(g):
        return g.unsqueeze(0) if axis == -1 else g.unsqueeze(-1)
    mean = sum(wk * _f64(v, dev) for wk, v in zip(w, vs))
    num = torch.zeros_like(mean)
    den = torch.zeros_like(shaped(_f64(diags[0], dev)))
    for wk, v, g in zip(w, vs, diags):
        gk = shaped(_f64(g, dev))
        num += wk * gk * _f64(v, dev)
        den += wk * gk
    if lam is None:
        lam = _ridge(ridge) * float(den.sum()) / n
    den = den + lam
    safe = torch.where(den > 0, den, 1.0)
    return torch.where(den > 0, (num + lam * mean) / safe, mean)


def diagonal_update(task_vectors, gram_diagonals, weights, ridge: float = 0.0) -> torch.Tensor:
    """Every Gk replaced by diag(Gk): column j of Δ* is (Σk ωk gkj Δk[:,j] + λ Δ̄[:,j]) /
    (Σk ωk gkj + λ), λ = ridge · Σj Σk ωk gkj / d. Exact when the Grams are diagonal."""
    vs, w, _, dev, (m, d) = _validate(task_vectors, weights)
    diags = _seq("gram_diagonals", gram_diagonals, len(vs), (d,), nonneg=True)
    return _out(_diagonal_merge(vs, w, dev, diags, ridge, d, -1), dev)


def rowwise_update(task_vectors, row_counts, weights, ridge: float = 0.0, lam: float | None = None) -> torch.Tensor:
    """Embeddings (one-hot inputs, so the Grams are diagonal over rows): row t of Δ* is
    (Σk ωk ckt Δk[t] + λ Δ̄[t]) / (Σk ωk ckt + λ), λ = ridge · Σt Σk ωk ckt / m, with ckt
    the normalised frequency of token t for task k. Rows no task saw get Δ̄[t]. Rows are
    independent given λ: a caller solving a block of rows passes `lam` from every row's
    counts (rowwise_ridge)."""
    vs, w, _, dev, (m, d) = _validate(task_vectors, weights)
    counts = _seq("row_counts", row_counts, len(vs), (m,), nonneg=True)
    return _out(_diagonal_merge(vs, w, dev, counts, ridge, m, 0, lam), dev)


def rowwise_ridge(row_counts, weights, ridge: float) -> float:
    """rowwise_update's λ over all rows: ridge · Σt Σk ωk ckt / m."""
    w, _ = _weights(weights, len(row_counts))
    total = sum(wk * float(_f64(c, c.device).sum()) for wk, c in zip(w, row_counts))
    return _ridge(ridge) * total / row_counts[0].shape[0]


def featurewise_affine_update(scale_deltas, bias_deltas, second_moments, first_moments, weights,
                              ridge: float = 0.0):
    """Norm layers y_j = γ_j x̃_j + β_j: per feature j a weighted least squares for
    (Δγ_j, Δβ_j) with per-task Gram [[E x̃², E x̃], [E x̃, 1]], ridge centred on the weighted
    averages with λ = ridge · mean_j Σk ωk E x̃²_kj, solved as d batched 2×2 systems. Without
    biases (RMSNorm; first_moments is then unused and may be None) it is the 1-parameter
    rule Δγ_j = (Σ ωk m2kj Δγkj + λ Δγ̄j) / (Σ ωk m2kj + λ).
    Returns (scale_update, bias_update or None)."""
    vs, w, _, dev, (d,) = _validate(scale_deltas, weights, ndim=1, name="scale_deltas")
    K = len(vs)
    m2 = _seq("second_moments", second_moments, K, (d,), nonneg=True)
    if bias_deltas is None:
        rows = [v.reshape(1, d) for v in vs]  # a 1×d "matrix": the diagonal rule is exact here
        return _out(_diagonal_merge(rows, w, dev, m2, ridge, d, -1)[0], dev), None
    bs = _seq("bias_deltas", bias_deltas, K, (d,))
    m1 = _seq("first_moments", first_moments, K, (d,))
    theta = torch.stack([torch.stack([_f64(v, dev), _f64(b, dev)], -1) for v, b in zip(vs, bs)])
    mean = torch.einsum("k,kjp->jp", torch.tensor(w, dtype=_F64, device=dev), theta)
    G = torch.zeros(d, 2, 2, dtype=_F64, device=dev)
    R = torch.zeros(d, 1, 2, dtype=_F64, device=dev)
    for wk, th, a, b in zip(w, theta, m2, m1):
        a, b = _f64(a, dev), _f64(b, dev)
        gk = torch.stack([torch.stack([a, b], -1), torch.stack([b, torch.ones_like(b)], -1)], -2)
        G += wk * gk
        R += wk * ((th - mean).unsqueeze(-2) @ gk)
    lam = _ridge(ridge) * float(G[:, 0, 0].mean())
    upd = mean + _solve_dev(G, R, lam)[:, 0, :]
    return _out(upd[:, 0], dev), _out(upd[:, 1], dev)


# -- task basis ------------------------------------------------------------------------------------
def combine_task_vectors(task_vectors, coefficients) -> torch.Tensor:
    """Task arithmetic Σj cj Δj (float64 accumulation, float32 result)."""
    vs, _, _, dev, _ = _validate(task_vectors, [1.0] * len(task_vectors))
    c = _tensor("coefficients", coefficients, (len(vs),)).to(_F64).tolist()
    return _out(sum(cj * _f64(v, dev) for cj, v in zip(c, vs)), dev)


def _sum_zero_basis(n: int, device) -> torch.Tensor:
    """Orthonormal basis (n×(n−1), Helmert) of the vectors whose entries sum to zero."""
    i = torch.arange(1, n, dtype=_F64, device=device)
    rows = torch.arange(n, dtype=_F64, device=device)[:, None]
    return ((rows < i).to(_F64) - i * (rows == i).to(_F64)) / torch.sqrt(i * (i + 1))


def _equality_qp(M, b, centre, lam, sum_to_one):
    """Batched over the leading dim: argmin cᵀMc − 2bᵀc + λ‖c − centre‖² [s.t. Σc = 1], the
    one closest to centre if not unique. The constraint is removed by writing c = p + Z y,
    p the projection of centre on the plane Σc = 1 and Z an orthonormal basis of 1⊥."""
    n = M.shape[-1]
    if not sum_to_one:
        r = b - (M @ centre.unsqueeze(-1))[..., 0]
        return centre + _solve_dev(M, r.unsqueeze(-2), lam)[..., 0, :]
    p = centre + (1 - centre.sum(-1, keepdim=True)) / n
    if n == 1:
        return p
    Z = _sum_zero_basis(n, M.device)
    r = (b - (M @ p.unsqueeze(-1))[..., 0]) @ Z
    return p + _solve_dev(Z.mT @ M @ Z, r.unsqueeze(-2), lam)[..., 0, :] @ Z.mT


def _coefficients(M, b, cbar, lam, nonneg, sum_to_one):
    """Exact minimiser of cᵀMc − 2bᵀc + λ‖c − c̄‖² over the feasible set. With nonneg, each
    support S gets its equality-constrained minimiser (stationary on S); among those that
    are ≥ 0 the least objective wins. A minimiser with minimal support is the unique
    stationary point on that support, so it is among the candidates: the result is exact.
    Supports of one size are solved as one batch (tiny LAPACK calls are costly one by one)."""
    K = M.shape[0]

    def feasible(c):
        return (c >= -1e-12 * c.abs().amax(-1, keepdim=True).clamp(min=1)).all(-1)

    c = _equality_qp(M[None], b[None], cbar[None], lam, sum_to_one)
    if not nonneg or bool(feasible(c)):  # the relaxation's optimum is feasible
        return c[0].clamp(min=0) if nonneg else c[0]
    cands = [] if sum_to_one else [torch.zeros(1, K, dtype=_F64, device=M.device)]
    for size in range(1, K + 1):
        idx = torch.tensor(list(itertools.combinations(range(K), size)), device=M.device)
        sol = _equality_qp(M[idx[:, :, None], idx[:, None, :]], b[idx], cbar[idx], lam, sum_to_one)
        cands.append(torch.zeros(len(idx), K, dtype=_F64, device=M.device).scatter(1, idx, sol))
    cands = torch.cat(cands)
    f = ((cands @ M) * cands).sum(-1) - 2 * cands @ b + lam * (cands - cbar).square().sum(-1)
    best = cands[torch.where(feasible(cands), f, math.inf).argmin()].clamp(min=0)
    return best / best.sum() if sum_to_one else best


def task_update(task_vectors, grams, weights, ridge: float = 0.0, nonneg: bool = False,
                sum_to_one: bool = False):
    """Δ = Σj cj Δj with c minimising cᵀMc − 2bᵀc + λ'‖c − c̄‖² (c̄ = ω/Σω, λ' = ridge ·
    tr(M)/K), Mjl = Σk ωk tr(Δj Gk Δlᵀ), bj = Σk ωk tr(Δj Gk Δkᵀ), optionally with c ≥ 0
    and/or Σc = 1. Returns (update float32, coefficients float64)."""
    vs, w, _, dev, (m, d) = _validate(task_vectors, weights)
    K = len(vs)
    gs, ridge = _seq("grams", grams, K, (d, d)), _ridge(ridge)
    if nonneg and K > _MAX_ENUMERATED_TASKS:
        raise ValueError(f"nonneg task basis enumerates supports; K = {K} > {_MAX_ENUMERATED_TASKS}")
    D = torch.stack([_f64(v, dev) for v in vs])
    M = torch.zeros(K, K, dtype=_F64, device=dev)
    b = torch.zeros(K, dtype=_F64, device=dev)
    for k, (wk, g) in enumerate(zip(w, gs)):
        gk = _f64(g, dev)
        gk = (gk + gk.mT) / 2
        for j in range(K):  # one m×d product Δj Gk at a time; its inner products with all Δl
            row = torch.tensordot(D, D[j] @ gk, dims=2)
            M[j] += wk * row
            b[j] += wk * row[k]
    M = (M + M.mT) / 2
    cbar = torch.tensor(w, dtype=_F64, device=dev)
    tr = float(M.trace())
    lam = ridge * tr / K if tr > 0 else ridge
    c = _coefficients(M, b, cbar, lam, nonneg, sum_to_one)
    return combine_task_vectors(vs, c), c


# -- sequential merging: the expert-output target ------------------------------------------------
def drift_corrected_task_vector(task_vector, expert_weight, cross, gram, eps: float = 1e-4) -> torch.Tensor:
    """The task vector Δ'k for which the independent-form objective on the merged model's
    inputs X̂ equals, up to a constant, the error against the expert's own outputs Xk Wkᵀ:

        Δ'k = Δk + Wk (Ck − Ĝk)(Ĝk + εI)⁻¹,   Ck = Xkᵀ X̂ / n,  Ĝk = X̂ᵀ X̂ / n,

    so that Δ'k Ĝk = Wk Ck − W0 Ĝk = Pk (the target's cross term). The correction is the
    regression of the expert's true output on the merged inputs minus its output on them;
    its rows lie in the span of Ĝk, so directions no merged input excites keep Δk. ε is
    relative to tr(Ĝk)/d and damps near-null directions: statistics summed in float32 put
    noise of ~1e-7 of the trace there, which an undamped inverse would turn into large
    corrections (measured in tests/test_sequential.py). Batched over leading dims
    (norm layers solve one small system per feature). float64 in, float64 out."""
    v = torch.as_tensor(task_vector, dtype=_F64)
    w = torch.as_tensor(expert_weight, dtype=_F64, device=v.device)
    c = torch.as_tensor(cross, dtype=_F64, device=v.device)
    g = torch.as_tensor(gram, dtype=_F64, device=v.device)
    for name, t in (("task_vector", v), ("expert_weight", w), ("cross", c), ("gram", g)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    n = g.shape[-1]
    # X (Ĝ + ε s I) = R  ⇔  X (Ĝ/s + ε I) = R/s, with s = tr(Ĝ)/d per system (scale-free ε).
    scale = (g.diagonal(dim1=-2, dim2=-1).sum(-1) / n).clamp(min=torch.finfo(_F64).tiny)[..., None, None]
    correction = _solve_dev(g / scale, (w @ (c - g)) / scale, eps)
    return v + correction
