"""Suite `lm` end to end in smoke mode: data from the Python install, tiny Llama, real merges."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import method_grid

DOMAINS = ("code", "cdecl", "man", "prose")


def test_lm_smoke(tmp_path):
    env = dict(os.environ, MERGEKIT_QP_BENCH_DIR=str(tmp_path / "work"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lm.py"), "--smoke", "--threads", "1", "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    payload = json.loads((tmp_path / "lm.json").read_text())
    assert payload["meta"]["build"]["smoke"] is True
    methods = payload["methods"]
    assert methods == payload["settings"]["gentle"]["methods"]
    grid = method_grid(rank=32, smoke=True)
    names = ["base", *(f"expert:{d}" for d in DOMAINS), *(m.name for m in grid)]
    assert list(methods) == names

    for method in grid:
        row = methods[method.name]
        assert math.isfinite(row["gain_kept"]), method.name
        assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_rss_mb"] > 0
        assert math.isfinite(row["rho"]) and set(row["rho_by_task"]) == set(DOMAINS)
        assert set(row["per_task"]) == set(DOMAINS)
        assert row["calibration"] == ("16 x 64" if method.calibrated else None)
        assert set(row["seeds"]) == {"0"}
    assert methods["ties"]["wall_vs_ties"] == 1.0
    for name in names[:5]:
        assert methods[name]["wall_s"] is None and methods[name]["calibration"] is None

    # real behaviour: each expert learnt its own domain, and the base changes nothing (ρ = 0)
    base = methods["base"]
    for d in DOMAINS:
        assert methods[f"expert:{d}"]["per_task"][d]["loss"] < base["per_task"][d]["loss"] - 0.02, d
        assert methods[f"expert:{d}"]["per_task"][d]["gain_kept"] == 1.0
    assert abs(base["rho"]) < 1e-6 and base["gain_kept"] == 0.0

    table = (tmp_path / "lm.md").read_text()
    for name in names:
        assert f"| {name} |" in table, name
    assert "Spearman" in table
    assert (tmp_path / "lm.png").stat().st_size > 1000

    # --update re-runs some rows (and ties, their time baseline) into the same lm.json
    before = payload["settings"]["gentle"]["methods"]
    (tmp_path / "lm.json").write_text(json.dumps({**payload, "settings": {"gentle": {
        **payload["settings"]["gentle"], "methods": {**before, "output_qp": {**before["output_qp"], "wall_vs_ties": 7.5}}}}}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lm.py"), "--smoke", "--threads", "1", "--out", str(tmp_path),
         "--update", "--methods", "ties_svc"],
        check=False, capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    updated = json.loads((tmp_path / "lm.json").read_text())
    after = updated["settings"]["gentle"]["methods"]
    assert list(after) == names
    assert after["output_qp"]["wall_vs_ties"] == 7.5  # a kept row keeps its ratio to its own run's ties
    assert after["output_qp"]["seeds"] == before["output_qp"]["seeds"]
    assert after["ties_svc"]["wall_s"] != before["ties_svc"]["wall_s"]  # re-measured
    assert after["ties"]["wall_vs_ties"] == 1.0
    assert after["ties_svc"]["gain_kept"] == before["ties_svc"]["gain_kept"]  # deterministic merge
    assert "ties_svc" in updated["meta"]["notes"][-1] and "Rows re-measured" in (tmp_path / "lm.md").read_text()
