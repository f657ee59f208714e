"""The layer-streamed statistics pass: equal to the whole-model pass on every architecture with a
layer adapter; resumes after a kill at the layer after the last saved one; memory predicted
flat in depth and refused before anything is read; the whole-model pass kept for the rest."""

import json
import os
import shutil

import pytest
import torch
import transformers

import tiny_models
from mergekit_qp.calibration import cache, memory, streamed
from mergekit_qp.calibration.cache import CalibrationSettings, compute_statistics
from mergekit_qp.calibration.data import CalibrationSource
from mergekit_qp.calibration.layers import ARCHITECTURES, STATISTICS_ONLY
from mergekit_qp.calibration.store import ModelStatistics

SETTINGS = CalibrationSettings(samples=8, seq_len=16, max_batch_tokens=40)  # several padded batches


def statistics(paths, folder=None, expert="expert_a", settings=SETTINGS, **kwargs):
    source = CalibrationSource(path=str(paths["calib_a"]))
    return compute_statistics(str(paths[expert]), str(paths["base"]), source, settings, torch.device("cpu"),
                              folder=None if folder is None else str(folder), **kwargs)


def assert_same(a: ModelStatistics, b: ModelStatistics, exact: bool = False):
    assert set(a._keys) == set(b._keys)
    assert a.aliases == b.aliases and a.transposed == b.transposed
    assert a.tokens == b.tokens and a.prefix == b.prefix
    for key in a._keys:
        x, y = a._get(key).double(), b._get(key).double()
        if exact:
            assert torch.equal(x, y), key
        else:
            scale = x.abs().max().clamp_min(1e-30)
            assert ((x - y).abs().max() / scale).item() < 1e-6, key


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "phi3", "gemma2", "gemma3_text"])
def test_streamed_statistics_equal_the_whole_model_pass(kind, tmp_path):
    paths = tiny_models.build(kind, tmp_path / "m")
    assert transformers.AutoConfig.from_pretrained(str(paths["base"])).model_type in {**ARCHITECTURES,
                                                                                       **STATISTICS_ONLY}
    whole = statistics(paths)  # no folder: the whole-model pass
    assert whole.path is None
    layered = statistics(paths, tmp_path / "shards")
    assert layered.path == str(tmp_path / "shards")
    assert any(k.startswith("linear/") and ".0." in k for k in layered._keys)  # layer statistics are there
    assert_same(whole, layered)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_models.build("llama", tmp_path_factory.mktemp("streamed"))


class Killed(BaseException):
    """A kill (SIGKILL, Ctrl-C) as the pass sees it: not an error it cleans up after."""


def test_a_killed_pass_resumes_after_the_last_saved_layer(llama, tmp_path):
    folder = tmp_path / "stats"

    def kill_after_first(index):
        if index == 0:
            raise Killed

    with pytest.raises(Killed):
        statistics(llama, folder, resume_every=0, after_layer=kill_after_first)
    partial = tmp_path / "stats.partial"
    assert not folder.exists()  # nothing under the final name
    assert sorted(os.listdir(partial)) == ["layer-00000.safetensors", "resume.safetensors"]

    ran = []
    resumed = statistics(llama, folder, resume_every=0, after_layer=ran.append)
    assert ran == [1]  # layer 0 was not run again
    assert not partial.exists() and (folder / "statistics.json").is_file()
    assert not (folder / "resume.safetensors").exists()
    fresh = statistics(llama, tmp_path / "fresh", resume_every=None)
    assert_same(resumed, fresh, exact=True)


def test_a_fresh_pass_does_not_warn_about_resuming(llama, tmp_path, caplog):
    statistics(llama, tmp_path / "stats", resume_every=None)
    assert "resum" not in caplog.text


def test_bfloat16_grams_are_the_float32_ones_rounded_once_and_the_rest_is_unchanged(llama, tmp_path):
    """statistics_dtype: bfloat16 stores each input Gram rounded once from the float64 sums;
    means, norm and embedding statistics stay float32. The whole-model pass agrees."""
    import dataclasses

    f32 = statistics(llama, tmp_path / "f32")
    settings = dataclasses.replace(SETTINGS, gram_dtype="bfloat16")
    bf16, whole = statistics(llama, tmp_path / "bf16", settings=settings), statistics(llama, settings=settings)
    for key in f32._keys:
        x, y = f32._get(key), bf16._get(key)
        if key.endswith("/gram"):
            assert y.dtype == torch.bfloat16 and torch.equal(whole._get(key), y), key
            # once-rounded from float64 ≈ the float32 value rounded (double rounding aside)
            assert ((x.to(torch.bfloat16).float() - y.float()).abs() <= 2 ** -7 * x.abs()).all(), key
        else:
            assert y.dtype == torch.float32 and torch.equal(x, y), key
    assert bf16.metadata["gram_dtype"] == "bfloat16"


