"""The benchmark scripts run (smoke mode), so they cannot rot unnoticed."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
