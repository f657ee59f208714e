"""Statistics are sums over tokens: two processes (gloo, CPU) that each observe half of the
calibration batches and all-reduce their collectors hold the statistics of one process that
observed all of them (docs/scale.md, "Past one machine")."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models
from mergekit_qp.calibration.collector import StatisticsCollector
from mergekit_qp.calibration.data import CalibrationSource, batches, load_records, tokenize_calibration
from mergekit_qp.calibration.models import load_model, load_tokenizer


def calibration_batches(paths):
    tokenizer = load_tokenizer(str(paths["base"]))
    sequences = tokenize_calibration(load_records(CalibrationSource(str(paths["calib_a"]))), tokenizer,
                                     samples=24, seq_len=16, seed=0, source_name="a")
    return list(batches(sequences, max_tokens=64, pad_id=tokenizer.pad_token_id))


def collect(paths, chosen):
    collector = StatisticsCollector(load_model(str(paths["expert_a"]), torch.device("cpu")))
    for input_ids, mask in chosen:
        collector.observe(input_ids, mask)
    return collector


def worker(rank, world, init_file, paths, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = calibration_batches(paths)[rank::world]
        collector = collect(paths, share)
        collector.all_reduce()
        torch.save({"tensors": collector.tensors(), "tokens": collector.token_count()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_reduce_to_the_single_process_statistics(tmp_path):
    paths = tiny_models.build("llama", tmp_path / "m")
    all_batches = calibration_batches(paths)
    assert len(all_batches) >= 4
    single = collect(paths, all_batches)
    expected, tokens = single.tensors(), single.token_count()
    mp.spawn(worker, args=(2, str(tmp_path / "init"), paths, str(tmp_path / "stats")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'stats'}.{rank}")
        assert got["tokens"] == tokens
        assert got["tensors"].keys() == expected.keys()
        for key, value in expected.items():
            # Other batch compositions pad to other lengths: the float32 forward differs in the
            # last bits (~1e-7), so compare relative to each statistic's scale.
            scale = value.abs().max().clamp(min=1e-30)
            worst = float((got["tensors"][key] - value).abs().max() / scale)
            assert worst < 1e-5, (key, worst)
    # each half alone is measurably different: the reduction did the work
    half = collect(paths, all_batches[0::2]).tensors()
    key = "linear/model.layers.1.mlp.down_proj/gram"
    assert not torch.allclose(half[key], expected[key], rtol=1e-3)
