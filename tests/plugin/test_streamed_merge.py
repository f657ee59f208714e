"""Merges from the layer-streamed statistics equal merges from the whole-model pass: every
merged tensor and every figure of the report, for every basis, in both modes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from mergekit_qp.calibration import cache
from test_end_to_end import run_in_process


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_models.build("llama", tmp_path_factory.mktemp("streamed-merge"))


def close(a, b, where="report"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    else:
        assert a == b, where


@pytest.mark.parametrize("parameters", [
    {"basis": "full"}, {"basis": "diagonal"}, {"basis": "task"}, {"basis": "rank-2"},
    {"basis": "full", "sequential": True}, {"sequential": True, "target": "expert_outputs"},
], ids=["full", "diagonal", "task", "rank-2", "sequential", "sequential-expert-outputs"])
def test_streamed_statistics_merge_as_the_whole_model_pass_did(llama, tmp_path, monkeypatch, parameters):
    compare_with_whole_model_pass(llama, tmp_path, monkeypatch, parameters)


@pytest.mark.parametrize("kind", ["phi3", "gemma2", "gemma3_text"])
def test_architectures_with_statistics_only_adapters_merge_independently(kind, tmp_path, monkeypatch):
    """Phi-3 and Gemma 2/3: the layer-streamed statistics merge as the whole-model pass's do;
    sequential merging is refused, naming the architecture."""
    paths = tiny_models.build(kind, tmp_path / "m")
    compare_with_whole_model_pass(paths, tmp_path, monkeypatch, {"basis": "full"})
    config = tiny_models.write_config(tmp_path / "seq.yml", paths, "output_qp", {"sequential": True})
    result = run_in_process(config, tmp_path / "seq", tmp_path / "cache-seq")
    assert result.exit_code != 0 and f"does not support the {kind!r} architecture" in str(result.exception)


def compare_with_whole_model_pass(llama, tmp_path, monkeypatch, parameters):
    outs = {}
    for label, streaming in (("streamed", True), ("whole", False)):
        cache.STATISTICS.clear()
        if not streaming:
            monkeypatch.setattr(cache, "streams", lambda config, model_dir: False)
        config = tiny_models.write_config(tmp_path / f"{label}.yml", llama, "output_qp", parameters)
        result = run_in_process(config, tmp_path / label, tmp_path / f"cache-{label}")
        assert result.exit_code == 0, result.output
        outs[label] = tmp_path / label
    folders = [p for p in (tmp_path / "cache-streamed").iterdir() if p.is_dir()]
    files = list((tmp_path / "cache-whole").glob("*.safetensors"))
    assert len(folders) == 2 and len(files) == 2  # each expert's statistics came from the pass named
    streamed, whole = (load_file(str(outs[k] / "model.safetensors")) for k in ("streamed", "whole"))
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert torch.allclose(streamed[name], whole[name], rtol=1e-5, atol=1e-7), name
    close(json.loads((outs["streamed"] / "merge_report.json").read_text()),
          json.loads((outs["whole"] / "merge_report.json").read_text()))
    cache.STATISTICS.clear()
    monkeypatch.undo()
