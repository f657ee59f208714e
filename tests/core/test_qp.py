"""Tests of mergekit_qp.qp against independent brute-force least squares on explicit inputs."""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings, strategies as st

from mergekit_qp.core.objective import objective as evaluate_objective
from mergekit_qp.core import qp

F64 = torch.float64
SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every matrix here is tiny; with several threads MKL spends milliseconds per LAPACK
    call on synchronisation (8 ms vs 5 µs for a 4×4 Cholesky on a 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- problem generation and brute-force references -------------------------------------------------
def make_problem(seed, m, d, nks, weights, kind="plain"):
    """Explicit inputs Xk (nk×d, float64) and float32 task vectors; Grams Gk = XkᵀXk/nk."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for nk in nks:
        x = torch.randn(nk, d, generator=g, dtype=F64)
        if kind == "dup" and d >= 2:  # duplicated column: Ĝ rank-deficient whatever nk is
            x[:, -1] = x[:, 0]
        if kind == "scaled":  # badly scaled columns, condition numbers up to ~1e16
            x = x * 10 ** (8 * torch.rand(d, generator=g, dtype=F64) - 4)
        xs.append(x)
    deltas = [torch.randn(m, d, generator=g, dtype=F64).float() for _ in nks]
    grams = [x.T @ x / x.shape[0] for x in xs]
    return xs, deltas, grams, list(weights)


def mean_delta(deltas, weights):
    return sum(w * dk.double() for w, dk in zip(weights, deltas)) / sum(weights)


def ridge_lambda(grams, weights, ridge):
    tr = float(sum(w * g.trace() for w, g in zip(weights, grams)))
    return ridge * tr / grams[0].shape[0] if tr > 0 else ridge


def brute_full(xs, deltas, weights, ridge, centred=False):
    """argmin Σ ωk/nk ‖Xk Δᵀ − Xk Δkᵀ‖² + λ‖Δ − Δ̄‖² by lstsq on stacked rows (min-norm).
    centred=True solves for Δ − Δ̄, giving the minimiser closest to Δ̄."""
    d = xs[0].shape[1]
    mean = mean_delta(deltas, weights)
    lam = ridge_lambda([x.T @ x / x.shape[0] for x in xs], weights, ridge)
    shift = mean if centred else torch.zeros_like(mean)
    rows = [math.sqrt(w / x.shape[0]) * x for w, x in zip(weights, xs)]
    targets = [r @ (dk.double() - shift).T for r, dk in zip(rows, deltas)]
    rows.append(math.sqrt(lam) * torch.eye(d, dtype=F64))
    targets.append(math.sqrt(lam) * (mean - shift).T)
    sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution
    return sol.T + shift


def J_brute(delta, xs, deltas, weights, ridge=0.0):
    """J_λ(Δ) from the explicit inputs."""
    delta = delta.double()
    J = sum(w / x.shape[0] * (x @ (delta - dk.double()).T).square().sum() for w, x, dk in zip(weights, xs, deltas))
    lam = ridge_lambda([x.T @ x / x.shape[0] for x in xs], weights, ridge)
    return float(J + lam * (delta - mean_delta(deltas, weights)).square().sum())


def energy(xs, deltas, weights):
    return J_brute(torch.zeros_like(deltas[0]), xs, deltas, weights)


problems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "m": st.integers(1, 5),
        "d": st.integers(1, 6),
        "K": st.integers(1, 4),
        "kind": st.sampled_from(["plain", "dup", "scaled"]),
        "ridge": st.sampled_from([0.0, 0.0, 1e-6, 1e-2, 1.0, 100.0]),
        "data": st.data(),
    }
)


def draw(p):
    nks = p["data"].draw(st.lists(st.integers(1, 2 * p["d"] + 2), min_size=p["K"], max_size=p["K"]))
    weights = p["data"].draw(st.lists(st.floats(0.1, 10.0), min_size=p["K"], max_size=p["K"]))
    return make_problem(p["seed"], p["m"], p["d"], nks, weights, p["kind"])


def well_posed(xs, ridge):
    return ridge > 0 or torch.linalg.matrix_rank(torch.cat(xs)).item() == xs[0].shape[1]


def assert_close_to(actual, expected, rtol=1e-4):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


# -- full basis ------------------------------------------------------------------------------------
@SETTINGS
@given(problems)
def test_full_update_matches_lstsq(p):
    xs, deltas, grams, weights = draw(p)
    ridge = p["ridge"]
    ours = qp.full_update(deltas, grams, weights, ridge)
    assert ours.dtype == torch.float32 and ours.shape == deltas[0].shape
    ref = brute_full(xs, deltas, weights, ridge)
    j_ours, j_ref = J_brute(ours, xs, deltas, weights, ridge), J_brute(ref, xs, deltas, weights, ridge)
    assert abs(j_ours - j_ref) <= 1e-6 * (energy(xs, deltas, weights) + j_ref) + 1e-12
    if well_posed(xs, ridge) and p["kind"] != "scaled":
        assert_close_to(ours, ref)
    elif well_posed(xs, ridge):  # badly scaled: compare in the metric of J_λ, ‖(Δ − Δref) L‖²
        L = sqrt_factor(grams, weights, ridge)
        gap = float(((ours.double() - ref) @ L).square().sum())
        assert gap <= 1e-8 * (energy(xs, deltas, weights) + float((ref @ L).square().sum())) + 1e-30


def test_full_update_singular_is_closest_to_mean():
    """Ridge 0, Ĝ singular (a zero column and a duplicated column): the minimiser closest
    to Δ̄, i.e. null directions of Ĝ keep Δ̄; same null-space property for ridge > 0."""
    xs, deltas, grams, weights = make_problem(1, 3, 5, [3, 4, 2], [1.0, 2.0, 0.5])
    for x in xs:
        x[:, 1] = 0.0
        x[:, 4] = x[:, 2]
    grams = [x.T @ x / x.shape[0] for x in xs]
    mean = mean_delta(deltas, weights)
    for ridge in (0.0, 1e-3, 10.0):
        ours = qp.full_update(deltas, grams, weights, ridge).double()
        assert_close_to(ours[:, 1], mean[:, 1], rtol=1e-6)
        assert_close_to(ours[:, 2] - ours[:, 4], mean[:, 2] - mean[:, 4], rtol=1e-6)
    ours0 = qp.full_update(deltas, grams, weights, 0.0)
    assert_close_to(ours0, brute_full(xs, deltas, weights, 0.0, centred=True), rtol=1e-6)
    # the uncentred minimum-norm solution would put 0 in the unexcited column instead
    assert float(brute_full(xs, deltas, weights, 0.0)[:, 1].abs().max()) < 1e-10 < float(mean[:, 1].abs().max())


@pytest.mark.parametrize("seed", range(24))
def test_full_update_numerically_singular(seed):
    """Fewer samples than features: Ĝ is singular only up to rounding, so a Cholesky
    factorisation may "succeed" with tiny pivots; the null space of the data must still
    keep Δ̄ instead of amplified rounding noise."""
    xs, deltas, grams, weights = make_problem(100 + seed, 3, 9, [3, 2, 2], [1.0, 2.0, 0.7])
    null = torch.linalg.svd(torch.cat(xs))[2][7:].T  # 9×2 basis of the unexcited directions
    mean = mean_delta(deltas, weights)
    ours = qp.full_update(deltas, grams, weights, 0.0).double()
    assert_close_to(ours @ null, mean @ null, rtol=1e-5)
    assert_close_to(ours, brute_full(xs, deltas, weights, 0.0, centred=True), rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_full_update_singular_and_badly_scaled(seed):
    """A duplicated column plus column scales over 4 decades (Ĝ's eigenvalues span ~1e12):
    the pseudo-inverse must drop only the true null direction, not the small-but-real ones."""
    xs, deltas, _, weights = make_problem(200 + seed, 3, 6, [5, 6, 4], [1.0, 0.5, 2.0], kind="dup")
    xs = [x * torch.logspace(-2, 2, 6, dtype=F64) for x in xs]
    grams = [x.T @ x / x.shape[0] for x in xs]
    ours = qp.full_update(deltas, grams, weights, 0.0).double()
    assert_close_to(ours, brute_full(xs, deltas, weights, 0.0, centred=True), rtol=1e-5)


# -- special cases, every basis ------------------------------------------------------------------------
@pytest.mark.parametrize("ridge", [0.0, 1e-4, 1.0, 1e3])
def test_identical_experts_give_that_expert(ridge):
    xs, deltas, grams, weights = make_problem(2, 4, 5, [3, 6, 2], [1.0, 3.0, 0.2])
    u = torch.randn(4, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    same = [(u @ torch.randn(1, 5, dtype=F64, generator=torch.Generator().manual_seed(1))).float()] * 3
    exact = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(qp.full_update(same, grams, weights, ridge), same[0], **exact)
    diags = [g.diagonal() for g in grams]
    torch.testing.assert_close(qp.diagonal_update(same, diags, weights, ridge), same[0], **exact)
    update, c = qp.task_update(same, grams, weights, ridge)
    torch.testing.assert_close(update, same[0], **exact)
    for flags in [(True, False), (False, True), (True, True)]:
        torch.testing.assert_close(qp.task_update(same, grams, weights, ridge, *flags)[0], same[0], **exact)
    torch.testing.assert_close(qp.low_rank_update(same, grams, weights, ridge, 1), same[0], **exact)
    counts = [torch.rand(4, dtype=F64) for _ in range(3)]
    torch.testing.assert_close(qp.rowwise_update(same, counts, weights, ridge), same[0], **exact)
    vec = [same[0][0]] * 3
    m2 = [torch.rand(5, dtype=F64) + 1 for _ in range(3)]
    m1 = [torch.rand(5, dtype=F64) for _ in range(3)]
    scale, bias = qp.featurewise_affine_update(vec, vec, m2, m1, weights, ridge)
    torch.testing.assert_close(scale, vec[0], **exact)
    torch.testing.assert_close(bias, vec[0], **exact)
    assert qp.featurewise_affine_update(vec, None, m2, None, weights, ridge)[1] is None
    torch.testing.assert_close(qp.featurewise_affine_update(vec, None, m2, None, weights, ridge)[0], vec[0], **exact)


@pytest.mark.parametrize("ridge", [0.0, 1e-2, 10.0])
@pytest.mark.parametrize("nk", [2, 12])  # singular and regular shared Gram
def test_equal_grams_give_weighted_average(ridge, nk):
    xs, deltas, _, weights = make_problem(3, 3, 6, [nk] * 4, [0.5, 1.0, 2.0, 4.0])
    gram = xs[0].T @ xs[0] / nk
    grams = [gram] * 4
    mean = mean_delta(deltas, weights)
    assert_close_to(qp.full_update(deltas, grams, weights, ridge), mean, rtol=1e-6)
    assert_close_to(qp.diagonal_update(deltas, [gram.diagonal()] * 4, weights, ridge), mean, rtol=1e-6)
    assert_close_to(qp.task_update(deltas, grams, weights, ridge)[0], mean, rtol=1e-6)
    assert_close_to(qp.low_rank_update(deltas, grams, weights, ridge, 3), mean, rtol=1e-6)
    counts = [torch.rand(3, dtype=F64, generator=torch.Generator().manual_seed(5))] * 4
    assert_close_to(qp.rowwise_update(deltas, counts, weights, ridge), mean, rtol=1e-6)
    m2 = gram.diagonal() + 1
    m1 = 0.9 * m2.sqrt() * (2 * torch.rand(6, dtype=F64) - 1)  # E[x]² ≤ E[x²]
    scale, bias = qp.featurewise_affine_update(
        [dk[0] for dk in deltas], [dk[1] for dk in deltas], [m2] * 4, [m1] * 4, weights, ridge)
    assert_close_to(scale, mean[0], rtol=1e-6)
    assert_close_to(bias, mean[1], rtol=1e-6)


def test_combine_task_vectors_is_task_arithmetic():
    _, deltas, grams, weights = make_problem(4, 5, 4, [3, 3, 3], [1.0, 1.0, 1.0])
    w0 = torch.randn(5, 4)
    c = [0.3, -1.25, 0.7]
    reference = sum(cj * dk.double() for cj, dk in zip(c, deltas)).float()
    assert torch.equal(qp.combine_task_vectors(deltas, c), reference)
    assert torch.equal(w0 + qp.combine_task_vectors(deltas, c), w0 + reference)
    update, coefficients = qp.task_update(deltas, grams, weights, 0.1, nonneg=True)
    assert torch.equal(update, qp.combine_task_vectors(deltas, coefficients))


# -- diagonal basis ------------------------------------------------------------------------------------
@SETTINGS
@given(problems)
def test_diagonal_update_exact_for_diagonal_grams(p):
    _, deltas, _, weights = draw(p)
    K, d = len(deltas), deltas[0].shape[1]
    g = torch.Generator().manual_seed(p["seed"])
    diags = [torch.rand(d, generator=g, dtype=F64) * (torch.rand(d, generator=g) > 0.3) for _ in range(K)]
    # explicit inputs with diagonal Gram: Xk = diag(√(d·gk)), nk = d
    xs = [torch.diag((d * dg).sqrt()) for dg in diags]
    ours = qp.diagonal_update(deltas, diags, weights, p["ridge"])
    assert_close_to(ours, brute_full(xs, deltas, weights, p["ridge"], centred=True), rtol=1e-5)
    assert_close_to(ours, qp.full_update(deltas, [torch.diag(dg) for dg in diags], weights, p["ridge"]), rtol=1e-5)


@SETTINGS
@given(problems)
def test_diagonal_update_closed_form(p):
    _, deltas, grams, weights = draw(p)
    ridge, d = p["ridge"], deltas[0].shape[1]
    mean = mean_delta(deltas, weights)
    lam = ridge * sum(w * float(g.trace()) for w, g in zip(weights, grams)) / d
    expected = mean.clone()
    for j in range(d):
        den = sum(w * float(g[j, j]) for w, g in zip(weights, grams)) + lam
        if den > 0:
            num = sum(w * float(g[j, j]) * dk[:, j].double() for w, g, dk in zip(weights, grams, deltas))
            expected[:, j] = (num + lam * mean[:, j]) / den
    ours = qp.diagonal_update(deltas, [g.diagonal() for g in grams], weights, ridge)
    assert_close_to(ours, expected, rtol=1e-5)


# -- task basis -------------------------------------------------------------------------------------
def task_brute(xs, deltas, weights, ridge):
    """Explicit least-squares design over c: columns vec(Xk Δjᵀ)·√(ωk/nk); returns M, b, λ', c̄."""
    K = len(deltas)
    cols = torch.stack([
        torch.cat([(math.sqrt(w / x.shape[0]) * x @ dj.double().T).flatten() for w, x in zip(weights, xs)])
        for dj in deltas], 1)
    y = torch.cat([(math.sqrt(w / x.shape[0]) * x @ dk.double().T).flatten() for w, x, dk in zip(weights, xs, deltas)])
    M, b = cols.T @ cols, cols.T @ y
    lam = ridge * float(M.trace()) / K if float(M.trace()) > 0 else ridge
    cbar = torch.tensor(weights, dtype=F64) / sum(weights)
    return cols, y, M, b, lam, cbar


def task_f(c, M, b, lam, cbar):
    c = torch.as_tensor(c, dtype=F64)
    return float(c @ M @ c - 2 * b @ c + lam * (c - cbar).square().sum())


@SETTINGS
@given(problems)
def test_task_update_unconstrained_matches_lstsq(p):
    xs, deltas, grams, weights = draw(p)
    cols, y, M, b, lam, cbar = task_brute(xs, deltas, weights, p["ridge"])
    K = len(deltas)
    A = torch.cat([cols, math.sqrt(lam) * torch.eye(K, dtype=F64)])
    t = torch.cat([y, math.sqrt(lam) * cbar])
    ref = torch.linalg.lstsq(A, t, driver="gelsd").solution
    update, c = qp.task_update(deltas, grams, weights, p["ridge"])
    scale = float(y.square().sum()) + 1e-300
    assert task_f(c, M, b, lam, cbar) <= task_f(ref, M, b, lam, cbar) + 1e-7 * scale
    if torch.linalg.cond(M + lam * torch.eye(K, dtype=F64)) < 1e6:
        torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(update, qp.combine_task_vectors(deltas, c))


def assert_kkt(c, M, b, lam, cbar, nonneg, sum_to_one, tol):
    """Independent optimality certificate: gradient g of the objective satisfies
    g_i = ν on the support (ν = 0 without Σc = 1) and g_i ≥ ν where c_i = 0."""
    g = 2 * (M @ c - b + lam * (c - cbar))
    free = c > 1e-9 if nonneg else torch.ones_like(c, dtype=torch.bool)
    nu = float(g[free].mean()) if sum_to_one else 0.0
    assert torch.all((g[free] - nu).abs() <= tol)
    if nonneg:
        assert torch.all(g[~free] >= nu - tol)


@settings(max_examples=40, deadline=None)
@given(problems, st.booleans(), st.booleans())
def test_task_update_constrained(p, nonneg, sum_to_one):
    xs, deltas, grams, weights = draw(p)
    K = len(deltas)
    _, y, M, b, lam, cbar = task_brute(xs, deltas, weights, p["ridge"])
    update, c = qp.task_update(deltas, grams, weights, p["ridge"], nonneg=nonneg, sum_to_one=sum_to_one)
    assert c.dtype == F64 and c.shape == (K,)
    if nonneg:
        assert torch.all(c >= 0)
    if sum_to_one:
        assert abs(float(c.sum()) - 1) < 1e-9
    scale = float(y.square().sum()) + float(M.trace()) + 1e-300
    f = task_f(c, M, b, lam, cbar)
    assert_kkt(c, M, b, lam, cbar, nonneg, sum_to_one, tol=1e-6 * (scale + float(b.abs().max())))
    # no random feasible point does better
    g = torch.Generator().manual_seed(p["seed"])
    for _ in range(200):
        r = torch.randn(K, generator=g, dtype=F64) * 2
        r = r.abs() if nonneg else r
        if sum_to_one:
            r = r / r.sum() if nonneg else r - (r.sum() - 1) / K
        assert f <= task_f(r, M, b, lam, cbar) + 1e-8 * scale
    # nor does scipy's SLSQP from the weighted average
    cons = [{"type": "eq", "fun": lambda v: v.sum() - 1}] if sum_to_one else []
    res = scipy.optimize.minimize(
        lambda v: task_f(v, M, b, lam, cbar), cbar.numpy(), method="SLSQP",
        jac=lambda v: (2 * (M @ torch.as_tensor(v) - b + lam * (torch.as_tensor(v) - cbar))).numpy(),
        bounds=[(0, None)] * K if nonneg else None, constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
    feasible = (not nonneg or np.all(res.x >= -1e-9)) and (not sum_to_one or abs(res.x.sum() - 1) < 1e-7)
    if feasible:
        assert f <= task_f(res.x, M, b, lam, cbar) + 1e-7 * scale


def test_task_update_two_tasks_grid():
    """K = 2, c ≥ 0, Σc = 1: a dense grid over c = (t, 1 − t) finds nothing better."""
    xs, deltas, grams, weights = make_problem(7, 4, 3, [5, 2], [1.0, 3.0])
    deltas[1] = (-2 * deltas[0].double() + 0.1 * deltas[1].double()).float()
    for ridge in (0.0, 0.5):
        _, _, M, b, lam, cbar = task_brute(xs, deltas, weights, ridge)
        _, c = qp.task_update(deltas, grams, weights, ridge, nonneg=True, sum_to_one=True)
        t = torch.linspace(0, 1, 20001, dtype=F64)
        C = torch.stack([t, 1 - t], 1)
        grid = float((((C @ M) * C).sum(1) - 2 * C @ b + lam * (C - cbar).square().sum(1)).min())
        assert task_f(c, M, b, lam, cbar) <= grid + 1e-12 * abs(grid)


def test_task_update_nonneg_enumerates_exactly():
    """Brute-force enumeration written here: over all supports, solve the restricted
    normal equations densely, keep the nonnegative ones, take the least objective."""
    xs, deltas, grams, weights = make_problem(8, 3, 4, [4, 3, 5, 2], [1.0, 0.5, 2.0, 1.0])
    deltas[2] = (-deltas[0].double() - deltas[1].double()).float()  # force some c = 0
    cols, y, M, b, lam, cbar = task_brute(xs, deltas, weights, 0.0)
    best = math.inf
    for r in range(0, 5):
        for S in itertools.combinations(range(4), r):
            c = torch.zeros(4, dtype=F64)
            if S:
                c[list(S)] = torch.linalg.lstsq(cols[:, list(S)], y, driver="gelsd").solution
            if torch.all(c >= 0):
                best = min(best, task_f(c, M, b, lam, cbar))
    _, c = qp.task_update(deltas, grams, weights, 0.0, nonneg=True)
    assert abs(task_f(c, M, b, lam, cbar) - best) <= 1e-9 * float(y.square().sum())


def test_task_update_nonneg_limit():
    deltas = [torch.randn(2, 2) for _ in range(13)]
    grams = [torch.eye(2)] * 13
    with pytest.raises(ValueError, match="K = 13"):
        qp.task_update(deltas, grams, [1.0] * 13, 0.0, nonneg=True)
    qp.task_update(deltas, grams, [1.0] * 13, 0.0)  # unconstrained has no limit


# -- low-rank basis -----------------------------------------------------------------------------------
def Jl(delta, deltas, grams, weights, ridge):
    """J_λ from the Grams (the sufficient statistics), float64."""
    delta = delta.double()
    J = sum(w * float(((delta - dk.double()) @ g * (delta - dk.double())).sum()) for w, g, dk in zip(weights, grams, deltas))
    return J + ridge_lambda(grams, weights, ridge) * float((delta - mean_delta(deltas, weights)).square().sum())


def sqrt_factor(grams, weights, ridge):
    G = sum(w * g for w, g in zip(weights, grams))
    mu, V = torch.linalg.eigh(G + ridge_lambda(grams, weights, ridge) * torch.eye(G.shape[0], dtype=F64))
    return V * mu.clamp(min=0).sqrt()


@settings(max_examples=25, deadline=None)
@given(problems)
def test_low_rank_update(p):
    xs, deltas, grams, weights = draw(p)
    ridge, (m, d) = p["ridge"], deltas[0].shape
    full = qp.full_update(deltas, grams, weights, ridge)
    assert torch.equal(qp.low_rank_update(deltas, grams, weights, ridge, min(m, d)), full)
    assert torch.equal(qp.low_rank_update(deltas, grams, weights, ridge, min(m, d) + 3), full)
    spectrum = qp.update_spectrum(deltas, grams, weights, ridge)
    L = sqrt_factor(grams, weights, ridge)
    total = float((full.double() @ L).square().sum())
    assert abs(float(spectrum.sum()) - total) <= 1e-5 * total + 1e-12
    assert torch.all(spectrum[:-1] >= spectrum[1:])
    j_full = Jl(full, deltas, grams, weights, ridge)
    scale = energy(xs, deltas, weights) + total + 1e-300
    g = torch.Generator().manual_seed(p["seed"])
    previous = math.inf
    for N in range(1, min(m, d) + 1):
        low = qp.low_rank_update(deltas, grams, weights, ridge, N)
        assert torch.linalg.matrix_rank(low.double(), rtol=1e-5) <= N
        j = Jl(low, deltas, grams, weights, ridge)
        assert j <= previous + 1e-7 * scale  # monotone in N
        previous = j
        # the rank-N loss is exactly the spectrum beyond N
        assert abs((j - j_full) - float(spectrum[N:].sum())) <= 1e-5 * scale
        U, S, Vh = torch.linalg.svd(full.double(), full_matrices=False)
        tsvd = (U[:, :N] * S[:N]) @ Vh[:N]
        assert j <= Jl(tsvd, deltas, grams, weights, ridge) + 1e-7 * scale
        Ul, Sl, Vl = torch.linalg.svd(low.double(), full_matrices=False)
        left, right = Ul[:, :N] * Sl[:N], Vl[:N]
        for i in range(20):  # random rank-N matrices, and rank-N perturbations of the answer
            A = torch.randn(m, N, generator=g, dtype=F64)
            B = torch.randn(N, d, generator=g, dtype=F64)
            rand = A @ B if i % 2 else (left + 0.05 * A * Sl[0]) @ (right + 0.05 * B)
            assert j <= Jl(rand, deltas, grams, weights, ridge) + 1e-7 * scale


def test_low_rank_rejects_bad_rank():
    _, deltas, grams, weights = make_problem(0, 3, 3, [4], [1.0])
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="rank"):
            qp.low_rank_update(deltas, grams, weights, 0.0, bad)


# -- norms and embeddings ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 6),
       st.sampled_from([0.0, 0.0, 1e-3, 1.0]), st.booleans())
def test_featurewise_affine_matches_lstsq(seed, K, d, ridge, with_bias):
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(K, generator=g, dtype=F64) * 3 + 0.1).tolist()
    samples = []
    for k in range(K):
        n = int(torch.randint(1, 8, (1,), generator=g))
        x = torch.randn(n, d, generator=g, dtype=F64) * 2 + torch.randn(d, generator=g, dtype=F64)
        x[:, 0] = 0.0 if k % 2 else x[:, 0]  # feature 0 partly dead; constant-ish features appear with n = 1
        samples.append(x)
    x_all_dead = d > 1 and bool(torch.rand(1, generator=g) < 0.5)
    if x_all_dead:
        for x in samples:
            x[:, -1] = 0.0
    gam = [torch.randn(d, generator=g, dtype=F64) for _ in range(K)]
    bet = [torch.randn(d, generator=g, dtype=F64) for _ in range(K)] if with_bias else None
    m2 = [x.square().mean(0) for x in samples]
    m1 = [x.mean(0) for x in samples]
    scale, bias = qp.featurewise_affine_update(gam, bet, m2, m1, weights, ridge)
    lam = ridge * float(sum(w * a for w, a in zip(weights, m2)).mean())
    wsum = sum(weights)
    for j in range(d):
        rows, targets = [], []
        for k, x in enumerate(samples):
            r = math.sqrt(weights[k] / x.shape[0])
            feats = [x[:, j], torch.ones_like(x[:, j])] if with_bias else [x[:, j]]
            rows.append(r * torch.stack(feats, 1))
            targets.append(r * (gam[k][j] * x[:, j] + (bet[k][j] if with_bias else 0)))
        params = [gam] + ([bet] if with_bias else [])
        means = torch.stack([sum(w * v[k][j] for k, w in enumerate(weights)) / wsum for v in params])
        rows.append(math.sqrt(lam) * torch.eye(len(params), dtype=F64))
        targets.append(math.sqrt(lam) * means)
        A, t = torch.cat(rows), torch.cat(targets)
        # minimiser closest to the weighted averages (matters only for dead features, ridge 0)
        sol = means + torch.linalg.lstsq(A, t - A @ means, driver="gelsd").solution
        assert abs(float(scale[j]) - float(sol[0])) <= 1e-5 * max(1.0, abs(float(sol[0])))
        if with_bias:
            assert abs(float(bias[j]) - float(sol[1])) <= 1e-5 * max(1.0, abs(float(sol[1])))
    if not with_bias:
        assert bias is None
    if x_all_dead:  # a feature no task excites keeps the weighted average scale
        assert abs(float(scale[-1]) - float(sum(w * v[-1] for w, v in zip(weights, gam)) / wsum)) < 1e-6


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 8), st.integers(1, 5),
       st.sampled_from([0.0, 1e-3, 1.0]))
