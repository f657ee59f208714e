"""One tensor's problem (core/problems.py) and its pieces against independent computations
from explicit activations: unequal task weights, a bias in homogeneous coordinates, GPT-2's
transposed Conv1D layout, the expert-output correction and its damping, and the SVC rule on a
case solved by hand."""

import pytest
import torch

from mergekit_qp.core import problems, qp, svc
from mergekit_qp.core.tied_embedding import TiedEmbeddingSystem, tied_rowwise_update
from mergekit_qp.core.problems import Basis, SolveSettings
from mergekit_qp.core.statistics import Accumulator, EmbeddingStats, LinearStats

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def stats_of(x, transposed=False):
    acc = Accumulator("full", product_dtype=F64)
    acc.add(x)
    return LinearStats(gram=acc.second_moment(), mean=acc.mean(), transposed=transposed)


@pytest.mark.parametrize("blocked", [False, True], ids=["direct", "blocks-of-2-rows"])
@pytest.mark.parametrize("transposed", [False, True])
def test_weighted_joint_weight_and_bias_against_least_squares(transposed, blocked, monkeypatch):
    """min Σk ωk/nk ‖[Xk, 1] (P − Pk)‖² with ωk = 0.3, 1.7 and no ridge, by lstsq on stacked
    rows; weight and bias come back in the stored layout (Conv1D: in × out); solved directly
    and in blocks of output rows (as output heads are), with the same objective."""
    monkeypatch.setattr(problems, "solve_by_rows", lambda *args: 2 if blocked else 0)
    out_f, in_f = 5, 4
    w0, b0 = torch.randn(out_f, in_f, generator=gen(0), dtype=F64), torch.randn(out_f, generator=gen(1), dtype=F64)
    experts = [(w0 + 0.3 * torch.randn(out_f, in_f, generator=gen(2 + k), dtype=F64),
                b0 + 0.3 * torch.randn(out_f, generator=gen(5 + k), dtype=F64)) for k in range(2)]
    xs = [torch.randn(n, in_f, generator=gen(9 + k), dtype=F64) + k for k, n in enumerate((40, 70))]
    weights = [0.3, 1.7]
    stored = (lambda w: w.T.contiguous()) if transposed else (lambda w: w)
    solution = problems.solve_linear(stored(w0), [stored(w) for w, _ in experts], [stats_of(x, transposed) for x in xs],
                                     weights, SolveSettings(ridge=0.0), base_bias=b0,
                                     expert_biases=[b for _, b in experts])
    rows, targets = [], []
    for (wk, bk), x, om in zip(experts, xs, weights):
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1) * (om / len(x)) ** 0.5
        rows.append(x1)
        targets.append(x1 @ torch.cat([wk, bk[:, None]], 1).T)
    p = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T  # [W, b]
    got_w = solution.weight.T if transposed else solution.weight
    torch.testing.assert_close(got_w, p[:, :in_f], rtol=1e-6, atol=1e-7)  # solvers return float32
    torch.testing.assert_close(solution.bias, p[:, in_f], rtol=1e-6, atol=1e-7)
    # The objective the report uses, from the activations: ω-weighted per task, without ridge.
    for k, ((wk, bk), x) in enumerate(zip(experts, xs)):
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
        residual = x1 @ (p - torch.cat([wk, bk[:, None]], 1)).T
        energy = x1 @ (torch.cat([wk - w0, (bk - b0)[:, None]], 1)).T
        assert solution.objective.per_task[k] == pytest.approx(float((residual ** 2).sum()) / len(x), rel=1e-5)
        assert solution.objective.energy_per_task[k] == pytest.approx(float((energy ** 2).sum()) / len(x), rel=1e-9)
    total = sum(om * j for om, j in zip(weights, solution.objective.per_task))
    assert solution.objective.total == pytest.approx(total, rel=1e-12)


