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
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["size"] for r in rows] == ["XS"]
    for key in ("computed_wall_ratio", "cached_wall_ratio", "cached_rss_ratio", "statistics_vs_forward"):
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key
    assert "| XS (h64×2)" in result.stdout