def test_rowwise_matches_lstsq(seed, K, m, d, ridge):
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(K, generator=g, dtype=F64) * 3 + 0.1).tolist()
    deltas = [torch.randn(m, d, generator=g) for _ in range(K)]
    tokens = [torch.randint(0, m, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g) for _ in range(K)]
    counts = [torch.bincount(t, minlength=m).double() / len(t) for t in tokens]
    ours = qp.rowwise_update(deltas, counts, weights, ridge)
    mean = mean_delta(deltas, weights)
    lam = ridge * float(sum(w * c for w, c in zip(weights, counts)).sum()) / m
    seen = sum(counts) > 0
    for t in range(m):
        rows = [math.sqrt(w * float(c[t])) * torch.eye(d, dtype=F64) for w, c in zip(weights, counts)]
        targets = [math.sqrt(w * float(c[t])) * dk[t].double() for w, c, dk in zip(weights, counts, deltas)]
        rows.append(math.sqrt(lam) * torch.eye(d, dtype=F64))
        targets.append(math.sqrt(lam) * mean[t])
        A, y = torch.cat(rows), torch.cat(targets)
        sol = mean[t] + torch.linalg.lstsq(A, y - A @ mean[t], driver="gelsd").solution
        assert_close_to(ours[t], sol, rtol=1e-5)
        if not seen[t]:
            assert_close_to(ours[t], mean[t], rtol=1e-6)


