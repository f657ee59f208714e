"""Singular value calibration: the rule against a direct implementation, the toy behaviour
the paper describes, edge cases, the `<method>_svc` twins through mergekit's API and
`mergekit-yaml`, and `svc: true` on output_qp."""


import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import TensorGroup, get

import mergekit_qp
import tiny_models
from mergekit_qp import plugin
from mergekit_qp.core.problems import svc_in_model_precision
from mergekit_qp.plugin.merge_state import MergeState
from mergekit_qp.core import svc
from mergekit_qp.calibration.checkpoint import Checkpoint

INNER = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
         "della_linear")


@pytest.fixture(autouse=True, scope="module")
def registered():
    mergekit_qp.register()


def direct(merged, experts, alpha, rule="shared"):
    """Both rules written out direction by direction (float64, plain loops): `shared` divides σ_r
    by max(α, mean_i s_ir) where every s_ir > 0; `paper` divides every σ_r by mean_i max(α, s_ir)."""
    u, sigma, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    new_sigma = sigma.clone()
    for r in range(sigma.numel()):
        m_r = sigma[r] * vh[r]
        scores = []
        for delta in experts:
            a = u[:, r] @ delta.double()
            scores.append(float(m_r @ a) / float(a @ a) if float(a @ a) > 0 else 0.0)
        if rule == "paper":
            new_sigma[r] = sigma[r] / (sum(max(alpha, s) for s in scores) / len(scores))
        elif all(s > 0 for s in scores):
            new_sigma[r] = sigma[r] / max(alpha, sum(scores) / len(scores))
    return u @ torch.diag(new_sigma) @ vh