def test_row_blocks_are_taken_where_they_save_memory():
    from mergekit_qp.core.objective import solve_by_rows

    assert solve_by_rows(4096, 14336, 2) == 0  # a 7B down_proj: d × d Grams dominate
    assert solve_by_rows(4096, 4096, 3) > 0  # q/k/v/o: 7 m × d buffers against 4 d × d
    assert solve_by_rows(14336, 4096, 3) > 0  # gate/up
    assert 256 <= solve_by_rows(128256, 4096, 3) < 128256  # Llama-3's output head


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_embeddings_solved_in_blocks_of_rows_equal_the_whole_solve(ridge, monkeypatch):
    """λ comes from every row's counts, so blocks of 3 rows give the whole solve's rows."""
    m, d = 10, 4
    base = torch.randn(m, d, generator=gen(40))
    experts = [base + torch.randn(m, d, generator=gen(41 + k)) for k in range(2)]
    freqs = [torch.rand(m, generator=gen(50 + k)) * (torch.arange(m) % 3 != k) for k in range(2)]
    stats = [EmbeddingStats(f / f.sum()) for f in freqs]
    monkeypatch.setattr(problems, "ROW_BLOCK_BYTES", 3 * 8 * d)
    blocked = problems.solve_embedding(base, experts, stats, [1.0, 2.0], ridge)
    whole = base.double() + qp.rowwise_update([e.double() - base.double() for e in experts],
                                              [s.freq.double() for s in stats], [1.0, 2.0], ridge).double()
    torch.testing.assert_close(blocked, whole.float(), rtol=0, atol=0)


@pytest.mark.parametrize("ridge", [0.0, 0.2])
def test_tied_embedding_minimises_input_and_output_errors_from_activations(ridge, monkeypatch):
    """A tied embedding against explicit activations: per task, token ids (input role, one-hot)
    and final hidden states (output role, logits h·E[t]); the minimiser of the summed squared
    errors of both, per calibration token, found by one dense least-squares solve of all rows."""
    m, d, weights = 9, 4, [1.0, 3.0]
    base = torch.randn(m, d, generator=gen(60), dtype=F64)
    experts = [base + torch.randn(m, d, generator=gen(61 + k), dtype=F64) for k in range(2)]
    tokens = [torch.randint(0, m - 1, (n,), generator=gen(70 + k)) for k, n in enumerate((13, 7))]  # row m-1 unseen
    hidden = [torch.randn(n, d, generator=gen(80 + k), dtype=F64) for k, n in enumerate((13, 7))]
    stats = [EmbeddingStats(torch.bincount(t, minlength=m).double() / len(t)) for t in tokens]
    head = [LinearStats(h.T @ h / len(h), h.mean(0)) for h in hidden]
    monkeypatch.setattr(problems, "ROW_BLOCK_BYTES", 2 * 8 * d)  # blocks of 2 rows
    merged = problems.solve_tied_embedding(base, experts, stats, head, weights, ridge)

    # J(E) = Σk ωk/n_k [‖onehot(t) (E − Ek)‖² + ‖H_k (E − Ek)ᵀ‖²] + λ‖E − Ē‖², vec(E) row-major
    w = [x / sum(weights) for x in weights]
    G = sum(wk * hk.T @ hk / len(hk) for wk, hk in zip(w, hidden))
    lam = ridge * float(G.trace()) / d
    A, b = lam * torch.eye(m * d, dtype=F64), lam * sum(wk * e for wk, e in zip(w, experts)).reshape(-1)
    for wk, e, t, h in zip(w, experts, tokens, hidden):
        rows = torch.cat([torch.kron(torch.nn.functional.one_hot(t, m).double(), torch.eye(d, dtype=F64)),
                          torch.kron(torch.eye(m, dtype=F64), h)])  # input errors, then every logit
        A += wk / len(t) * rows.T @ rows
        b += wk / len(t) * rows.T @ (rows @ e.reshape(-1))
    if ridge == 0:  # the unseen row is set by the head alone: invertible while the Grams are
        assert torch.linalg.matrix_rank(A) == m * d
    expected = torch.linalg.solve(A, b).reshape(m, d)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)  # the update is float32


