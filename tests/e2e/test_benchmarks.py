"""The benchmark scripts run (smoke mode), so they cannot rot unnoticed."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def test_perf_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=str(ROOT),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in lines if "params" in r]
    token_rows = [r for r in lines if "tokens_per_expert" in r]
    assert [r["size"] for r in rows] == ["XS"]
    keys = ["computed_wall_ratio", "cached_wall_ratio", "cached_rss_ratio", "statistics_vs_forward"]
    keys += [f"cached_{basis}_wall_ratio" for basis in ("full", "diagonal", "task", "rank-16")]
    for key in keys:
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key
    assert [r["tokens_per_expert"] for r in token_rows] == [8 * 32]
    assert token_rows[0]["computed_wall_ratio"] > 0
    assert "| XS (h64×2)" in result.stdout


def test_sequential_benchmark_smoke(tmp_path):
    import os

    env = dict(os.environ, MERGEKIT_QP_BENCH_DIR=str(tmp_path / "work"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequential.py"), "--smoke", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=str(ROOT), env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "sequential-smoke.json").read_text())
    rows = payload["rows"]
    methods = {"ties", "output_qp", "sequential merged_inputs", "sequential expert_outputs"}
    assert {(r["layers"], r["method"]) for r in rows} == {(d, m) for d in (2, 4) for m in methods}
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and math.isfinite(r["wall_vs_ties"])
        assert 0 < r["peak_anon_mb"] <= r["peak_rss_mb"]
        if r["method"] == "ties":
            assert r["wall_vs_ties"] == 1.0
    assert (tmp_path / "sequential-smoke.png").stat().st_size > 0
    assert "| 4 | sequential expert_outputs |" in (tmp_path / "sequential-smoke.md").read_text()
