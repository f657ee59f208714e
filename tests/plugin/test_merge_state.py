"""Per-merge state and the defects a review found in how merges kept it (each test failed
before its fix): GPT-2's Conv1D in independent mode, a failed merge's report leaking into the
next merge, report-write failures, `slices:` with other experts per slice, and a weight and its
bias given different parameters. Merges run in process through mergekit-yaml's own command."""

import json

import pytest
import torch
import yaml

import tiny_models
from mergekit_qp.calibration.checkpoint import Checkpoint
from test_end_to_end import run_in_process


def write(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def activations(model_dir, calibration, module_names):
    """Inputs of each named module of the model on its calibration text (all tokens; the tiny
    calibration batches have no padding at the positions kept), float64 rows."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).float().eval()
    rows = {n: [] for n in module_names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: rows[n].append(args[0].reshape(-1, args[0].shape[-1]).double())) for n in module_names]
    with torch.no_grad():
        for line in open(calibration):
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt")["input_ids"]
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def test_gpt2_conv1d_is_solved_in_independent_mode(tmp_path):
    """GPT-2's projections are Conv1D (W stored in × out): independent statistics hook them and
    the merged weight and bias equal the least-squares optimum computed here from activations."""
    paths = tiny_models.build("gpt2", tmp_path)
    out = tmp_path / "out"
    config = tiny_models.write_config(tmp_path / "qp.yml", paths, "output_qp", parameters={"ridge": 0.0})
    result = run_in_process(config, out, tmp_path / "cache")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    solved = {t["name"] for t in report["tensors"] if t["fallback"] is None}
    module = "transformer.h.1.mlp.c_fc"
    assert {"transformer.h.0.attn.c_attn.weight", f"{module}.weight"} <= solved

    base = Checkpoint(str(paths["base"]))
    w0 = torch.cat([base.get(f"{module}.weight").double().T, base.get(f"{module}.bias").double()[:, None]], 1)
    normal_lhs, normal_rhs = 0, 0
    for expert, calib in (("expert_a", "calib_a"), ("expert_b", "calib_b")):
        ckpt = Checkpoint(str(paths[expert]))
        wk = torch.cat([ckpt.get(f"{module}.weight").double().T, ckpt.get(f"{module}.bias").double()[:, None]], 1)
        x = activations(paths[expert], paths[calib], [module])[module]
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) / len(x) ** 0.5
        normal_lhs = normal_lhs + x1.T @ x1
        normal_rhs = normal_rhs + (wk - w0) @ x1.T @ x1
    expected = w0 + torch.linalg.solve(normal_lhs, normal_rhs.T).T  # Σ‖X̃ (Δ − Δk)ᵀ‖² minimised
    merged = Checkpoint(str(out))
    got = torch.cat([merged.get(f"{module}.weight").double().T, merged.get(f"{module}.bias").double()[:, None]], 1)
    assert torch.linalg.norm(got - expected) <= 2e-3 * torch.linalg.norm(expected - w0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    return tiny_models.build("llama", root), root


def test_a_failed_merge_leaves_no_report_for_the_next_merge(llama, monkeypatch):
    paths, root = llama
    from mergekit_qp.core import problems

    calls = []
    original = problems.solve_linear

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("solver failure in the middle of the merge")
        return original(*args, **kwargs)

    monkeypatch.setattr(problems, "solve_linear", failing)
    qp_config = tiny_models.write_config(root / "fail.yml", paths, "output_qp")
    failed = run_in_process(qp_config, root / "out_fail", root / "cache")
    assert failed.exit_code != 0 and "solver failure" in repr(failed.exception)
    monkeypatch.setattr(problems, "solve_linear", original)

    ties_config = tiny_models.write_config(root / "ties.yml", paths, "ties")
    result = run_in_process(ties_config, root / "out_ties", root / "cache")
    assert result.exit_code == 0, result.output
    assert (root / "out_ties" / "config.json").exists()
    assert not (root / "out_ties" / "merge_report.json").exists()


def test_a_report_write_failure_says_the_model_is_complete(llama, monkeypatch, caplog):
    """The tensors are all written: the merge completes (config.json) and the failed report is
    an error in the log that says so, not a failed merge that calls the folder incomplete."""
    paths, root = llama
    from mergekit_qp.reports import merge_report

    def full_disk(out_path, report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_report, "write_report", full_disk)
    config = tiny_models.write_config(root / "report.yml", paths, "output_qp")
    out = root / "out_report"
    with caplog.at_level("ERROR", logger="mergekit_qp"):
        result = run_in_process(config, out, root / "cache")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and not (out / "merge_report.json").exists()
    assert f"the merged model in {out} is complete, but writing its merge report there failed" in caplog.text
    assert "No space left on device" in caplog.text


def test_slices_with_other_experts_per_slice_label_the_report_by_expert(llama):
    """Layer 0 merged from expert_a, layer 1 (and the tensors outside layers) from expert_b:
    each layer's ρ is reported under its own expert, and under no other."""
    paths, root = llama
    a, b, base = str(paths["expert_a"]), str(paths["expert_b"]), str(paths["base"])
    config = write(root / "slices.yml", {
        "merge_method": "output_qp", "base_model": base, "dtype": "float32",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 1]},
                         {"model": a, "layer_range": [0, 1], "parameters": {"calibration": str(paths["calib_a"])}}]},
            {"sources": [{"model": base, "layer_range": [1, 2]},
                         {"model": b, "layer_range": [1, 2], "parameters": {"calibration": str(paths["calib_b"])}}]},
        ]})
    out = root / "out_slices"
    result = run_in_process(config, out, root / "cache")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report["tasks"]) == {a, b}
    layers = {layer["layer"]: layer["rho_by_task"] for layer in report["layers"]}
    assert layers[0][a] is not None and layers[0][b] is None
    assert layers[1][b] is not None and layers[1][a] is None
    for tensor in report["tensors"]:
        if tensor["fallback"] is None and ".layers.0." in tensor["name"]:
            assert list(tensor["rho_by_task"]) == [a]
    assert "—" in (out / "merge_report.md").read_text()


def test_weight_and_bias_with_different_parameters_are_refused(tmp_path):
    """A weight and its bias are solved together: a filter that gives them different ridges is
    an error naming the module, not a second solve counted twice in the report."""
    paths = tiny_models.build("bert", tmp_path)
    config = tiny_models.write_config(tmp_path / "qp.yml", paths, "output_qp", parameters={
        "ridge": [{"filter": "attention.self.query.bias", "value": 0.5}, {"value": 1e-4}]})
    result = run_in_process(config, tmp_path / "out", tmp_path / "cache")
    assert result.exit_code != 0
    message = str(result.exception)
    assert "attention.self.query.weight and" in message and "solved together" in message and "ridge" in message

    same = tiny_models.write_config(tmp_path / "same.yml", paths, "output_qp", parameters={
        "ridge": [{"filter": "attention.self.query", "value": 0.5}, {"value": 1e-4}]})
    result = run_in_process(same, tmp_path / "out_same", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    names = [t["name"] for t in json.loads((tmp_path / "out_same" / "merge_report.json").read_text())["tensors"]]
    assert len(names) == len(set(names))
    assert not any(n.endswith(".bias") for n in names if "query" in n)
