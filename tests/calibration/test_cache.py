"""The statistics cache object: a computed pass is used from memory (never written and read
back), kept on disk for the next process, forgotten by clear(); and the statistics equal a
brute-force computation with relative tolerances."""

import pytest
import torch

import tiny_models
from mergekit_qp.calibration.cache import CalibrationSettings, StatisticsCache


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return tiny_models.build("llama", root), root


def request(cache, paths, root, expert="expert_a", calib="calib_a", **settings):
    return cache.expert_statistics(str(paths[expert]), str(paths["base"]), str(paths[calib]),
                                   CalibrationSettings(cache_dir=str(root / "stats"), **settings), torch.device("cpu"))


def test_statistics_are_computed_once_and_kept_as_a_shard_folder(llama, monkeypatch):
    """One forward pass per expert: the layer-streamed pass writes a shard folder, the cache
    serves it from memory while it holds it, and a later process reads the folder without
    any forward pass."""
    from mergekit_qp.calibration import cache as cache_module

    paths, root = llama
    passes = []
    real_pass = cache_module.streamed_statistics
    monkeypatch.setattr(cache_module, "streamed_statistics", lambda *a, **k: passes.append(a[0]) or real_pass(*a, **k))
    cache = StatisticsCache()
    first = request(cache, paths, root, seed=7)
    assert len(passes) == 1
    folders = [p for p in (root / "stats").iterdir() if p.is_dir()]
    assert [str(f) for f in folders] == [first.path]
    assert sorted(p.name for p in folders[0].iterdir()) == [
        "layer-00000.safetensors", "layer-00001.safetensors", "outer.safetensors", "statistics.json"]
    assert request(cache, paths, root, seed=7) is first  # the same object while the cache holds it

    other_process = StatisticsCache()  # a fresh cache (a later process) reads the folder
    from_disk = request(other_process, paths, root, seed=7)
    assert len(passes) == 1 and from_disk is not first
    module = "model.layers.1.mlp.down_proj"
    assert torch.equal(from_disk.lookup(module).gram, first.lookup(module).gram)

    cache.clear()
    assert request(cache, paths, root, seed=7) is not first
    assert len(passes) == 1


def test_forget_requests_rechecks_the_data(llama, tmp_path):
    paths, root = llama
    data = tmp_path / "calib.jsonl"
    data.write_text(paths["calib_a"].read_text())
    cache = StatisticsCache()
    settings = CalibrationSettings(cache_dir=str(tmp_path / "stats"))
    first = cache.expert_statistics(str(paths["expert_a"]), str(paths["base"]), str(data), settings,
                                    torch.device("cpu"))
    data.write_text(paths["calib_b"].read_text())  # the same file name, other content
    assert cache.expert_statistics(str(paths["expert_a"]), str(paths["base"]), str(data), settings,
                                   torch.device("cpu")) is first  # remembered for this merge
    cache.forget_requests()
    second = cache.expert_statistics(str(paths["expert_a"]), str(paths["base"]), str(data), settings,
                                     torch.device("cpu"))
    module = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(second.lookup(module).gram, first.lookup(module).gram)


def test_calibration_seed_changes_the_sample(llama):
    """calibration_seed picks other sequences when there are more than calibration_samples."""
    paths, root = llama
    cache = StatisticsCache()
    a = request(cache, paths, root, samples=4, seed=0)
    b = request(cache, paths, root, samples=4, seed=1)
    again = request(StatisticsCache(), paths, root, samples=4, seed=0)
    module = "model.layers.0.mlp.gate_proj"
    assert not torch.allclose(a.lookup(module).gram, b.lookup(module).gram)
    assert torch.equal(a.lookup(module).gram, again.lookup(module).gram)


def test_gram_matches_brute_force_with_relative_tolerance(llama):
    """E[x xᵀ] of down_proj's inputs against activations gathered here, in float64, entry by
    entry relative to the Gram's scale (its diagonal), not an absolute 1e-5."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergekit_qp.calibration.data import CalibrationSource, load_records, tokenize_calibration

    paths, root = llama
    stats = request(StatisticsCache(), paths, root)
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    sequences = tokenize_calibration(load_records(CalibrationSource(str(paths["calib_a"]))), tokenizer,
                                     samples=128, seq_len=512, seed=0, source_name="a")
    model = LlamaForCausalLM.from_pretrained(paths["expert_a"]).float().eval()
    rows = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: rows.append(args[0][0].double()))
    with torch.no_grad():
        for s in sequences:
            model(input_ids=s[None])
    handle.remove()
    x = torch.cat(rows)
    expected = x.T @ x / len(x)
    got = stats.lookup("model.layers.1.mlp.down_proj").gram.double()
    scale = torch.sqrt(torch.outer(expected.diagonal(), expected.diagonal()))
    assert ((got - expected).abs() / scale).max() < 1e-5
    assert stats.tokens == len(x)


def test_packing_is_a_cache_entry_of_its_own(llama):
    """calibration_packing changes the tokens, so it names another cache entry."""
    paths, root = llama
    cache = StatisticsCache()
    plain = request(cache, paths, root, samples=4, seq_len=8)
    packed = request(cache, paths, root, samples=4, seq_len=8, packing=True)
    assert plain.path != packed.path
    assert packed.tokens == 4 * 8  # every window full