def test_tied_embedding_special_cases():
    """Without head Grams it is the token-frequency rule; without tokens, the full-basis solve of
    the output head; equal experts give that expert."""
    m, d, weights = 6, 3, [1.0, 2.0]
    base = torch.randn(m, d, generator=gen(90), dtype=F64)
    experts = [base + torch.randn(m, d, generator=gen(91 + k), dtype=F64) for k in range(2)]
    deltas = [e - base for e in experts]
    freq = [torch.rand(m, generator=gen(95 + k), dtype=F64) for k in range(2)]
    grams = [(lambda x: x.T @ x / 8)(torch.randn(8, d, generator=gen(97 + k), dtype=F64)) for k in range(2)]
    zero = [torch.zeros(d, d, dtype=F64)] * 2
    rule = qp.rowwise_update(deltas, freq, weights, 0.0)
    torch.testing.assert_close(tied_rowwise_update(deltas, freq, TiedEmbeddingSystem(zero, weights)), rule)
    nothing = [torch.zeros(m, dtype=F64)] * 2
    for ridge in (0.0, 0.5):
        full = qp.full_update(deltas, grams, weights, ridge)
        torch.testing.assert_close(
            tied_rowwise_update(deltas, nothing, TiedEmbeddingSystem(grams, weights, ridge)), full)
    same = [deltas[0], deltas[0]]
    torch.testing.assert_close(tied_rowwise_update(same, freq, TiedEmbeddingSystem(grams, weights, 0.1)),
                               deltas[0].float())


def test_unequal_weights_move_the_merge_towards_the_heavier_expert():
    w0 = torch.zeros(3, 3, dtype=F64)
    a, b = torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)
    x = torch.randn(50, 3, generator=gen(3), dtype=F64)
    s = stats_of(x)
    solve = lambda weights: problems.solve_linear(w0, [a, b], [s, s], weights, SolveSettings(ridge=0.0)).weight
    # equal Grams: the ω-weighted average of the task vectors, (ωa − ωb) / (ωa + ωb) · I
    torch.testing.assert_close(solve([3.0, 1.0]), 0.5 * torch.eye(3, dtype=F64))
    torch.testing.assert_close(solve([1.0, 1.0]), torch.zeros(3, 3, dtype=F64))


@pytest.mark.parametrize("eps", [1e-12, 1e-4, 1e-3])
def test_drift_corrected_task_vector_is_a_refit_to_the_experts_outputs(eps):
    """W0 + Δ'k = argmin_W ‖X̂ Wᵀ − Xk Wkᵀ‖²/n + ε s ‖W − Wk‖², s = tr(X̂ᵀX̂/n)/d, by lstsq on
    the activations: the expert refit to its own outputs from the merged model's inputs."""
    n, d, m = 60, 4, 3
    x_merged = torch.randn(n, d, generator=gen(1), dtype=F64)
    x_expert = x_merged + 0.3 * torch.randn(n, d, generator=gen(2), dtype=F64)  # drifted inputs
    w0 = torch.randn(m, d, generator=gen(3), dtype=F64)
    wk = w0 + 0.5 * torch.randn(m, d, generator=gen(4), dtype=F64)
    gram = x_merged.T @ x_merged / n
    cross = x_expert.T @ x_merged / n
    corrected = qp.drift_corrected_task_vector(wk - w0, wk, cross, gram, eps=eps)
    lam = eps * float(gram.trace()) / d
    a = torch.cat([x_merged / n ** 0.5, lam ** 0.5 * torch.eye(d, dtype=F64)])
    b = torch.cat([x_expert @ wk.T / n ** 0.5, lam ** 0.5 * wk.T])
    refit = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(w0 + corrected, refit, rtol=1e-8, atol=1e-9)
    if eps == 1e-4:  # a 10× other damping is a visibly different refit
        other = qp.drift_corrected_task_vector(wk - w0, wk, cross, gram, eps=1e-3)
        assert float((other - corrected).abs().max()) > 1e3 * 1e-9