def test_rowwise_unseen_rows_get_mean():
    deltas = [torch.randn(5, 3) for _ in range(3)]
    counts = [torch.tensor([0.5, 0.5, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0, 0]), torch.tensor([0, 0, 0, 0.2, 0.8])]
    mean = mean_delta(deltas, [1.0, 2.0, 3.0])
    for ridge in (0.0, 0.1):
        ours = qp.rowwise_update(deltas, counts, [1.0, 2.0, 3.0], ridge)
        torch.testing.assert_close(ours[2], mean[2].float())
    ours = qp.rowwise_update(deltas, counts, [1.0, 2.0, 3.0], 0.0)
    torch.testing.assert_close(ours[0], deltas[0][0])
    torch.testing.assert_close(ours[4], deltas[2][4])


# -- objective ----------------------------------------------------------------------------------------
@SETTINGS
@given(problems)
def test_objective(p):
    xs, deltas, grams, weights = draw(p)
    K = len(deltas)
    zero = torch.zeros_like(deltas[0])
    obj0 = evaluate_objective(zero, deltas, grams, weights)
    if obj0.energy > 0:
        assert obj0.rho == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(p["seed"])
    rand = torch.randn(deltas[0].shape, generator=g, dtype=F64)
    for delta in (zero, rand, deltas[0]):
        obj = evaluate_objective(delta, deltas, grams, weights)
        per = [float((x @ (delta.double() - dk.double()).T).square().sum()) / x.shape[0] for x, dk in zip(xs, deltas)]
        en = [float((x @ dk.double().T).square().sum()) / x.shape[0] for x, dk in zip(xs, deltas)]
        assert obj.per_task == pytest.approx(per, rel=1e-7, abs=1e-9 * (sum(en) + 1e-300))
        assert obj.energy_per_task == pytest.approx(en, rel=1e-9, abs=1e-12)
        assert obj.total == pytest.approx(J_brute(delta, xs, deltas, weights), rel=1e-9, abs=1e-9 * sum(en))
        assert math.isfinite(obj.rho) and all(math.isfinite(r) for r in obj.rho_per_task)
    if evaluate_objective(deltas[0], deltas, grams, weights).energy_per_task[0] > 0:
        assert evaluate_objective(deltas[0], deltas, grams, weights).rho_per_task[0] == pytest.approx(1.0)
    if obj0.energy > 0:
        best = evaluate_objective(qp.full_update(deltas, grams, weights, 0.0), deltas, grams, weights).rho
        tol = 1e-6
        assert best >= evaluate_objective(mean_delta(deltas, weights), deltas, grams, weights).rho - tol
        assert best >= evaluate_objective(rand, deltas, grams, weights).rho - tol
        for k in range(K):
            assert best >= evaluate_objective(deltas[k], deltas, grams, weights).rho - tol