def test_a_pass_without_saved_hidden_states_or_with_unusable_ones_starts_again(llama, tmp_path):
    folder = tmp_path / "stats"

    def kill(index):
        raise Killed

    with pytest.raises(Killed):
        statistics(llama, folder, resume_every=None, after_layer=kill)
    ran = []
    statistics(llama, folder, resume_every=None, after_layer=ran.append)
    assert ran == [0, 1]

    with pytest.raises(Killed):
        statistics(llama, tmp_path / "other", resume_every=0, after_layer=kill)
    (tmp_path / "other.partial" / "resume.safetensors").write_bytes(b"truncated")
    ran = []
    statistics(llama, tmp_path / "other", resume_every=0, after_layer=ran.append)
    assert ran == [0, 1]


def test_spilled_hidden_states_give_the_same_statistics_and_resume_after_every_layer(llama, tmp_path):
    """Spilled: the hidden states live in the partial folder, one file per batch and layer
    generation; the statistics are bit-identical to the in-memory pass; a kill resumes after
    the last finished layer."""
    seen = []

    def kill_after_first(index):
        partial = tmp_path / "stats.partial"
        seen.append(sorted(p.name for p in partial.iterdir()))
        if index == 0:
            raise Killed

    with pytest.raises(Killed):
        statistics(llama, tmp_path / "stats", spill=True, after_layer=kill_after_first)
    assert seen == [["hidden-0", "hidden-1", "hidden.json", "layer-00000.safetensors"]]
    batches = len(list((tmp_path / "stats.partial" / "hidden-0").iterdir()))
    assert batches > 1  # several batches, one file each
    ran = []
    spilled = statistics(llama, tmp_path / "stats", spill=True, after_layer=ran.append)
    assert ran == [1]
    assert sorted(os.listdir(tmp_path / "stats")) == [
        "layer-00000.safetensors", "layer-00001.safetensors", "outer.safetensors", "statistics.json"]
    assert_same(spilled, statistics(llama, tmp_path / "in-memory", resume_every=None), exact=True)


def test_hidden_states_spill_when_they_would_not_fit_and_the_pass_is_refused_when_nothing_would(
        llama, tmp_path, monkeypatch):
    settings = CalibrationSettings(samples=8, seq_len=16, max_batch_tokens=40, cache_dir=str(tmp_path / "c"))
    tokens = 8 * 16
    need = memory.predict_streamed_memory(str(llama["expert_a"]), tokens, 40, 16)
    assert need.spilled_total < need.total
    calls = []
    real = cache.streamed_statistics
    monkeypatch.setattr(cache, "streamed_statistics", lambda *a, **k: calls.append(k["spill"]) or real(*a, **k))
    for free, spilled in ((10 * need.total, False), (need.spilled_total + 1, True)):
        monkeypatch.setattr(memory, "available_memory", lambda device, free=free: (free, "available RAM (test)"))
        stats = cache.StatisticsCache().expert_statistics(str(llama["expert_a"]), str(llama["base"]),
                                                          str(llama["calib_a"]), settings, torch.device("cpu"))
        assert calls[-1] is spilled and stats.lookup("model.layers.1.mlp.down_proj") is not None
        shutil.rmtree(tmp_path / "c")
    monkeypatch.setattr(memory, "available_memory", lambda device: (need.spilled_total - 1, "available RAM (test)"))
    with pytest.raises(MemoryError, match=r"one batch's hidden states .* \(the rest spilled to disk\)"):
        cache.StatisticsCache().expert_statistics(str(llama["expert_a"]), str(llama["base"]), str(llama["calib_a"]),
                                                  settings, torch.device("cpu"))