def test_svc_rule_on_a_case_solved_by_hand():
    """Two experts share u1 v1ᵀ; expert 1 alone owns 3 u2 v2ᵀ. Their sum 2 u1v1ᵀ + 3 u2v2ᵀ
    counts the shared direction twice: s = (2, 2), η = max(1/2, 2) = 2, so σ1 = 2 → 1; the
    owned direction has s = (1, absent): not shared by all, η = 1, σ2 = 3 stays."""
    q_out = torch.linalg.qr(torch.randn(6, 2, generator=gen(5), dtype=F64))[0]
    q_in = torch.linalg.qr(torch.randn(5, 2, generator=gen(6), dtype=F64))[0]
    shared = torch.outer(q_out[:, 0], q_in[:, 0])
    owned = torch.outer(q_out[:, 1], q_in[:, 1])
    experts = [shared + 3 * owned, shared]
    result = svc.calibrate(experts[0] + experts[1], experts)
    torch.testing.assert_close(result.update, shared + 3 * owned, rtol=1e-10, atol=1e-10)
    three = [shared, shared, 3 * owned]  # shared by two of three: not by all, left alone
    result = svc.calibrate(sum(three), three, alpha=1 / 3)
    torch.testing.assert_close(result.update, 2 * shared + 3 * owned, rtol=1e-10, atol=1e-10)


