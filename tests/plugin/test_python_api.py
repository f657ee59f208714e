"""output_qp through mergekit's public Python APIs: `merge_state_dicts` (mergekit's own
registry-wide contract: strided inputs, no mutation), the isotropic solution when no statistics
are given, calibration through it with folder-named inputs, `run_merge` with a
`MergeConfiguration` in-process, and `mergekit-multi`."""

import warnings

import pytest
import torch
import yaml
from mergekit.merge_methods.api import merge_state_dicts

import mergekit_qp
import tiny_models
from mergekit_qp.calibration.checkpoint import Checkpoint
from mergekit_qp.plugin.method import ISOTROPIC_WARNING


@pytest.fixture(autouse=True, scope="module")
def registered():
    mergekit_qp.register()


def strided(count=3, seed=42):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=generator).T for _ in range(count)]


def test_merge_state_dicts_contract_strided_and_unmutated():
    """mergekit 0.1.5's `test_state_dict_methods_accept_strided_weights_without_mutation`, which
    runs over every registered method: strided and contiguous inputs merge alike, inputs are left
    as they were, results are finite; positional ids (0, 1, 2) carry no model folder."""
    tensors = strided()
    assert all(not t.is_contiguous() for t in tensors)
    copies = [t.clone() for t in tensors]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = merge_state_dicts([{"w": t.contiguous()} for t in tensors], "output_qp", base=0,
                                     parameters={"weight": 1.0})["w"]
        actual = merge_state_dicts([{"w": t} for t in tensors], "output_qp", base=0, parameters={"weight": 1.0})["w"]
    assert actual.isfinite().all()
    torch.testing.assert_close(actual, expected)
    for tensor, before in zip(tensors, copies):
        assert torch.equal(tensor, before)
    assert any(str(w.message) == ISOTROPIC_WARNING for w in caught)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.5, 2.0]])
def test_without_statistics_the_isotropic_solution_is_the_weighted_average(weights):
    """Every Gram = I: Σ ω_k ‖W − W_k‖² (+ a ridge centred on the average update) is minimised by
    the ω-weighted average of the experts, whatever the base."""
    base, a, b = strided(seed=1)
    with pytest.warns(UserWarning, match="every input Gram is taken as the identity"):
        merged = merge_state_dicts({"base": {"w": base}, "a": {"w": a}, "b": {"w": b}}, "output_qp", base="base",
                                   parameters={"weight": {"a": weights[0], "b": weights[1]}})["w"]
    wa, wb = weights
    expected = (wa * a.double() + wb * b.double()) / (wa + wb)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)
    # brute force: the minimiser of the weighted squared distance, by least squares on stacked rows
    stacked = torch.cat([wa ** 0.5 * torch.eye(6, dtype=torch.float64), wb ** 0.5 * torch.eye(6, dtype=torch.float64)])
    target = torch.cat([wa ** 0.5 * a.double(), wb ** 0.5 * b.double()])
    torch.testing.assert_close(merged.double(), torch.linalg.lstsq(stacked, target).solution, rtol=1e-6, atol=1e-6)


def test_isotropic_solution_takes_svc():
    from mergekit_qp.core import svc

    base, a, b = strided(seed=2)
    merged = merge_state_dicts({"base": {"w": base}, "a": {"w": a}, "b": {"w": b}}, "output_qp", base="base",
                               parameters={"weight": 1.0, "svc": True, "svc_rule": "paper"})["w"]
    update = svc.calibrate(((a + b) / 2 - base), [a - base, b - base], rule="paper").update
    torch.testing.assert_close(merged, base + update, rtol=1e-5, atol=1e-6)


def test_calibration_for_inputs_without_a_folder_is_a_clear_error():
    tensors = strided()
    with pytest.raises(ValueError, match="input 1 is not a model folder or a mergekit model reference"):
        merge_state_dicts([{"w": t} for t in tensors], "output_qp", base=0,
                          parameters={"weight": 1.0, "calibration": "data.jsonl"})


def state_dict(folder: str) -> dict:
    checkpoint = Checkpoint(folder)
    return {name: checkpoint.get(name) for name in checkpoint.files}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    paths = tiny_models.build("llama", root)
    from test_end_to_end import executable, run

    out = root / "out_yaml"
    config = tiny_models.write_config(root / "qp.yml", paths, "output_qp")
    run([executable("mergekit-yaml"), str(config), str(out)], root / "cache")
    return paths, root, out


