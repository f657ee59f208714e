"""Issue 18's checkpoint experiment end to end in smoke mode: checkpoints saved while training,
`mergekit-qp plan` choosing among them, the named combinations merged through mergekit-yaml and
scored on test windows; a rerun reuses every saved piece."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT / "benchmarks"))

import checkpoints
import lm_real


def run(tmp_path):
    env = dict(os.environ, MERGEKIT_QP_BENCH_DIR=str(tmp_path / "work"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoints.py"), "--smoke", "--threads", "1", "--out",
         str(tmp_path)], check=False, capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=600)


def test_checkpoint_selection_smoke(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((tmp_path / "checkpoints.json").read_text())
    build, steps = lm_real.SMOKE, list(checkpoints.SMOKE_STEPS)
    domains = list(build.domains)
    block = payload["seeds"]["0"]
    root = tmp_path / "work" / "lm_real" / build.data_key()
    for d in domains:  # one folder per checkpoint, each a model; gains on validation and test reported
        assert list(block["checkpoints"][d]) == [f"step{n}" for n in steps]
        for n in steps:
            assert (checkpoints.checkpoint_folder(root, build, 0, d, n) / "config.json").is_file()
        assert all(math.isfinite(c["val_gain"]) and math.isfinite(c["test_gain"])
                   for c in block["checkpoints"][d].values())
    # the checkpoints are saved along the run, not copies of its end
    from safetensors.torch import load_file

    first, last = (load_file(str(checkpoints.checkpoint_folder(root, build, 0, domains[0], n) / "model.safetensors"))
                   for n in (steps[0], steps[-1]))
    assert any(not (first[k] == last[k]).all() for k in first)

    merges = block["merges"]
    assert set(merges) == {"chosen by plan", "last", "best individual",
                           *(f"all {n} steps" for n in steps[:-1])}
    assert all(c == f"step{steps[-1]}" for c in merges["last"]["checkpoints"].values())
    for n in steps[:-1]:
        assert all(c == f"step{n}" for c in merges[f"all {n} steps"]["checkpoints"].values())
    # best individual: each expert's checkpoint of the largest validation gain
    for d in domains:
        gains = {name: c["val_gain"] for name, c in block["checkpoints"][d].items()}
        assert merges["best individual"]["checkpoints"][d] == max(gains, key=gains.get)
    for name, m in merges.items():
        # the score is plan's formula on the reported gains and ρ, for searched and added combinations
        val = [block["checkpoints"][d][m["checkpoints"][d]]["val_gain"] for d in domains]
        assert math.isclose(m["predicted_score"], sum(max(g, 0) * r for g, r in zip(val, m["rho_by_task"])),
                            rel_tol=1e-9, abs_tol=1e-12), name
        assert math.isclose(m["test_loss_drop_sum"], sum(m["test_loss_drop"].values()), rel_tol=1e-12)
        base = payload["meta"]["base_test_loss"]
        assert math.isclose(m["mean_loss"], sum(base[d] - m["test_loss_drop"][d] for d in domains) / len(domains),
                            rel_tol=1e-9)
    # plan chose the best combination it scored
    planned = json.loads((checkpoints.run_folder(root, build, 0) / "plan-steps5-10-20" / "plan.json").read_text())["selection"]
    assert merges["chosen by plan"]["predicted_score"] == max(e["score"] for e in planned["evaluated"])
    table = (tmp_path / "checkpoints.md").read_text()
    assert all(f"| {name} |" in table for name in merges)
    assert (tmp_path / "checkpoints.png").stat().st_size > 1000

    again = run(tmp_path)  # everything saved: no training, no plan, no merge
    assert again.returncode == 0, again.stderr[-4000:]
    assert "[checkpoints] seed 0" not in again.stderr and "seed 0 " + domains[0] not in again.stderr
    assert json.loads((tmp_path / "checkpoints.json").read_text())["seeds"] == payload["seeds"]

    # a run interrupted after some of a domain's checkpoints: the rerun trains that domain again
    import shutil

    shutil.rmtree(checkpoints.checkpoint_folder(root, build, 0, domains[0], steps[-1]))
    resumed = run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"seed 0 {domains[0]}" in resumed.stderr and f"seed 0 {domains[1]}" not in resumed.stderr
    assert all((checkpoints.checkpoint_folder(root, build, 0, domains[0], n) / "config.json").is_file() for n in steps)
