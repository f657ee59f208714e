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


def test_bfloat16_statistics_merge_with_the_same_outputs_from_half_the_disk(llama, tmp_path):
    """statistics_dtype: bfloat16 stores the Grams in half the bytes, in cache entries of their
    own. On the calibration inputs (measured with the float32 Grams) the merged linear maps
    give the float32 merge's outputs to within a few percent of the update's, and ρ agrees;
    the weights themselves may differ more, in directions the data barely excites
    (docs/scale.md, "Statistics in bfloat16")."""
    from mergekit_qp.calibration.store import ModelStatistics

    outs, reports = {}, {}
    for dtype in ("float32", "bfloat16"):
        cache.STATISTICS.clear()
        config = tiny_models.write_config(tmp_path / f"{dtype}.yml", llama, "output_qp",
                                          {"statistics_dtype": dtype})
        result = run_in_process(config, tmp_path / dtype, tmp_path / f"cache-{dtype}")
        assert result.exit_code == 0, result.output
        outs[dtype] = load_file(str(tmp_path / dtype / "model.safetensors"))
        reports[dtype] = json.loads((tmp_path / dtype / "merge_report.json").read_text())
    cache.STATISTICS.clear()
    entries = {d: [p for p in (tmp_path / f"cache-{d}").iterdir() if p.is_dir()] for d in outs}
    size = {d: sum(f.stat().st_size for p in entries[d] for f in p.rglob("*.safetensors")) for d in outs}
    assert len(entries["bfloat16"]) == 2 and size["bfloat16"] < 0.6 * size["float32"]
    assert reports["bfloat16"]["rho"] == pytest.approx(reports["float32"]["rho"], abs=1e-3)
    grams = ModelStatistics.open(str(entries["float32"][0]))  # one expert's float32 Grams
    base = load_file(str(llama["base"] / "model.safetensors"))
    moved = 0
    for name, f32 in outs["float32"].items():
        stats = grams.lookup(name.rpartition(".")[0])
        if f32.ndim != 2 or stats is None or not hasattr(stats, "gram"):
            continue
        g = stats.gram.double()
        update, difference = f32.double() - base[name].double(), outs["bfloat16"][name].double() - f32.double()
        output_norm = lambda w: float(((w @ g) * w).sum()) ** 0.5  # noqa: E731  ‖W x‖ over the inputs
        assert output_norm(difference) <= 0.1 * output_norm(update), name  # measured: ≤ 5.4 %
        moved += not torch.equal(outs["bfloat16"][name], f32)
    assert moved > 0
