"""Suite `lm-real` end to end in smoke mode: a tiny stand-in for SmolLM2 (tied embeddings), local
text, real merges through mergekit-yaml, rows saved as they finish and reused by a rerun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT / "benchmarks"))

import lm_real


def run(tmp_path, *extra):
    env = dict(os.environ, MERGEKIT_QP_BENCH_DIR=str(tmp_path / "work"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lm_real.py"), "--smoke", "--threads", "1", "--out",
         str(tmp_path), *extra],
        check=False, capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=600,
    )


def test_lm_real_smoke(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((tmp_path / "lm_real.json").read_text())
    build = lm_real.SMOKE
    assert payload["meta"]["build"]["smoke"] is True and payload["meta"]["seeds"] == [0]
    domains = list(build.domains)
    grid = lm_real.real_grid(build)
    methods = payload["methods"]
    assert list(methods) == ["base", *(f"expert:{d}" for d in domains), *(m.name for m in grid)]

    base = methods["base"]
    for d in domains:  # each expert learnt its own domain; its gain there is the reported one
        expert = methods[f"expert:{d}"]["per_task"][d]
        assert expert["loss"] < base["per_task"][d]["loss"]
        assert expert["gain_kept"] == 1.0
        assert payload["expert_gain"]["0"][d] == round(base["per_task"][d]["loss"] - expert["loss"], 4)
        assert 0 <= expert["accuracy"] <= 1
    assert base["gain_kept"] == 0.0 and abs(base["rho"]) < 1e-6 and base["worst_vs_base"] == 0.0

    for method in grid:
        row = methods[method.name]
        assert math.isfinite(row["gain_kept"]) and math.isfinite(row["mean_loss"]), method.name
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 0
        # worst Δ is the largest loss increase over the base, from the per-domain losses
        worst = max(row["per_task"][d]["loss"] - base["per_task"][d]["loss"] for d in domains)
        assert math.isclose(row["worst_vs_base"], worst, rel_tol=1e-9, abs_tol=1e-12)
        expected = build.tokens(method.parameters.get("calibration_samples", build.calibration_windows))
        assert row["calibration"] == (expected if method.calibrated else None)
    assert methods["ties"]["wall_vs_ties"] == 1.0

    # the calibration files hold full windows of `context` token ids, as the budget says
    key = build.data_key()
    calib = tmp_path / "work" / "lm_real" / key / "calibration" / f"{domains[0]}.jsonl"
    rows = [json.loads(line)["input_ids"] for line in calib.read_text().splitlines()]
    assert len(rows) >= max(build.calibration_windows, *build.budgets)
    assert all(len(r) == build.context for r in rows)

    table = (tmp_path / "lm_real.md").read_text()
    for name in methods:
        assert f"| {name} |" in table, name
    assert (tmp_path / "lm_real.png").stat().st_size > 1000

    # a rerun of one row re-merges it and keeps the others' saved rows
    before = methods
    result = run(tmp_path, "--methods", "ties", "--rerun")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "seed 0 ties:" in result.stderr and "seed 0 linear:" not in result.stderr
    after = json.loads((tmp_path / "lm_real.json").read_text())["methods"]
    assert after["linear"]["seeds"] == before["linear"]["seeds"]
    assert after["ties"]["gain_kept"] == before["ties"]["gain_kept"]  # a deterministic merge
    assert after["ties"]["seeds"]["0"]["wall_s"] != before["ties"]["seeds"]["0"]["wall_s"]
