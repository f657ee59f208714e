"""The demo's self-built models (mergekit_qp.cli.demo, demo_assets, demo_texts) in their quick variant."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_qp.cli import demo, demo_assets, demo_texts

QUICK = demo_assets.QUICK_SETTINGS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the quick models are tiny: one thread is as fast and avoids oversubscribing busy CPUs
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def quick_assets(tmp_path_factory):
    return demo_assets.build_demo(tmp_path_factory.mktemp("demo_quick"), quick=True)


@pytest.fixture(scope="module")
def losses(quick_assets):
    a = quick_assets
    models = {"base": a.base, **{f"expert:{d}": p for d, p in a.experts.items()}}
    return {name: {d: demo.heldout_file_loss(path, a.heldout[d]) for d in a.domains}
            for name, path in models.items()}


def _texts(path: Path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_layout(quick_assets):
    a = quick_assets
    assert a.domains == list(demo_texts.DOMAINS)
    assert set(a.calibration) == set(a.heldout) == set(a.experts) == set(demo_texts.DOMAINS)
    marker = json.loads((a.workdir / demo_assets.MARKER_NAME).read_text())
    assert marker["digest"] == a.digest == QUICK.digest()


def test_models_load_offline(quick_assets, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    a = quick_assets
    for path in [a.base, *a.experts.values()]:
        assert (path / "model.safetensors").is_file()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        assert model.config.model_type == "llama"
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert len(tok) == model.config.vocab_size
        text = "def f(x):\n    return x + 1\n"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: lossless
        with torch.inference_mode():
            logits = model(torch.tensor([[tok.bos_token_id] + ids])).logits
        assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_each_expert_beats_base_on_its_domain(losses):
    for d in demo_texts.DOMAINS:
        own = losses[f"expert:{d}"][d]
        assert math.isfinite(own)
        assert own < losses["base"][d] - 0.05, (d, losses)
        # and is the best of all models on its domain
        assert own == min(row[d] for row in losses.values()), (d, losses)


def test_heldout_loss_excludes_padding(quick_assets):
    a = quick_assets
    batched = demo.heldout_file_loss(a.base, a.heldout["code"], batch_size=16)
    single = demo.heldout_file_loss(a.base, a.heldout["code"], batch_size=1)  # no padding at all
    assert batched == pytest.approx(single, rel=1e-5)


def test_calibration_from_train_split_only(quick_assets):
    a = quick_assets
    for d in demo_texts.DOMAINS:
        train, held = demo_texts.domain_documents(d, QUICK)
        assert train and held
        assert {doc.key for doc in train}.isdisjoint(doc.key for doc in held)
        calibration = _texts(a.calibration[d])
        heldout = _texts(a.heldout[d])
        assert len(calibration) == min(QUICK.calibration_samples, len(train))
        assert heldout == [doc.text for doc in held]
        assert set(calibration) <= {doc.text for doc in train}
        assert set(calibration).isdisjoint(heldout)


def test_domain_split_is_deterministic():
    for d in demo_texts.DOMAINS:
        first = demo_texts.domain_documents(d, QUICK)
        assert first == demo_texts.domain_documents(d, QUICK)
        train, held = first
        assert 0.03 < len(held) / (len(train) + len(held)) < 0.25


def test_build_is_deterministic_and_idempotent(quick_assets, tmp_path):
    a = quick_assets
    # idempotent: same settings -> nothing rebuilt
    stamp = {p: p.stat().st_mtime_ns for p in a.workdir.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    again = demo_assets.build_demo(a.workdir, quick=True)
    assert time.perf_counter() - t0 < 2.0
    assert again.base == a.base and again.experts == a.experts
    assert stamp == {p: p.stat().st_mtime_ns for p in a.workdir.rglob("*") if p.is_file()}

    # deterministic: a fresh build elsewhere gives the same weights, tokenizer and data
    b = demo_assets.build_demo(tmp_path / "other", quick=True)
    for x, y in [(a.base, b.base)] + [(a.experts[d], b.experts[d]) for d in demo_texts.DOMAINS]:
        wx, wy = load_file(str(x / "model.safetensors")), load_file(str(y / "model.safetensors"))
        assert wx.keys() == wy.keys()
        for k in wx:
            assert torch.equal(wx[k], wy[k]), (x, k)
        assert (x / "tokenizer.json").read_bytes() == (y / "tokenizer.json").read_bytes()
    for d in demo_texts.DOMAINS:
        assert a.calibration[d].read_bytes() == b.calibration[d].read_bytes()
        assert a.heldout[d].read_bytes() == b.heldout[d].read_bytes()


def test_write_merge_config(quick_assets, tmp_path):
    a = quick_assets
    ties = yaml.safe_load(demo.write_merge_config(tmp_path / "ties.yaml", a, "ties").read_text())
    assert ties["merge_method"] == "ties" and ties["base_model"] == str(a.base)
    assert ties["dtype"] == "float32"
    assert [m["model"] for m in ties["models"]] == [str(a.experts[d]) for d in demo_texts.DOMAINS]
    assert all(m["parameters"] == {"weight": 1.0, "density": 0.5} for m in ties["models"])

    extra = {"calibration": "{calibration}", "parameters": {"calibration_samples": 8, "basis": "full"},
             "per_model": {"code": {"weight": 2.0}}}
    qp = yaml.safe_load(demo.write_merge_config(tmp_path / "qp.yaml", a, "output_qp", extra).read_text())
    assert qp["merge_method"] == "output_qp" and qp["base_model"] == str(a.base)
    assert qp["parameters"] == {"calibration_samples": 8, "basis": "full"}
    for d, m in zip(demo_texts.DOMAINS, qp["models"]):
        expected = {"calibration": str(a.calibration[d])}
        if d == "code":
            expected["weight"] = 2.0
        assert m["parameters"] == expected


def test_format_table():
    rows = [{"method": "base", "losses": {"code": 1.0, "prose": 2.0}, "mean": 1.5, "wall_s": None, "rho": 0.0},
            {"method": "ties", "losses": {"code": 1.25, "prose": 2.5}, "mean": 1.875, "wall_s": 3.21, "rho": 0.4567}]
    table = demo.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["method", "code", "prose", "mean", "rho", "wall", "s"]
    assert lines[3].split() == ["ties", "1.2500", "2.5000", "1.8750", "0.457", "3.2"]


@pytest.mark.slow
def test_run_comparison_task_arithmetic(quick_assets):
    a = quick_assets
    rows = demo.run_comparison(a.workdir, ["task_arithmetic"], {}, assets=a)
    assert [r["method"] for r in rows] == ["base"] + [f"expert:{d}" for d in demo_texts.DOMAINS] + ["task_arithmetic"]
    merged = rows[-1]
    assert merged["kind"] == "merge" and merged["wall_s"] > 0
    assert set(merged["losses"]) == set(demo_texts.DOMAINS)
    assert all(math.isfinite(v) and v > 0 for v in merged["losses"].values())
    out = Path(merged["model_dir"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = yaml.safe_load((a.workdir / "configs" / "task_arithmetic.yaml").read_text())
    assert config["merge_method"] == "task_arithmetic"
    table = demo.format_table(rows)
    for d in demo_texts.DOMAINS:
        assert d in table.splitlines()[0]
    assert "task_arithmetic" in table
