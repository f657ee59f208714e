"""Paths through the plugin that no other test took: svc on fallback tensors, the tokenizer-merge
fallback of embeddings, LoRA references, sharded checkpoints, --device / --trust-remote-code
reaching the calibration pass, per-tensor `filter` values of basis and ridge, Inf in an expert."""

import json

import pytest
import torch
from click.testing import CliRunner
from mergekit.common import ModelReference
from safetensors.torch import load_file

import tiny_models
from mergekit_qp.calibration.models import local_model_path
from mergekit_qp.core import svc
from mergekit_qp.plugin.merge_state import MergeState
from test_end_to_end import run_in_process
from test_plugin import merge


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("plumbing")
    return tiny_models.build("llama", root), root


def test_svc_applies_to_fallback_tensors(llama):
    """A 2-D tensor without statistics is merged by the fallback, then calibrated when svc is
    on: base + SVC(ω-weighted average update) in the model's precision."""
    paths, root = llama
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.randn(6, 1, generator=g) @ torch.randn(1, 5, generator=g)
    tensors = [base + shared + 0.1 * torch.randn(6, 5, generator=g), base + shared, base]
    state = MergeState()
    name = "model.layers.0.mlp.not_a_module.weight"
    plain, _ = merge(paths, root / "cache", name, tensors, state=MergeState(), fallback="task_arithmetic")
    got, _ = merge(paths, root / "cache", name, tensors, state=state, fallback="task_arithmetic", svc=True)
    deltas = [tensors[0] - base, tensors[1] - base]
    expected = base + svc.calibrate(deltas[0] + deltas[1], deltas).update
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)  # the shared direction was counted twice
    assert state.records[-1]["fallback"].startswith("no calibration statistics; merged with task_arithmetic")


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_in_an_expert_tensor_is_named(llama, value):
    paths, root = llama
    name = "model.layers.0.mlp.down_proj.weight"
    from mergekit_qp.calibration.checkpoint import Checkpoint

    tensors = [Checkpoint(str(paths[k])).get(name).clone() for k in ("expert_a", "expert_b", "base")]
    tensors[1][2, 3] = value
    with pytest.raises(ValueError, match=f"tensor {name} of model .*expert_b contains NaN or Inf"):
        merge(paths, root / "cache", name, tensors)


def test_tokenizer_merge_makes_embeddings_fall_back(llama):
    paths, root = llama
    config = tiny_models.write_config(root / "tok.yml", paths, "output_qp")
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["tokenizer_source"] = "union"
    config.write_text(yaml.safe_dump(raw))
    out = root / "out_tok"
    result = run_in_process(config, out, root / "cache")
    assert result.exit_code == 0, result.output
    report = {t["name"]: t for t in json.loads((out / "merge_report.json").read_text())["tensors"]}
    reason = report["model.embed_tokens.weight"]["fallback"]
    assert reason.startswith("embedding rows re-ordered by the tokenizer merge; merged with linear")
    assert report["model.layers.0.mlp.down_proj.weight"]["fallback"] is None


def test_a_lora_reference_is_refused_with_the_way_out(llama):
    paths, _ = llama
    reference = ModelReference.parse(f"{paths['expert_a']}+{paths['expert_b']}")
    with pytest.raises(ValueError, match="is a LoRA reference; merge the adapter into a checkpoint first"):
        local_model_path(reference)


def test_sharded_experts_merge_as_single_files_do(llama, tmp_path):
    paths, root = llama
    from transformers import LlamaForCausalLM

    sharded = dict(paths)
    for name in ("expert_a", "expert_b"):
        model = LlamaForCausalLM.from_pretrained(paths[name])
        sharded[name] = tmp_path / f"{name}_sharded"
        model.save_pretrained(sharded[name], max_shard_size="20KB")
        tiny_models.make_tokenizer("llama").save_pretrained(sharded[name])
        assert (sharded[name] / "model.safetensors.index.json").exists()
    outs = {}
    for label, p in (("single", paths), ("sharded", sharded)):
        config = tiny_models.write_config(tmp_path / f"{label}.yml", p, "output_qp")
        outs[label] = tmp_path / f"out_{label}"
        result = run_in_process(config, outs[label], tmp_path / "cache")
        assert result.exit_code == 0, result.output
    single, split = load_file(str(outs["single"] / "model.safetensors")), load_file(str(outs["sharded"] / "model.safetensors"))
    assert single.keys() == split.keys()
    for name in single:
        torch.testing.assert_close(split[name], single[name], rtol=1e-6, atol=1e-7)


def test_device_and_trust_remote_code_reach_the_calibration_pass(llama, tmp_path, monkeypatch):
    """mergekit's --device and --trust-remote-code are what the statistics pass runs with
    (recorded by wrapping the layer-streamed pass and the configuration reader before it)."""
    paths, _ = llama
    from mergekit.scripts.run_yaml import main

    import mergekit_qp
    from mergekit_qp.calibration import cache

    seen = []
    original_check, original_pass = cache.plan_streamed_pass, cache.streamed_statistics

    def check(model_dir, device, tokens, max_batch_tokens, seq_len, trust_remote_code=False):
        seen.append(("trust_remote_code", trust_remote_code))
        return original_check(model_dir, device, tokens, max_batch_tokens, seq_len, trust_remote_code)

    def run(model_dir, config, batches, device, folder, **kwargs):
        seen.append(("device", str(device)))
        return original_pass(model_dir, config, batches, device, folder, **kwargs)

    monkeypatch.setattr(cache, "plan_streamed_pass", check)
    monkeypatch.setattr(cache, "streamed_statistics", run)
    cache.STATISTICS.clear()  # earlier tests' statistics of the same experts are held in memory
    mergekit_qp.register()
    config = tiny_models.write_config(tmp_path / "c.yml", paths, "output_qp")
    result = CliRunner().invoke(main, [str(config), str(tmp_path / "out"), "--device", "cpu", "--trust-remote-code"],
                                env={"MERGEKIT_QP_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    assert seen == [("trust_remote_code", True), ("device", "cpu")] * 2


def test_filtered_basis_and_ridge_apply_per_tensor(llama, tmp_path):
    """`basis: [{filter: mlp, value: diagonal}, {value: full}]`: MLP tensors equal a diagonal
    merge's, attention tensors a full merge's; a filtered ridge likewise."""
    paths, _ = llama
    runs = {
        "filtered": {"basis": [{"filter": "mlp", "value": "diagonal"}, {"value": "full"}],
                     "ridge": [{"filter": "self_attn", "value": 0.5}, {"value": 1e-4}]},
        "diagonal": {"basis": "diagonal", "ridge": 1e-4},
        "full": {"basis": "full", "ridge": 1e-4},
        "full_ridge": {"basis": "full", "ridge": 0.5},
    }
    outs = {}
    for label, parameters in runs.items():
        config = tiny_models.write_config(tmp_path / f"{label}.yml", paths, "output_qp", parameters)
        result = run_in_process(config, tmp_path / label, tmp_path / "cache")
        assert result.exit_code == 0, result.output
        outs[label] = load_file(str(tmp_path / label / "model.safetensors"))
    mlp, attention = "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(outs["filtered"][mlp], outs["diagonal"][mlp])
    assert not torch.allclose(outs["filtered"][mlp], outs["full"][mlp], atol=1e-6)
    assert torch.equal(outs["filtered"][attention], outs["full_ridge"][attention])
    assert not torch.allclose(outs["filtered"][attention], outs["full"][attention], atol=1e-6)
