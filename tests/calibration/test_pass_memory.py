"""The whole-model statistics pass within bounds: no logits, float64 sums released as their
means are taken, and a pass predicted not to fit refused before anything is loaded."""

import pytest
import torch

import tiny_models
from mergekit_qp.calibration import cache, memory
from mergekit_qp.calibration.cache import CalibrationSettings, StatisticsCache
from mergekit_qp.calibration.collector import StatisticsCollector
from mergekit_qp.calibration.models import load_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("pass")
    return tiny_models.build("llama", root), root


def batch():
    ids = torch.tensor([[2, 7, 9, 11, 3, 5], [2, 8, 10, 4, 0, 0]])
    return ids, ids != 0


def test_the_pass_stops_at_the_output_head_and_keeps_its_statistic(llama):
    paths, _ = llama
    model = load_model(str(paths["expert_a"]), torch.device("cpu"))
    head_outputs = []
    model.lm_head.register_forward_hook(lambda m, a, out: head_outputs.append(out))
    collector = StatisticsCollector(model, stop_after=cache.output_head(model))
    assert cache.output_head(model) == "lm_head"
    collector.observe(*batch())
    tensors = collector.tensors()
    assert head_outputs == []  # no logits were computed
    full = StatisticsCollector(load_model(str(paths["expert_a"]), torch.device("cpu")))
    full.observe(*batch())
    reference = full.tensors()
    assert reference.keys() == tensors.keys() and "linear/lm_head/gram" in tensors
    for key in reference:
        assert torch.equal(tensors[key], reference[key]), key


def test_tensors_release_the_float64_sums(llama):
    paths, _ = llama
    collector = StatisticsCollector(load_model(str(paths["expert_a"]), torch.device("cpu")))
    collector.observe(*batch())
    tokens = collector.token_count()
    collector.tensors()
    assert all(acc.sum is None and acc.second is None for acc in collector._linear.values())
    assert collector.token_count() == tokens == 10


def test_prediction_counts_the_model_and_the_distinct_inputs(llama):
    paths, _ = llama
    need = memory.predict_pass_memory(str(paths["base"]), max_batch_tokens=4096, seq_len=512)
    model = load_model(str(paths["base"]), torch.device("cpu"))
    assert need.model_bytes == 4 * sum(p.numel() for p in model.parameters())
    collector = StatisticsCollector(model)
    collector.observe(*batch())
    grams = [v for k, v in collector.tensors().items() if k.endswith("/gram")]
    actual = sum(8 * g.numel() for g in grams)
    # a lower estimate: o_proj shares its parent and width with q/k/v and is not counted
    assert 0.5 * actual <= need.statistics_bytes <= actual + 4 * max(g.numel() for g in grams)


def test_a_pass_that_cannot_fit_is_refused_before_loading(llama, tmp_path, monkeypatch):
    paths, _ = llama
    monkeypatch.setattr(memory, "available_memory", lambda device: (1_000_000, "available RAM (test)"))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cache, "load_model", no_load)
    monkeypatch.setattr(cache, "streams", lambda config, model_dir: False)  # the whole-model pass
    settings = CalibrationSettings(cache_dir=str(tmp_path / "stats"))
    with pytest.raises(MemoryError) as error:
        StatisticsCache().expert_statistics(str(paths["expert_b"]), str(paths["base"]), str(paths["calib_b"]),
                                            settings, torch.device("cpu"))
    message = str(error.value)
    assert "expert_b" in message and "needs at least" in message and "0.0 GB is available RAM (test)" in message
    assert [p.suffix for p in (tmp_path / "stats").iterdir()] == [".lock"]  # nothing but the lock file