def test_fallbacks_by_formula():
    base = torch.zeros(2, 2, dtype=F64)
    experts = [torch.ones(2, 2, dtype=F64), 3 * torch.ones(2, 2, dtype=F64)]
    assert torch.equal(problems.fallback_update(base, experts, [1.0, 3.0], "base"), base)
    torch.testing.assert_close(problems.fallback_update(base, experts, [1.0, 3.0], "linear"),
                               2.5 * torch.ones(2, 2, dtype=F64))
    torch.testing.assert_close(problems.fallback_update(base, experts, [1.0, 3.0], "task_arithmetic"),
                               10 * torch.ones(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="invalid fallback 'ties'"):
        problems.fallback_update(base, experts, [1.0, 1.0], "ties")


def test_bases_parse_and_mismatched_statistics_are_refused():
    assert Basis.parse("Rank-16") == Basis("rank", 16)
    with pytest.raises(ValueError, match="invalid basis 'rank-0'"):
        Basis.parse("rank-0")
    w0 = torch.zeros(3, 4, dtype=F64)
    wrong = stats_of(torch.randn(10, 5, generator=gen(0), dtype=F64))
    with pytest.raises(problems.ProblemMismatch, match="statistics of width 5 for a weight of width 4"):
        problems.solve_linear(w0, [w0 + 1], [wrong], [1.0], SolveSettings())


@pytest.mark.parametrize("tasks", [1, 2, 3])
@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_objective_from_the_solve_equals_one_from_activations(tasks, ridge):
    """full_update_with_objective takes Jk and Ek from the solve's own products (the last
    task's quadratic term from the weighted total): against tr(r Gk rᵀ) and tr(Δk Gk Δkᵀ)
    computed directly here from the Grams of explicit activations, with unequal weights."""
    from mergekit_qp.core.objective import full_update_with_objective

    m, d = 6, 9
    vs = [torch.randn(m, d, generator=gen(20 + k), dtype=F64) for k in range(tasks)]
    xs = [torch.randn(30 + 7 * k, d, generator=gen(30 + k), dtype=F64) * (1 + k) for k in range(tasks)]
    grams = [(x.T @ x / len(x)).float() for x in xs]  # float32, as the statistics store them
    weights = [0.5 + 1.3 * k for k in range(tasks)]
    update, solved = full_update_with_objective(vs, grams, weights, ridge)
    torch.testing.assert_close(update, qp.full_update(vs, grams, weights, ridge))
    g64 = [g.double() for g in grams]
    for k, (v, g) in enumerate(zip(vs, g64)):
        r = update.double() - v
        assert solved.per_task[k] == pytest.approx(float(((r @ g) * r).sum()), rel=1e-5, abs=1e-9)
        assert solved.energy_per_task[k] == pytest.approx(float(((v @ g) * v).sum()), rel=1e-9)
    assert solved.total == pytest.approx(sum(w * j for w, j in zip(weights, solved.per_task)), rel=1e-12)


@pytest.mark.parametrize("blocked", [False, True], ids=["direct", "blocks-of-2-rows"])
def test_singular_grams_without_ridge_give_the_minimiser_nearest_the_mean(blocked, monkeypatch):
    """Ĝ singular and λ = 0: the solve takes the pseudo-inverse in the deviation form, so the
    directions no data excites keep Δ̄ (qp.full_update's answer, checked here by hand too)."""
    m, d = 5, 6
    x = torch.randn(3, d, generator=gen(70), dtype=F64)  # rank 3 < d, shared by both tasks
    stats = [stats_of(x), stats_of(2 * x)]
    w0 = torch.randn(m, d, generator=gen(71), dtype=F64)
    experts = [w0 + torch.randn(m, d, generator=gen(72 + k), dtype=F64) for k in range(2)]
    if blocked:
        monkeypatch.setattr(problems, "ROW_BLOCK_BYTES", 2 * 8 * d)
        monkeypatch.setattr(problems, "solve_by_rows", lambda m, d, k, b: 2)
    solution = problems.solve_linear(w0, experts, stats, [1.0, 3.0], SolveSettings(ridge=0.0))
    deltas = [e - w0 for e in experts]
    expected = qp.full_update(deltas, [s.gram for s in stats], [1.0, 3.0], 0.0).double()
    torch.testing.assert_close(solution.weight - w0, expected, rtol=1e-9, atol=1e-9)
    null = torch.linalg.svd(x, full_matrices=True).Vh[3:].T  # directions the data never excites
    mean = (deltas[0] + 3 * deltas[1]) / 4
    torch.testing.assert_close((solution.weight - w0) @ null, mean @ null, rtol=1e-5, atol=1e-6)  # float32 update


@pytest.mark.parametrize("blocked", [False, True], ids=["direct", "blocks-of-2-rows"])
def test_projections_reading_one_input_share_one_factorisation(blocked, monkeypatch):
    """q/k/v-like solves whose statistics name one shared input factorise Ĝ + λI once and give
    exactly the weights and objective of solving each alone; a solve of another layer, or
    other weights, factorises anew."""
    from mergekit_qp.core import objective as objective_module

    d = 7
    xs = [torch.randn(40, d, generator=gen(80 + k), dtype=F64) for k in range(2)]
    shared = [LinearStats(s.gram.float(), s.mean.float(), shared_input=("stats", k, "q"))
              for k, s in enumerate(map(stats_of, xs))]
    alone = [LinearStats(s.gram, s.mean) for s in shared]
    shapes = {"q": (7, d), "k": (3, d), "v": (3, d)}
    if blocked:
        monkeypatch.setattr(problems, "solve_by_rows", lambda m, d, k, b: 2)
    calls = []
    factorise = objective_module._factorise
    monkeypatch.setattr(objective_module, "_factorise", lambda *a, **k: calls.append(1) or factorise(*a, **k))
    systems = problems.SharedSystems()
    systems.enter("0")
    for i, (name, shape) in enumerate(shapes.items()):
        w0 = torch.randn(shape, generator=gen(90 + i))
        experts = [w0 + torch.randn(shape, generator=gen(93 + i + 10 * k)) for k in range(2)]
        settings = SolveSettings(ridge=1e-3)
        one = problems.solve_linear(w0, experts, shared, [1.0, 2.0], settings, systems=systems)
        own = problems.solve_linear(w0, experts, alone, [1.0, 2.0], settings)
        assert torch.equal(one.weight, own.weight), name
        assert one.objective == own.objective, name
    assert len(calls) == 1 + len(shapes)  # once shared, once per solve alone
    problems.solve_linear(w0, experts, shared, [1.0, 5.0], settings, systems=systems)  # other weights
    assert len(calls) == 2 + len(shapes)
    systems.enter("1")
    problems.solve_linear(w0, experts, shared, [1.0, 5.0], settings, systems=systems)
    assert len(calls) == 3 + len(shapes)