def test_merge_state_dicts_with_folders_and_calibration_equals_mergekit_yaml(llama, monkeypatch):
    """Inputs named by their folders, calibration per input: the linear layers equal a
    `mergekit-yaml` merge of the same models bit for bit (one statistics pass, one solve each)."""
    paths, root, yaml_out = llama
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(root / "cache"))
    names = {k: str(paths[k]) for k in ("base", "expert_a", "expert_b")}
    states = {folder: state_dict(folder) for folder in names.values()}
    merged = merge_state_dicts(states, "output_qp", base=names["base"], parameters={
        "calibration": {names["expert_a"]: str(paths["calib_a"]), names["expert_b"]: str(paths["calib_b"])}})
    reference = Checkpoint(str(yaml_out))
    linear = [n for n in merged if n.endswith("proj.weight")]
    assert len(linear) >= 14
    for name in linear:
        assert torch.equal(merged[name], reference.get(name)), name
    average = (Checkpoint(names["expert_a"]).get(linear[0]) + Checkpoint(names["expert_b"]).get(linear[0])) / 2
    assert not torch.allclose(merged[linear[0]], average, atol=1e-6)  # calibrated, not isotropic


def test_run_merge_in_process_equals_mergekit_yaml(llama, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    paths, root, yaml_out = llama
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(root / "cache"))
    config = MergeConfiguration.model_validate(yaml.safe_load((root / "qp.yml").read_text()))
    out = root / "out_run_merge"
    run_merge(config, str(out), options=MergeOptions())
    produced, reference = Checkpoint(str(out)), Checkpoint(str(yaml_out))
    assert sorted(produced.files) == sorted(reference.files)
    for name in reference.files:
        assert torch.equal(produced.get(name), reference.get(name)), name
    assert (out / "merge_report.json").is_file()


def test_mergekit_multi_merges_an_intermediate_output_qp(llama):
    """Two documents: an output_qp merge saved as an intermediate, then output_qp of that
    intermediate with expert_b (its reference resolved by mergekit-multi)."""
    from test_end_to_end import executable, run

    paths, root, yaml_out = llama
    first = yaml.safe_load((root / "qp.yml").read_text())
    second = {**first, "models": [{"model": "qp_ab", "parameters": {"calibration": str(paths["calib_a"])}},
                                  first["models"][1]]}
    (root / "multi.yml").write_text(yaml.safe_dump_all([{"name": "qp_ab", **first}, second], sort_keys=False))
    out, intermediate = root / "out_multi", root / "intermediate"
    run([executable("mergekit-multi"), str(root / "multi.yml"), "--intermediate-dir", str(intermediate),
         "--out-path", str(out)], root / "cache")
    first_out, reference = Checkpoint(str(intermediate / "qp_ab")), Checkpoint(str(yaml_out))
    for name in reference.files:
        assert torch.equal(first_out.get(name), reference.get(name)), name
    final = Checkpoint(str(out))
    name = next(n for n in final.files if n.endswith("down_proj.weight"))
    assert not torch.equal(final.get(name), reference.get(name))
    assert (out / "merge_report.json").is_file()


def test_merge_state_dicts_from_statistics_artifacts_equals_mergekit_yaml(llama, tmp_path, monkeypatch):
    """`statistics` in place of `calibration`: the artifacts of `mergekit-qp statistics`."""
    from mergekit_qp.calibration.artifact import produce_artifact
    from mergekit_qp.calibration.cache import CalibrationSettings
    from mergekit_qp.calibration.data import CalibrationSource

    paths, root, yaml_out = llama
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(tmp_path / "cache"))
    names = {k: str(paths[k]) for k in ("base", "expert_a", "expert_b")}
    artifacts = {}
    for expert, calib in (("expert_a", "calib_a"), ("expert_b", "calib_b")):
        artifacts[names[expert]] = str(tmp_path / expert)
        produce_artifact(names[expert], CalibrationSource(path=str(paths[calib])), artifacts[names[expert]],
                         CalibrationSettings(), base_dir=names["base"])
    merged = merge_state_dicts({folder: state_dict(folder) for folder in names.values()}, "output_qp",
                               base=names["base"], parameters={"statistics": artifacts})
    reference = Checkpoint(str(yaml_out))
    for name in (n for n in merged if n.endswith("proj.weight")):
        assert torch.equal(merged[name], reference.get(name)), name
