"""The clf benchmark: its source parsers on hand-written files, and a smoke run end to end."""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
import sources  # noqa: E402


def test_fortunes_split_on_percent_lines_and_skip_indexes(tmp_path):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "work").write_text("First quote\n  -- someone\n%\n\n%\nSecond quote\n%\n")
    (folder / "work.dat").write_bytes(b"\x00\x01")
    (folder / "work.u8").symlink_to(folder / "work")
    (folder / "latin").write_bytes("Grüße\n%\nzwei".encode("latin-1"))
    assert sources.fortune_files(folder) == [folder / "latin", folder / "work"]
    assert sources.fortunes(folder / "work") == ["First quote\n  -- someone", "Second quote"]
    assert sources.fortunes(folder / "latin") == ["Grüße", "zwei"]


def test_man_paragraphs_strip_roff_and_follow_no_redirections(tmp_path):
    page = tmp_path / "open.2.gz"
    page.write_bytes(gzip.compress(
        b'.\\" a comment that must vanish\n.TH OPEN 2\n.SH NAME\nopen \\- open and possibly create a file\n'
        b'.SH DESCRIPTION\nThe \\fBopen\\fR() system call opens the file\nspecified by\n.IR pathname .\n'
        b'.PP\nshort\n'))
    redirect = tmp_path / "creat.2.gz"
    redirect.write_bytes(gzip.compress(b".so man2/open.2\n"))
    paragraphs = sources.man_paragraphs(page, min_words=3)
    assert paragraphs == ["open - open and possibly create a file",
                          "The open() system call opens the file specified by pathname ."]
    assert sources.man_paragraphs(redirect) == []


def test_splits_are_deterministic_and_near_their_shares():
    keys = [f"doc/{i}" for i in range(5000)]
    splits = [sources.split_of(k) for k in keys]
    assert splits == [sources.split_of(k) for k in keys]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.02
    assert abs(splits.count("val") / 5000 - 0.1) < 0.02


def test_spearman_matches_a_direct_computation():
    assert harness.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert harness.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # with ties: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3) -> Pearson of the ranks
    r = harness.spearman([1, 1, 2, 3], [1, 2, 3, 4])
    assert math.isclose(r, 0.9486832980505138)


def test_clf_smoke_run_writes_results(tmp_path):
    env = dict(os.environ, MERGEKIT_QP_BENCH_DIR=str(tmp_path / "work"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "clf.py"), "--smoke", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((tmp_path / "out" / "clf.json").read_text())
    methods = payload["methods"]
    names = [m.name for m in harness.method_grid(rank=4, smoke=True)]
    assert set(names) <= set(methods)
    assert "base" in methods and all(f"expert:{t}" in methods for t in ("mr", "fortune", "mansec", "langid"))
    for name in names:
        row = methods[name]
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 0
        assert set(row["per_task"]) == {"mr", "fortune", "mansec", "langid"}
        assert all(0 <= v <= 1 for v in row["per_task"].values())
        assert (row["calibration"] is not None) == name.startswith("output_qp")
    # ρ of the base is 0 by definition; the full-basis optimum captures at least what any other merge does
    assert abs(methods["base"]["rho"]) < 1e-6
    assert methods["output_qp"]["rho"] >= max(methods[n]["rho"] for n in names) - 1e-6
    table = (tmp_path / "out" / "clf.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert (tmp_path / "out" / "clf.png").stat().st_size > 0