def test_objective_degenerate_energy_and_frozen():
    deltas, grams = [torch.zeros(2, 3)], [torch.eye(3)]
    assert evaluate_objective(torch.zeros(2, 3), deltas, grams, [1.0]).rho == 1.0
    obj = evaluate_objective(torch.ones(2, 3), deltas, grams, [1.0])
    assert obj.rho == 0.0 and obj.rho_per_task == (0.0,) and obj.total == pytest.approx(6.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.total = 1.0
    obj = evaluate_objective(torch.ones(2, 3), [torch.ones(2, 3), torch.zeros(2, 3)], [torch.eye(3)] * 2, [1.0, 3.0])
    assert obj.total == pytest.approx(18.0) and obj.energy == pytest.approx(6.0)
    assert obj.rho == pytest.approx(-2.0) and obj.rho_per_task == (1.0, 0.0)


# -- robustness and validation -----------------------------------------------------------------------
def all_updates(deltas, grams, weights, ridge):
    diags = [g.diagonal() for g in grams]
    m, d = deltas[0].shape
    yield qp.full_update(deltas, grams, weights, ridge)
    yield qp.diagonal_update(deltas, diags, weights, ridge)
    yield qp.task_update(deltas, grams, weights, ridge)[0]
    yield qp.task_update(deltas, grams, weights, ridge, nonneg=True, sum_to_one=True)[0]
    yield qp.low_rank_update(deltas, grams, weights, ridge, 1)
    yield qp.update_spectrum(deltas, grams, weights, ridge)
    yield qp.rowwise_update(deltas, [g.diagonal()[:1].expand(m) for g in grams], weights, ridge)
    yield from (x for x in qp.featurewise_affine_update(
        [dk[0] for dk in deltas], [dk[1] for dk in deltas], diags, [torch.zeros(d)] * len(deltas), weights, ridge))


@pytest.mark.parametrize("dscale", [0.0, 1e-30, 1e30])
@pytest.mark.parametrize("gscale", [0.0, 1e-30, 1e30])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_extreme_scales_stay_finite_and_scale_covariant(dscale, gscale, ridge):
    xs, deltas, grams, weights = make_problem(9, 3, 4, [2, 5, 3], [1.0, 2.0, 0.5])
    base = [u.double() for u in all_updates(deltas, grams, weights, ridge)]
    scaled_deltas = [(dk.double() * dscale).float() for dk in deltas]
    scaled_grams = [g * gscale for g in grams]
    for i, (u, ref) in enumerate(zip(all_updates(scaled_deltas, scaled_grams, weights, ridge), base)):
        assert torch.all(torch.isfinite(u)), i
        if i not in (5, 7, 8) and gscale > 0:  # linear in Δ, invariant to the Grams' scale
            assert_close_to(u.double() / dscale if dscale else u.double(), ref * bool(dscale), rtol=1e-4)
    obj = evaluate_objective(base[0] * dscale, scaled_deltas, scaled_grams, weights)
    assert all(math.isfinite(v) for v in (obj.total, obj.energy, obj.rho, *obj.rho_per_task))


def test_zero_grams_give_mean():
    _, deltas, _, weights = make_problem(10, 3, 4, [2, 2], [1.0, 3.0])
    zeros = [torch.zeros(4, 4)] * 2
    for ridge in (0.0, 1.0):
        assert_close_to(qp.full_update(deltas, zeros, weights, ridge), mean_delta(deltas, weights), rtol=1e-6)
        assert_close_to(qp.task_update(deltas, zeros, weights, ridge)[1], torch.tensor([0.25, 0.75], dtype=F64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_raise(bad):
    _, deltas, grams, weights = make_problem(11, 3, 4, [2, 5], [1.0, 2.0])
    poisoned = deltas[1].clone()
    poisoned[1, 2] = bad
    with pytest.raises(ValueError, match=r"task_vectors\[1\] contains NaN"):
        qp.full_update([deltas[0], poisoned], grams, weights, 0.0)
    g = grams[0].clone()
    g[0, 0] = bad
    for call in (lambda: qp.full_update(deltas, [g, grams[1]], weights, 0.0),
                 lambda: qp.task_update(deltas, [g, grams[1]], weights, 0.0),
                 lambda: qp.low_rank_update(deltas, [g, grams[1]], weights, 0.0, 1),
                 lambda: evaluate_objective(deltas[0], deltas, [g, grams[1]], weights)):
        with pytest.raises(ValueError, match=r"grams\[0\] contains NaN"):
            call()
    with pytest.raises(ValueError, match=r"gram_diagonals\[0\]"):
        qp.diagonal_update(deltas, [g.diagonal(), grams[1].diagonal()], weights, 0.0)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        qp.full_update(deltas, grams, [bad, 1.0], 0.0)
    with pytest.raises(ValueError, match="ridge"):
        qp.full_update(deltas, grams, weights, bad)


def test_shape_mismatch_messages():
    d3, d4 = torch.zeros(3, 4), torch.zeros(3, 5)
    g = torch.eye(4)
    with pytest.raises(ValueError, match=r"task_vectors\[1\] has shape \(3, 5\); expected \(3, 4\)"):
        qp.full_update([d3, d4], [g, g], [1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match=r"grams\[1\] has shape \(5, 5\); expected \(4, 4\)"):
        qp.full_update([d3, d3], [g, torch.eye(5)], [1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="grams has 1 entries; expected 2"):
        qp.task_update([d3, d3], [g], [1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="weights has 3 entries; expected 2"):
        qp.full_update([d3, d3], [g, g], [1.0, 1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match=r"weights\[1\] = -1.0"):
        qp.full_update([d3, d3], [g, g], [1.0, -1.0], 0.0)
    with pytest.raises(ValueError, match=r"weights\[0\] = 0.0"):
        qp.full_update([d3], [g], [0.0], 0.0)
    with pytest.raises(ValueError, match=r"gram_diagonals\[0\] has shape \(3,\); expected \(4,\)"):
        qp.diagonal_update([d3], [torch.ones(3)], [1.0], 0.0)
    with pytest.raises(ValueError, match=r"gram_diagonals\[0\] has negative"):
        qp.diagonal_update([d3], [-torch.ones(4)], [1.0], 0.0)
    with pytest.raises(ValueError, match=r"row_counts\[0\] has shape \(4,\); expected \(3,\)"):
        qp.rowwise_update([d3], [torch.ones(4)], [1.0], 0.0)
    with pytest.raises(ValueError, match=r"task_vectors\[0\] has shape \(4,\); expected 2 dimensions"):
        qp.full_update([torch.zeros(4)], [g], [1.0], 0.0)
    with pytest.raises(ValueError, match="task_vectors is empty"):
        qp.full_update([], [], [], 0.0)
    with pytest.raises(ValueError, match=r"update has shape \(4, 3\)"):
        evaluate_objective(torch.zeros(4, 3), [d3], [g], [1.0])
    v = torch.zeros(4)
    with pytest.raises(ValueError, match=r"bias_deltas\[0\] has shape \(3,\)"):
        qp.featurewise_affine_update([v], [torch.zeros(3)], [v], [v], [1.0], 0.0)
    with pytest.raises(ValueError, match=r"first_moments\[0\]"):
        qp.featurewise_affine_update([v], [v], [v], [torch.zeros(5)], [1.0], 0.0)
    with pytest.raises(ValueError, match=r"second_moments has 2 entries"):
        qp.featurewise_affine_update([v], [v], [v, v], [v], [1.0], 0.0)
    with pytest.raises(ValueError, match="coefficients has shape"):
        qp.combine_task_vectors([d3, d3], [1.0])
    with pytest.raises(ValueError, match="ridge"):
        qp.full_update([d3], [g], [1.0], -0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes(dtype):
    _, deltas, grams, weights = make_problem(12, 3, 4, [6, 6], [1.0, 1.0])
    low = [dk.to(dtype) for dk in deltas]
    out = qp.full_update(low, [g.to(dtype) for g in grams], weights, 0.01)
    assert out.dtype == torch.float32 and out.device == deltas[0].device
    ref = qp.full_update([dk.double() for dk in low], [g.to(dtype).double() for g in grams], weights, 0.01)
    torch.testing.assert_close(out, ref)
    assert qp.task_update(low, grams, weights, 0.0)[0].dtype == torch.float32


@pytest.mark.parametrize("seed", range(4))
def test_optimal_bases_capture_rho_star(seed):
    """docs/method.md (diagnostic): the optimum of a basis with normal equations M c = b captures ρ* = bᵀM⁻¹b / E;
    for the full basis ρ* = tr(P Ĝ⁻¹ Pᵀ) / E. The merge's own ρ must equal it (ridge 0)."""
    g = torch.Generator().manual_seed(seed)
    m, d, K = 5, 7, 3
    xs = [torch.randn(20 + 5 * k, d, generator=g, dtype=F64) * (1 + k) for k in range(K)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    deltas = [torch.randn(m, d, generator=g, dtype=F64) for _ in range(K)]
    weights = [1.0, 0.5, 2.0]
    G = sum(w * gk for w, gk in zip(weights, grams))
    P = sum(w * dk @ gk for w, dk, gk in zip(weights, deltas, grams))
    E = sum(w * float(torch.trace(dk @ gk @ dk.T)) for w, dk, gk in zip(weights, deltas, grams))

    full_star = float(torch.trace(P @ torch.linalg.solve(G, P.T))) / E
    full = evaluate_objective(qp.full_update(deltas, grams, weights, 0.0), deltas, grams, weights)
    assert full.rho == pytest.approx(full_star, rel=1e-5)

    M = torch.tensor([[float(torch.trace(a @ G @ b.T)) for b in deltas] for a in deltas], dtype=F64)
    b = torch.tensor([float(torch.trace(a @ P.T)) for a in deltas], dtype=F64)
    task_star = float(b @ torch.linalg.solve(M, b)) / E
    update, _ = qp.task_update(deltas, grams, weights, 0.0)
    assert evaluate_objective(update, deltas, grams, weights).rho == pytest.approx(task_star, rel=1e-5)
    assert task_star <= full_star + 1e-12  # the task basis is a subspace of the full one


# -- property: every basis is finite and never worse than the base on its own objective ----------
def own_objective(update, deltas, grams, weights, ridge, basis, coefficients=None):
    """The objective each basis minimises (normalised weights, as qp does): J(Δ) + λ‖Δ − Δ̄‖²
    (full, rank-N; diagonal with every Gram replaced by its diagonal), and for the task basis
    J(Σ cⱼΔⱼ) + λ'‖c − ω/Σω‖² with λ' = ridge · tr(M)/K. The base is Δ = 0 (c = 0)."""
    w = [x / sum(weights) for x in weights]
    ds = [dk.double() for dk in deltas]
    gs = [torch.diag(g.diagonal()) if basis == "diagonal" else g for g in grams]
    d = gs[0].shape[0]
    u = update.double()
    J = sum(wk * float(((u - dk) @ gk * (u - dk)).sum()) for wk, dk, gk in zip(w, ds, gs))
    if basis == "task":
        M = torch.tensor([[sum(wk * float((a @ gk * b).sum()) for wk, gk in zip(w, gs)) for b in ds] for a in ds],
                         dtype=F64)
        c = torch.zeros(len(ds), dtype=F64) if coefficients is None else coefficients.double()
        return J + ridge * float(M.trace()) / len(ds) * float((c - torch.tensor(w, dtype=F64)).square().sum())
    lam = ridge * float(sum(wk * gk.trace() for wk, gk in zip(w, gs))) / d
    mean = sum(wk * dk for wk, dk in zip(w, ds))
    return J + lam * float((u - mean).square().sum())


@SETTINGS
@given(problems, st.sampled_from(["full", "diagonal", "task", "task nonneg", "rank"]))
def test_every_basis_is_finite_and_never_worse_than_the_base(p, basis):
    """Ill-conditioned ("scaled", condition numbers to ~1e16), rank-deficient ("dup", and fewer
    rows than columns) and plain inputs, ridge 0 and > 0: the merge is finite and its objective
    is never above the base's (Δ = 0 is feasible in every one of these bases). With ridge 0 the
    objective is the calibration objective J itself (J of the diagonal surrogate for `diagonal`,
    which is not a minimiser of J and can exceed J(0) with correlated features)."""
    xs, deltas, grams, weights = draw(p)
    ridge, (m, d) = p["ridge"], deltas[0].shape
    coefficients = None
    if basis == "full":
        update = qp.full_update(deltas, grams, weights, ridge)
    elif basis == "diagonal":
        update = qp.diagonal_update(deltas, [g.diagonal() for g in grams], weights, ridge)
    elif basis == "rank":
        rank = p["data"].draw(st.integers(1, max(1, min(m, d) - 1)))
        update = qp.low_rank_update(deltas, grams, weights, ridge, rank)
    else:
        update, coefficients = qp.task_update(deltas, grams, weights, ridge, nonneg=basis == "task nonneg")
    assert torch.isfinite(update).all()
    kind = basis.split()[0]
    merged = own_objective(update, deltas, grams, weights, ridge, kind, coefficients)
    base = own_objective(torch.zeros_like(update), deltas, grams, weights, ridge, kind)
    assert math.isfinite(merged)
    assert merged <= base * (1 + 1e-6) + 1e-9 * max(1.0, base), (merged, base)


def test_an_expert_alone_captures_its_share_of_the_energy():
    """docs/method.md (diagnostic): ρ of the base is 0, and an expert alone keeps all of its own task and, when
    the experts do not interfere (each update is silent on the other tasks' inputs), exactly its
    share E_k / E of the total energy."""
    g = torch.Generator().manual_seed(3)
    m, d = 4, 6
    xs = [torch.cat([torch.randn(30, 3, generator=g, dtype=F64), torch.zeros(30, 3, dtype=F64)], 1),
          torch.cat([torch.zeros(40, 3, dtype=F64), torch.randn(40, 3, generator=g, dtype=F64)], 1)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    deltas = [torch.cat([torch.randn(m, 3, generator=g, dtype=F64), torch.zeros(m, 3, dtype=F64)], 1),
              torch.cat([torch.zeros(m, 3, dtype=F64), 3 * torch.randn(m, 3, generator=g, dtype=F64)], 1)]
    weights = [1.0, 2.0]
    energy = [w * float(torch.trace(dk @ gk @ dk.T)) for w, dk, gk in zip(weights, deltas, grams)]
    assert evaluate_objective(torch.zeros(m, d, dtype=F64), deltas, grams, weights).rho == 0.0
    for k in range(2):
        alone = evaluate_objective(deltas[k], deltas, grams, weights)
        assert alone.rho_per_task[k] == pytest.approx(1.0)
        assert alone.rho_per_task[1 - k] == pytest.approx(0.0, abs=1e-12)
        assert alone.rho == pytest.approx(energy[k] / sum(energy), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_leave_their_inputs_alone(dtype):
    """The full solve symmetrises and factorises in place (one d × d float64 buffer per step,
    not five): in buffers of its own, never in the caller's Grams, whatever their dtype."""
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(4, 6, generator=g, dtype=dtype) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(9, 6, generator=g, dtype=dtype)
        grams.append(x.T @ x / 9 + 1e-3 * torch.randn(6, 6, generator=g, dtype=dtype))  # not exactly symmetric
    kept = [t.clone() for t in vs + grams]
    qp.full_update(vs, grams, [1.0, 2.0], 1e-4)
    qp.low_rank_update(vs, grams, [1.0, 2.0], 1e-4, 2)
    qp.task_update(vs, grams, [1.0, 2.0], 1e-4)
    for before, after in zip(kept, vs + grams):
        assert torch.equal(before, after)
    # and the asymmetric part is ignored, as the objective only sees the symmetric one
    symmetric = [(gk + gk.mT) / 2 for gk in grams]
    torch.testing.assert_close(qp.full_update(vs, grams, [1.0, 2.0], 1e-4),
                               qp.full_update(vs, symmetric, [1.0, 2.0], 1e-4), rtol=1e-6, atol=1e-7)
