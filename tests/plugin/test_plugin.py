"""`output_qp` through mergekit's merge-method API, in process: dispatch per parameter type,
the bases, and the fallbacks against mergekit's own methods."""

import logging

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.merge_methods import TensorGroup, get, registered_methods

import mergekit_qp
import tiny_models
from mergekit_qp.core.objective import objective as evaluate_objective
from mergekit_qp.core import qp
from mergekit_qp.calibration.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    mergekit_qp.register()
    root = tmp_path_factory.mktemp("plugin")
    return tiny_models.build("llama", root), root / "cache"


def group_for(paths, name, tensors=None):
    refs = [ModelReference.parse(str(paths[k])) for k in ("expert_a", "expert_b", "base")]
    if tensors is None:
        tensors = [Checkpoint(str(paths[k])).get(name) for k in ("expert_a", "expert_b", "base")]
    return TensorGroup.from_tensors(tensors, ids=refs, base_index=2, name=name), refs


def merge(paths, cache, name, tensors=None, state=None, **parameters):
    """One tensor through mergekit's merge-method API; with `state` (a MergeState, which that API
    cannot carry), through the method's merge_group with every parameter resolved here."""
    group, refs = group_for(paths, name, tensors)
    parameters = {
        "calibration": {refs[0]: str(paths["calib_a"]), refs[1]: str(paths["calib_b"])},
        "cache_dir": str(cache),
        **parameters,
    }
    if state is None:
        (result,) = get("output_qp")((group,), parameters=parameters)
        return result, group
    from mergekit_qp.plugin.parameters import PARAMETERS, PER_EXPERT

    resolved = {p.name: p.default for p in PARAMETERS}
    resolved["weight"] = {r: 1.0 for r in refs[:2]}
    resolved.update(parameters)
    assert set(resolved) >= PER_EXPERT
    return get("output_qp").merge_group(group, merge_state=state, **resolved), group


def test_register_is_idempotent():
    mergekit_qp.register()
    mergekit_qp.register()
    assert [m.spec.name for m in registered_methods()].count("output_qp") == 1


@pytest.mark.parametrize("fallback", ["linear", "task_arithmetic", "base"])
def test_fallback_equals_mergekit_methods(llama, fallback, caplog):
    paths, cache = llama
    name = "model.layers.0.mlp.not_a_module.weight"  # no statistics under this name
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="mergekit_qp"):
        result, group = merge(paths, cache, name, tensors, fallback=fallback,
                              weight={r.id: w for r, w in zip(group_for(paths, name, tensors)[0].non_base, (0.3, 0.9))})
    assert f"{name} falls back to {fallback}" in caplog.text
    refs = [e.id for e in group.entries]
    if fallback == "base":
        expected = tensors[2]
    elif fallback == "linear":
        (expected,) = get("linear")((TensorGroup.from_tensors(tensors[:2], ids=refs[:2]),),
                                   parameters={"weight": [0.3, 0.9]})
    else:
        (expected,) = get("task_arithmetic")((group,), parameters={"weight": {refs[0]: 0.3, refs[1]: 0.9}})
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)


def test_bases_through_the_method_rank_by_objective(llama):
    """Every basis runs through mergekit's API; the full basis (the optimum) has the lowest
    objective, rank-N improves with N, and the task basis beats the average task vector."""
    paths, cache = llama
    name = "model.layers.1.mlp.down_proj.weight"
    module = name.rsplit(".", 1)[0]
    from mergekit_qp.calibration.cache import CalibrationSettings, expert_statistics

    stats = [expert_statistics(str(paths[e]), str(paths["base"]), str(paths[c]),
                               CalibrationSettings(cache_dir=str(cache)), torch.device("cpu"))
             for e, c in (("expert_a", "calib_a"), ("expert_b", "calib_b"))]
    grams = [s.lookup(module).gram.double() for s in stats]
    ckpt = [Checkpoint(str(paths[k])).get(name).double() for k in ("expert_a", "expert_b", "base")]
    deltas = [ckpt[0] - ckpt[2], ckpt[1] - ckpt[2]]

    def objective(result):
        return evaluate_objective(result.double() - ckpt[2], deltas, grams, [1.0, 1.0]).total

    j = {basis: objective(merge(paths, cache, name, basis=basis, ridge=0.0)[0])
         for basis in ("full", "diagonal", "task", "rank-1", "rank-4")}
    j["average"] = objective(ckpt[2] + (deltas[0] + deltas[1]) / 2)
    assert all(torch.isfinite(torch.tensor(v)) for v in j.values())
    assert j["full"] <= min(j.values()) + 1e-9, j
    assert j["rank-4"] <= j["rank-1"] + 1e-9, j
    assert j["task"] <= j["average"] + 1e-9, j
    # and the method's full-basis result is the solver's, to float32 precision
    expected = ckpt[2] + qp.full_update(deltas, grams, [1.0, 1.0], 0.0).double()
    torch.testing.assert_close(merge(paths, cache, name, ridge=0.0)[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_norm_and_embedding_use_their_diagonal_statistics(llama):
    paths, cache = llama
    # RMSNorm scale: per-feature weighted average of the experts' scales by E[x̃²].
    result, group = merge(paths, cache, "model.norm.weight", ridge=0.0)
    from mergekit_qp.calibration.cache import CalibrationSettings, expert_statistics

    stats = [expert_statistics(str(paths[e]), str(paths["base"]), str(paths[c]),
                               CalibrationSettings(cache_dir=str(cache)), torch.device("cpu"))
             for e, c in (("expert_a", "calib_a"), ("expert_b", "calib_b"))]
    m2 = [s.lookup("model.norm").m2.double() for s in stats]
    g = [e.tensor.double() for e in group.entries]
    expected = (m2[0] * g[0] + m2[1] * g[1]) / (m2[0] + m2[1])
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)

    # Embedding rows: frequency-weighted; a row no calibration text uses gets the average.
    result, group = merge(paths, cache, "model.embed_tokens.weight", ridge=0.0)
    freq = [s.lookup("model.embed_tokens").freq.double() for s in stats]
    e = [x.tensor.double() for x in group.entries]
    unseen = int(torch.nonzero((freq[0] + freq[1]) == 0)[0])
    torch.testing.assert_close(result[unseen].double(), (e[0][unseen] + e[1][unseen]) / 2, rtol=1e-6, atol=1e-6)
    seen = int(torch.nonzero((freq[0] > 0) & (freq[1] > 0))[0])
    expected = (freq[0][seen] * e[0][seen] + freq[1][seen] * e[1][seen]) / (freq[0][seen] + freq[1][seen])
    torch.testing.assert_close(result[seen].double(), expected, rtol=1e-5, atol=1e-6)