def experts_with_shared_part(k=3, shape=(12, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape[0], 2, generator=g, dtype=torch.float64) @ torch.randn(2, shape[1], generator=g,
                                                                                        dtype=torch.float64)
    return [shared + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(k)]


@pytest.mark.parametrize("rule", svc.RULES)
@pytest.mark.parametrize("alpha", [None, 0.05, 0.5, 2.0])
@pytest.mark.parametrize("combine", ["sum", "mean", "weighted"])
def test_equals_direct_implementation(alpha, combine, rule):
    experts = experts_with_shared_part()
    weights = {"sum": [1, 1, 1], "mean": [1 / 3] * 3, "weighted": [0.2, 0.7, 1.1]}[combine]
    merged = sum(w * d for w, d in zip(weights, experts))
    result = svc.calibrate(merged, experts, alpha, rule)
    expected = direct(merged, experts, 1 / 3 if alpha is None else alpha, rule)
    torch.testing.assert_close(result.update, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(result.update, merged)  # the shared part was rescaled


def test_rules_agree_on_shared_directions_and_differ_on_owned_ones():
    """K = 2, α = 1/2, three orthonormal rank-1 directions d0, d1, d2 and a merge 2·d0 + 5·d1 + 3·d2.
    d0, which both experts have once (s = 2, 2), comes back to single size under both rules. d1,
    which expert 0 alone owns (s = 1, absent), `shared` leaves and `paper` boosts by
    K / (1 + (K−1)α) = 4/3. d2, which expert 1 opposes (s = 3, −3), `shared` leaves and `paper`
    divides by mean(max(α, 3), max(α, −3)) = 1.75."""
    q_out = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    q_in = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64))[0]
    d = [torch.outer(q_out[:, r], q_in[:, r]) for r in range(3)]
    experts = [d[0] + 5 * d[1] + d[2], d[0] - d[2]]
    merged = 2 * d[0] + 5 * d[1] + 3 * d[2]
    shared = svc.calibrate(merged, experts, 0.5, "shared")
    paper = svc.calibrate(merged, experts, 0.5, "paper")
    torch.testing.assert_close(shared.update, d[0] + 5 * d[1] + 3 * d[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(paper.update, d[0] + 5 / 0.75 * d[1] + 3 / 1.75 * d[2], rtol=1e-10, atol=1e-10)


def test_paper_rule_ignores_rounding_noise_of_an_absent_expert():
    """float32: two orthogonal rank-1 experts. Rounding noise must not make the other expert count
    (|s| ≈ σ/ε would erase or blow up the direction); absent counts as α under `paper`."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    a = 3.0 * q[:, :1] @ q[:1, :]
    b = 1.0 * q[:, 1:2] @ q[1:2, :]
    result = svc.calibrate(a + b, [a, b], rule="paper")
    torch.testing.assert_close(result.update, (a + b) / 0.75, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_shared_direction_summed_k_times_returns_to_single_expert_size(k):
    g = torch.Generator().manual_seed(k)
    shared = torch.randn(16, 1, generator=g) @ torch.randn(1, 10, generator=g)
    result = svc.calibrate(k * shared, [shared.clone() for _ in range(k)])
    torch.testing.assert_close(result.update, shared, rtol=1e-5, atol=1e-5)
    assert result.eta[0].item() == pytest.approx(k, rel=1e-5)


def test_direction_of_one_expert_only_is_left_alone():
    """Two experts with orthogonal rank-1 updates: no direction is shared, so the sum stays."""
    a = torch.zeros(8, 6, dtype=torch.float64)
    b = torch.zeros(8, 6, dtype=torch.float64)
    a[0, 0], b[1, 1] = 2.0, 0.5
    result = svc.calibrate(a + b, [a, b])
    torch.testing.assert_close(result.update, a + b)
    assert (result.eta == 1).all()


def test_rounding_noise_does_not_count_as_presence():
    """float32: an expert orthogonal to a direction up to rounding must not shrink it."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    a = 3.0 * q[:, :1] @ q[:1, :]
    b = 1.0 * q[:, 1:2] @ q[1:2, :]
    result = svc.calibrate(a + b, [a, b])
    torch.testing.assert_close(result.update, a + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["zero", "zero_expert", "rank_deficient", "tiny"])
def test_degenerate_updates_give_finite_results(case):
    g = torch.Generator().manual_seed(2)
    low = torch.randn(10, 1, generator=g) @ torch.randn(1, 7, generator=g)
    experts = {
        "zero": [torch.zeros(10, 7), torch.zeros(10, 7)],
        "zero_expert": [low, torch.zeros(10, 7)],
        "rank_deficient": [low, 2 * low, -0.5 * low],
        "tiny": [1e-30 * low, 1e-30 * low],
    }[case]
    merged = sum(experts)
    result = svc.calibrate(merged, experts)
    assert torch.isfinite(result.update).all() and torch.isfinite(result.eta).all()
    assert torch.linalg.matrix_norm(result.update) <= torch.linalg.matrix_norm(merged) * len(experts) + 1e-12
    if case == "zero":
        assert (result.update == 0).all()
    if case == "zero_expert":  # only one expert has the direction: unchanged
        torch.testing.assert_close(result.update, merged)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="svc_alpha must be finite and > 0"):
        svc.calibrate(torch.ones(3, 3), [torch.ones(3, 3)], alpha=0.0)
    with pytest.raises(ValueError, match="not finite"):
        svc.calibrate(torch.full((3, 3), float("nan")), [torch.ones(3, 3)])
    with pytest.raises(ValueError, match="2-D"):
        svc.calibrate(torch.ones(3), [torch.ones(3)])
    with pytest.raises(ValueError, match="svc_rule must be one of \\['paper', 'shared'\\]; got 'papr'"):
        svc.calibrate(torch.ones(3, 3), [torch.ones(3, 3)], rule="papr")


# ----------------------------------------------------------------------------- mergekit methods


def group(tensors, name="model.layers.0.mlp.up_proj.weight", vocabulary_axis=None):
    ids = ["base", *(f"e{i}" for i in range(len(tensors) - 1))]
    return TensorGroup.from_tensors(tensors, ids=ids, base_index=0, name=name, vocabulary_axis=vocabulary_axis)


def inner_parameters(inner, experts):
    per = {"weight": {f"e{i}": 1.0 for i in range(experts)}}
    if inner != "task_arithmetic":
        per["density"] = {f"e{i}": 0.7 for i in range(experts)}
    return per


@pytest.mark.parametrize("rule", [None, *svc.RULES])
@pytest.mark.parametrize("inner", INNER)
def test_svc_twin_equals_inner_method_then_calibration(inner, rule):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 9, generator=g)
    experts = [base + d.float() for d in experts_with_shared_part()]
    twin, original = get(f"{inner}_svc"), get(inner)
    assert [p.name for p in twin.spec.parameters] == [p.name for p in original.spec.parameters] + ["svc_alpha",
                                                                                                   "svc_rule"]
    params = inner_parameters(inner, 3)
    torch.manual_seed(0)  # dare / della draw random masks: same draws for both
    (plain,) = original((group([base, *experts]),), parameters=params)
    torch.manual_seed(0)
    (calibrated,) = twin((group([base, *experts]),), parameters={**params, **({"svc_rule": rule} if rule else {})})
    expected = base + svc.calibrate(plain - base, [e - base for e in experts], rule=rule or svc.DEFAULT_RULE).update
    torch.testing.assert_close(calibrated, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(calibrated, plain, atol=1e-4)


def test_svc_twin_leaves_embeddings_and_vectors_alone():
    g = torch.Generator().manual_seed(4)
    embed = [torch.randn(20, 8, generator=g) for _ in range(3)]
    vector = [torch.randn(8, generator=g) for _ in range(3)]
    params = inner_parameters("ties", 2)
    for tensors, kwargs in ((embed, {"name": "model.embed_tokens.weight", "vocabulary_axis": 0}),
                            (vector, {"name": "model.norm.weight"})):
        (plain,) = get("ties")((group(tensors, **kwargs),), parameters=params)
        (twin,) = get("ties_svc")((group(tensors, **kwargs),), parameters=params)
        assert torch.equal(plain, twin)


def test_svc_twin_computes_in_float32_for_bfloat16_models():
    """torch has no bfloat16 SVD: the update is taken in float32 from the bf16 tensors and
    only the final weight is rounded back to bf16."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 9, generator=g)
    experts = [base + d.float() for d in experts_with_shared_part()]
    tensors = [t.to(torch.bfloat16) for t in (base, *experts)]
    params = inner_parameters("task_arithmetic", 3)
    (result,) = get("task_arithmetic_svc")((group(tensors),), parameters=params)
    (plain,) = get("task_arithmetic")((group(tensors),), parameters=params)
    assert result.dtype == torch.bfloat16 and torch.isfinite(result).all()
    b32 = tensors[0].float()
    update = svc.calibrate(plain.float() - b32, [t.float() - b32 for t in tensors[1:]]).update
    assert update.dtype == torch.float32
    torch.testing.assert_close(result, (b32 + update).to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(result, plain)


def test_svc_twin_validates_inner_parameters_like_the_inner_method():
    tensors = [torch.randn(4, 3) for _ in range(3)]
    bad = {"weight": {"e0": 1.0, "e1": 1.0}, "density": {"e0": "dense", "e1": 0.5}}
    with pytest.raises(Exception) as inner_error:
        get("ties")((group(tensors),), parameters=bad)
    with pytest.raises(Exception) as twin_error:
        get("ties_svc")((group(tensors),), parameters=bad)
    assert type(twin_error.value) is type(inner_error.value)
    assert str(twin_error.value).replace("ties_svc", "ties") == str(inner_error.value)
    with pytest.raises(ValueError, match="svc_alpha must be finite and > 0"):
        get("ties_svc")((group(tensors),), parameters={**inner_parameters("ties", 2), "svc_alpha": -1.0})


def config_of(text: str) -> MergeConfiguration:
    return MergeConfiguration.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize("snippet, message", [
    ("parameters: {svc_alpa: 0.5}", "ties_svc: unknown parameter 'svc_alpa' in parameters; did you mean 'svc_alpha'?"),
    ("parameters: {svc_alpha: 0}", "ties_svc: svc_alpha must be finite and > 0 (parameters); got 0.0"),
    ("parameters: {densty: 0.5}", "ties_svc: unknown parameter 'densty' in parameters; did you mean 'density'?"),
    ("parameters: {svc_rule: fusionbench}",
     "ties_svc: invalid svc_rule 'fusionbench' (parameters); valid: paper, shared (docs/svc.md)"),
])
def test_svc_config_errors_name_the_parameter(snippet, message):
    config = config_of(f"""
merge_method: ties_svc
base_model: b
models: [{{model: a, parameters: {{weight: 1.0, density: 0.5}}}}]
{snippet}
""")
    with pytest.raises(ValueError) as error:
        plugin.check_config(config)
    assert message in str(error.value)


def test_svc_alpha_per_model_is_refused():
    config = config_of("""
merge_method: task_arithmetic_svc
base_model: b
models: [{model: a, parameters: {weight: 1.0, svc_alpha: 0.5}}]
""")
    with pytest.raises(ValueError, match="'svc_alpha' in models\\[0\\] \\(a\\) parameters is a shared parameter"):
        plugin.check_config(config)


# ----------------------------------------------------------------------------- real merges


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    return tiny_models.build("llama", root), root


def mergekit_yaml(config, out, cache):
    from test_end_to_end import executable, run

    return run([executable("mergekit-yaml"), str(config), str(out)], cache)


def test_ties_svc_through_mergekit_yaml(llama):
    paths, root = llama
    per_model = {"weight": 1.0, "density": 0.6}
    outs = {}
    # float32 as models are merged; the paper's rule (and its plain ties) in float64, so that the
    # rule runs in float64 and is held to 1e-6 of the independent float64 loops below
    for key, method, parameters, dtype in (("ties", "ties", None, "float32"), ("svc", "ties_svc", None, "float32"),
                                           ("ties64", "ties", None, "float64"),
                                           ("paper64", "ties_svc", {"svc_rule": "paper"}, "float64")):
        config = tiny_models.write_config(root / f"{key}.yml", paths, method, parameters, model_parameters=per_model)
        config.write_text(config.read_text().replace("dtype: float32", f"dtype: {dtype}"))
        outs[key] = root / f"out_{key}"
        mergekit_yaml(config, outs[key], root / "cache")
    plain, calibrated = Checkpoint(str(outs["ties"])), Checkpoint(str(outs["svc"]))
    plain64, paper = Checkpoint(str(outs["ties64"])), Checkpoint(str(outs["paper64"]))
    base = Checkpoint(str(paths["base"]))
    experts = [Checkpoint(str(paths[e])) for e in ("expert_a", "expert_b")]
    changed = 0
    for name in sorted(plain.files):
        p, c, p64, q = plain.get(name), calibrated.get(name), plain64.get(name), paper.get(name)
        if p.ndim != 2 or "embed" in name or "lm_head" in name:
            assert torch.equal(p, c) and torch.equal(p64, q), name
            continue
        b = base.get(name)
        deltas = [e.get(name) - b for e in experts]
        expected = b + svc.calibrate(p - b, deltas).update
        torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-6)
        changed += not torch.allclose(p, c)
        # the paper's rule, σ_r / mean_i max(α, s_ir), against the loops of `direct`
        assert q.dtype == p64.dtype == torch.float64
        b64 = b.double()
        by_hand = direct(p64 - b64, [e.get(name).double() - b64 for e in experts], 0.5, "paper")
        relative = float(torch.linalg.matrix_norm(q - b64 - by_hand) / torch.linalg.matrix_norm(by_hand))
        assert relative < 1e-6, (name, relative)
        assert not torch.allclose(q.float(), c, atol=1e-5), name  # the rules differ on every weight here
    assert changed > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(outs["svc"], local_files_only=True)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 5, 7]])).logits).all()


def test_misspelled_svc_parameter_fails_before_writing(llama):
    paths, root = llama
    config = tiny_models.write_config(root / "bad.yml", paths, "dare_ties_svc", parameters={"svc_alfa": 0.5},
                                      model_parameters={"weight": 1.0, "density": 0.5})
    from test_end_to_end import executable, run

    out = root / "out_bad"
    result = run([executable("mergekit-yaml"), str(config), str(out)], root / "cache", check=False)
    assert result.returncode != 0
    assert "dare_ties_svc: unknown parameter 'svc_alfa' in parameters; did you mean 'svc_alpha'?" in result.stderr
    assert not (out / "config.json").exists()


def test_output_qp_svc_true_calibrates_the_solved_update(llama):
    """svc: true = the QP solution, then the rule; its ρ can only drop (the full basis is optimal)."""
    from test_plugin import merge

    paths, root = llama
    name = "model.layers.1.mlp.down_proj.weight"
    plain_state, svc_state = MergeState(), MergeState()
    plain, grp = merge(paths, root / "cache", name, state=plain_state)
    rho_plain = plain_state.records[-1]["rho"]
    calibrated, _ = merge(paths, root / "cache", name, state=svc_state, svc=True)
    rho_svc = svc_state.records[-1]["rho"]
    # the rule in float32 on a float32 model, as ties_svc would apply it
    base = grp.base.tensor.float()
    expected = base + svc.calibrate(plain.float() - base, [e.tensor.float() - base for e in grp.non_base]).update
    torch.testing.assert_close(calibrated, expected, rtol=1e-5, atol=1e-6)
    assert grp.base.tensor.dtype == torch.float32
    assert rho_svc <= rho_plain + 1e-9
    with pytest.raises(ValueError, match="svc_alpha in parameters applies to svc: true only"):
        plugin.check_config(config_of("""
merge_method: output_qp
base_model: b
models: [{model: a}]
parameters: {svc_alpha: 0.5}
"""))
    with pytest.raises(ValueError, match="svc_rule in parameters applies to svc: true only"):
        plugin.check_config(config_of("""
merge_method: output_qp
base_model: b
models: [{model: a}]
parameters: {svc_rule: paper}
"""))
    with pytest.raises(ValueError, match="output_qp: invalid svc_rule 'Paper' \\(parameters\\); valid: paper, shared"):
        plugin.check_config(config_of("""
merge_method: output_qp
base_model: b
models: [{model: a}]
parameters: {svc: true, svc_rule: Paper}
"""))
    paper_state = MergeState()
    paper, _ = merge(paths, root / "cache", name, state=paper_state, svc=True, svc_rule="paper")
    expected = base + svc.calibrate(plain.float() - base, [e.tensor.float() - base for e in grp.non_base],
                                    rule="paper").update
    torch.testing.assert_close(paper, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(paper, calibrated, atol=1e-5)


def test_output_qp_rule_works_in_the_model_precision():
    """output_qp's update is solved in float64, but the rule runs in the model's precision (as
    `<method>_svc` does): a component of 1e-6 of an expert's norm is noise for a float32 model
    (below the presence floor, the direction is left alone), not an overlap that would crush it."""
    u = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    first = 2 * torch.outer(u[:, 0], v[:, 0]) + 1e-6 * torch.outer(u[:, 1], v[:, 1])  # distinct σ: 2, 1
    second = torch.outer(u[:, 1], v[:, 1])
    update = first + second
    f32 = svc_in_model_precision(update, [first, second], None, torch.float32)
    f64 = svc_in_model_precision(update, [first, second], None, torch.float64)
    assert f32.dtype == f64.dtype == torch.float64
    torch.testing.assert_close(f32, update, rtol=0, atol=1e-6)  # nothing shared in float32: unchanged
    assert float(u[:, 1] @ f64 @ v[:, 1]) < 1e-3  # float64 counts the 1e-6 component and crushes the direction