def test_the_pass_holds_one_layer_and_the_hidden_states(llama, tmp_path):
    """The prediction: one layer's weights and Gram sums, the calibration hidden states, and
    the weights outside the layers, whichever phase is larger; the same at any depth."""
    base = str(llama["base"])
    config = transformers.AutoConfig.from_pretrained(base)
    need = memory.predict_streamed_memory(base, tokens=1000, max_batch_tokens=256, seq_len=16)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    layer = model.model.layers[0]
    assert need.layer_bytes == 4 * sum(p.numel() for p in layer.parameters())
    h = config.hidden_size
    stats = statistics(llama, tmp_path / "s")
    layer_grams = [stats._get(k) for k in stats._keys if k.startswith("linear/model.layers.0.") and k.endswith("/gram")]
    actual = sum(12 * g.numel() for g in layer_grams)  # float64 sums and float32 means
    # a lower estimate, as for the whole-model pass: o_proj shares its parent and width with q/k/v
    assert 0.6 * actual <= need.statistics_bytes <= actual
    assert need.hidden_bytes == 2 * 4 * 1000 * h
    assert need.outer_bytes == 4 * (sum(p.numel() for p in model.parameters()) - 2 * sum(p.numel() for p in layer.parameters()))

    deeper = tmp_path / "deep"
    config.num_hidden_layers = 16
    config.save_pretrained(deeper)
    assert memory.predict_streamed_memory(str(deeper), 1000, 256, 16).total == need.total
    whole_deep, whole = memory.predict_pass_memory(str(deeper), 256, 16), memory.predict_pass_memory(base, 256, 16)
    assert whole_deep.model_bytes + whole_deep.statistics_bytes > 4 * (whole.model_bytes + whole.statistics_bytes)


def test_a_streamed_pass_that_cannot_fit_is_refused_before_reading_weights(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: (1_000_000, "available RAM (test)"))

    def no_read(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streamed, "Checkpoint", no_read)
    with pytest.raises(MemoryError) as error:
        cache.StatisticsCache().expert_statistics(str(llama["expert_b"]), str(llama["base"]), str(llama["calib_b"]),
                                                  CalibrationSettings(cache_dir=str(tmp_path)), torch.device("cpu"))
    message = str(error.value)
    assert "layer-by-layer statistics pass over" in message and "expert_b" in message
    assert "one batch's hidden states" in message and "0.0 GB is available RAM (test)" in message
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []


def test_a_pass_that_fails_with_an_error_leaves_no_partial_folder(llama, tmp_path):
    def fail(index):
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError):
        statistics(llama, tmp_path / "stats", resume_every=0, after_layer=fail)
    assert os.listdir(tmp_path) == []


def test_non_finite_layer_weights_are_named(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(llama["expert_a"]):
        if not name.endswith(".safetensors"):
            (broken / name).write_bytes((llama["expert_a"] / name).read_bytes())
    weights = load_file(str(llama["expert_a"] / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    paths = {**llama, "broken": broken}
    with pytest.raises(ValueError, match=r"broken.*NaN or Inf in tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        statistics(paths, tmp_path / "stats", expert="broken")


def test_architectures_without_a_layer_adapter_take_the_whole_model_pass(tmp_path):
    """A GPT-NeoX checkpoint (no adapter): the guarded whole-model pass, in memory, cached as one file."""
    paths = tiny_models.build("llama", tmp_path / "m")
    config = transformers.GPTNeoXConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=48, max_position_embeddings=64)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    assert not streamed.streams(config, str(tmp_path / "neox"))
    stats = cache.StatisticsCache().expert_statistics(str(tmp_path / "neox"), str(paths["base"]), str(paths["calib_a"]),
                                                      CalibrationSettings(cache_dir=str(tmp_path / "c")),
                                                      torch.device("cpu"))
    assert stats.path is None and stats.lookup("gpt_neox.layers.1.mlp.dense_4h_to_h") is not None
    assert sorted(p.suffix for p in (tmp_path / "c").iterdir()) == [".lock", ".safetensors"]


def test_a_model_whose_layers_are_called_otherwise_takes_the_whole_model_pass(llama, tmp_path, monkeypatch, caplog):
    from mergekit_qp.calibration.layers import Backbone, SequentialUnsupported

    def other_calls(self, *args, **kwargs):
        raise SequentialUnsupported("the model did not call each of its layers once")

    monkeypatch.setattr(Backbone, "outer_model", other_calls)
    stats = statistics(llama, tmp_path / "stats")
    assert stats.path is None and not (tmp_path / "stats").exists() and not (tmp_path / "stats.partial").exists()
    assert "computing the statistics with a whole-model pass instead" in caplog.text
    assert_same(stats, statistics(llama))


def test_the_index_names_every_shard_and_the_merged_aliases(llama, tmp_path):
    stats = statistics(llama, tmp_path / "stats")
    index = json.loads((tmp_path / "stats" / "statistics.json").read_text())
    assert index["files"] == ["outer.safetensors", "layer-00000.safetensors", "layer-00001.safetensors"]
    assert stats.aliases["model.layers.1.self_attn.k_proj"] == "model.layers.1.self_attn.q_proj"
    assert stats.lookup("model.layers.1.self_attn.v_proj").gram.shape == (32, 32)
    assert stats.lookup("lm_head") is not None and stats.lookup("model.embed_tokens") is not None
