"""The shared merge runner and held-out loss (mergekit_qp/cli/runner.py): wall time and peak RSS
of a child's process tree (not of the caller), timeouts, the error of a failing merge, and the
held-out loss against a direct computation from the logits."""

import math
import sys

import pytest
import torch

from mergekit_qp.cli import runner

MB = 1_000_000


def python(code: str):
    return [sys.executable, "-c", code]


def test_wall_and_peak_rss_of_a_child(tmp_path):
    log = tmp_path / "logs" / "child.log"
    run = runner.run_measured(python(f"import time; b = b'x' * {200 * MB}; time.sleep(0.5); print('done')"), log=log)
    assert run.returncode == 0 and run.timed_out is None
    assert 0.5 <= run.wall_s < 30 and run.cpu_s > 0
    assert 190 < run.peak_rss_mb < 200 + 150  # the 200 MB it touched, plus an interpreter
    assert run.log == log and log.read_text().splitlines()[0].startswith(f"$ {sys.executable} -c")
    assert run.output_tail.splitlines()[-1] == "done"
    assert run.cost() == {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "peak_rss_mb": run.peak_rss_mb}


def test_peak_rss_is_the_process_trees_not_the_callers():
    """A grandchild's memory counts; the caller's does not (its high-water mark would survive
    fork and exec into a child started from it directly)."""
    held = b"y" * (600 * MB)  # the caller holds 600 MB while the merge runs
    grandchild = f"import time; b = b'x' * {250 * MB}; time.sleep(0.2)"
    run = runner.run_measured(python(f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], "
                                     "check=True)"))
    assert len(held) == 600 * MB
    assert run.returncode == 0
    assert 240 < run.peak_rss_mb < 250 + 150, run.peak_rss_mb
    assert run.log is None  # a temporary log, already removed


def test_failure_and_timeout_are_reported_not_raised():
    failed = runner.run_measured(python("import sys; print('something broke', file=sys.stderr); sys.exit(3)"))
    assert failed.returncode == 3 and "something broke" in failed.output_tail
    slow = runner.run_measured(python("import time; time.sleep(60)"), timeout=1)
    assert slow.timed_out == 1 and slow.returncode == -9 and slow.wall_s < 30


def test_a_failing_merge_names_its_config_and_output_folder(tmp_path):
    config = runner.write_config(tmp_path / "configs" / "broken.yml", {
        "merge_method": "linear", "models": [{"model": str(tmp_path / "no_such_model"), "parameters": {"weight": 1.0}}],
        "dtype": "float32"}, comment="a model that does not exist")
    assert config.read_text().startswith("# a model that does not exist\nmerge_method: linear\n")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier merge's: emptied first, never taken for this one's
    log = tmp_path / "logs" / "broken.log"
    with pytest.raises(runner.MergeFailed) as caught:
        runner.run_merge(config, out, log=log)
    message = str(caught.value)
    assert f"the merge of {config} into {out} failed (exit " in message and f"log {log}" in message
    assert "no_such_model" in message.split("last lines of its output:")[1]  # mergekit's own words
    assert caught.value.run.returncode != 0 and not (out / "config.json").exists()
    assert log.read_text().startswith("$ ") and "mergekit" in log.read_text().splitlines()[0]
    assert isinstance(caught.value, RuntimeError)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    folder = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def direct_loss(model, sequences):
    """Σ over every next-token target of −log p, over their number, one sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in sequences:
            ids = torch.tensor([s])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += len(s) - 1
    return total / count


def test_heldout_loss_is_the_mean_over_tokens_and_ignores_padding(tiny_lm):
    model = runner.load_causal_lm(tiny_lm)
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (5, 17, 2, 9, 30)]
    expected = direct_loss(model, sequences)
    for batch_size in (1, 2, 5):
        for dtype, tolerance in (("float64", 1e-6), ("float32", 1e-5)):
            found = runner.heldout_loss(model, runner.padded_batches(sequences, batch_size, pad_id=0),
                                        logits_dtype=dtype)
            assert found == pytest.approx(expected, rel=tolerance), (batch_size, dtype)
    # a folder works as well as a loaded model
    assert runner.heldout_loss(tiny_lm, runner.padded_batches(sequences, 2, pad_id=0)) == pytest.approx(expected, rel=1e-6)


def test_batch_means_weigh_full_length_windows_equally(tiny_lm):
    model = runner.load_causal_lm(tiny_lm)
    windows = torch.randint(1, 40, (7, 12), generator=torch.Generator().manual_seed(2))
    batch_means = runner.heldout_loss(model, ((b, None) for b in windows.split(3)), average="batch_means")
    with torch.no_grad():
        expected = sum(model(input_ids=b, labels=b).loss.item() * len(b) for b in windows.split(3)) / len(windows)
    assert batch_means == expected  # the lm benchmark's numbers, exactly
    tokens = runner.heldout_loss(model, ((b, None) for b in windows.split(3)))
    assert tokens == pytest.approx(batch_means, rel=1e-5)  # same windows, same mean
    with pytest.raises(ValueError, match="unpadded"):
        runner.heldout_loss(model, runner.padded_batches([[1, 2, 3], [4, 5]], 2, 0), average="batch_means")


def test_heldout_loss_needs_a_scorable_token(tiny_lm):
    with pytest.raises(ValueError, match="two or more tokens"):
        runner.heldout_loss(tiny_lm, runner.padded_batches([[5], [7]], 2, pad_id=0))
    assert math.isfinite(runner.heldout_loss(tiny_lm, runner.padded_batches([[5, 6]], 1, pad_id=0)))


def test_mergekit_yaml_command_is_this_environments():
    command = runner.mergekit_yaml_command()
    assert command[0].endswith(("mergekit-yaml", "mergekit-yaml.exe")) or command[1:] == ["-m", "mergekit.scripts.run_yaml"]
