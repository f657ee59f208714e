"""The installed plugin, through the stock `mergekit-yaml` in a subprocess (a real install:
the start-up hook, not an in-process import, makes `output_qp` known)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tiny_models
from mergekit_qp.core import qp
from mergekit_qp.core.tied_embedding import TiedEmbeddingSystem, tied_rowwise_update
from mergekit_qp.calibration.cache import CalibrationSettings, expert_statistics
from mergekit_qp.calibration.checkpoint import Checkpoint
from mergekit_qp.reports.diagnose import linear_diagnostic


def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which(name)
    assert found, f"{name} is not installed: run `pip install .` first"
    return found


def run(args, cache: Path, *, env_extra=None, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"MERGEKIT_QP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.update(env_extra or {})
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(cache.parent))
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stderr[-4000:]}")
    return result


def merge(paths, method, out: Path, cache: Path, **kwargs):
    config = tiny_models.write_config(out.with_suffix(".yml"), paths, method, **kwargs)
    return run([executable("mergekit-yaml"), str(config), str(out)], cache)


@pytest.fixture(scope="module", params=["llama", "bert"])
def merged(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    paths = tiny_models.build(kind, root)
    cache = root / "cache"
    outs = {m: root / f"out_{m}" for m in ("output_qp", "ties", "task_arithmetic")}
    for method, out in outs.items():
        merge(paths, method, out, cache)
    return kind, paths, cache, outs


def statistics(paths, cache):
    settings = CalibrationSettings(cache_dir=str(cache))
    return [
        expert_statistics(str(paths[e]), str(paths["base"]), str(paths[c]), settings, torch.device("cpu"))
        for e, c in (("expert_a", "calib_a"), ("expert_b", "calib_b"))
    ]


def test_merged_model_loads_and_runs(merged):
    from transformers import AutoModel

    kind, paths, cache, outs = merged
    model = AutoModel.from_pretrained(outs["output_qp"], local_files_only=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[2, 7, 9, 11, 3]]))
    assert torch.isfinite(out.last_hidden_state).all()


def test_calibration_objective_is_no_larger_than_builtin_methods(merged):
    kind, paths, cache, outs = merged
    stats = statistics(paths, cache)
    experts = [str(paths["expert_a"]), str(paths["expert_b"])]
    rho = {
        method: linear_diagnostic(str(paths["base"]), experts, stats, str(out), [1.0, 1.0]).rho
        for method, out in outs.items()
    }
    # Full basis: the optimum of the objective up to the tiny default ridge.
    assert rho["output_qp"] >= rho["ties"] - 1e-6, rho
    assert rho["output_qp"] >= rho["task_arithmetic"] - 1e-6, rho
    assert 0 < rho["output_qp"] <= 1


def test_merged_tensor_equals_an_independent_solve(merged):
    """One projection of the written model equals the QP solved here from the cached Grams,
    bias included in homogeneous coordinates where the layer has one."""
    kind, paths, cache, outs = merged
    stats = statistics(paths, cache)
    module = "model.layers.1.self_attn.o_proj" if kind == "llama" else "encoder.layer.1.attention.output.dense"
    base, out = Checkpoint(str(paths["base"])), Checkpoint(str(outs["output_qp"]))
    experts = [Checkpoint(str(paths[e])) for e in ("expert_a", "expert_b")]
    w0 = base.get(f"{module}.weight").double()
    deltas = [e.get(f"{module}.weight").double() - w0 for e in experts]
    grams = [s.lookup(module).gram.double() for s in stats]
    b0 = base.get(f"{module}.bias")
    if b0 is not None:
        deltas = [torch.cat([d, (e.get(f"{module}.bias").double() - b0.double())[:, None]], 1)
                  for d, e in zip(deltas, experts)]
        grams = [
            torch.cat([torch.cat([g, s.lookup(module).mean.double()[:, None]], 1),
                       torch.cat([s.lookup(module).mean.double(), torch.ones(1, dtype=torch.float64)])[None]], 0)
            for g, s in zip(grams, stats)
        ]
    update = qp.full_update(deltas, grams, [1.0, 1.0], 1e-4).double()
    d = w0.shape[1]
    torch.testing.assert_close(out.get(f"{module}.weight").double(), w0 + update[:, :d], rtol=1e-5, atol=1e-6)
    if b0 is not None:
        torch.testing.assert_close(out.get(f"{module}.bias").double(), b0.double() + update[:, d], rtol=1e-5, atol=1e-6)


def test_report_agrees_with_an_independent_recomputation(merged):
    """merge_report.json of a real merge: overall and per-task ρ equal ρ recomputed here from the
    written checkpoint; every linear weight is listed; the model card points to the report."""
    import json

    kind, paths, cache, outs = merged
    report = json.loads((outs["output_qp"] / "merge_report.json").read_text())
    experts = [str(paths["expert_a"]), str(paths["expert_b"])]
    recomputed = linear_diagnostic(str(paths["base"]), experts, statistics(paths, cache), str(outs["output_qp"]),
                                   [1.0, 1.0])
    assert report["rho"] == pytest.approx(recomputed.rho, abs=1e-5)
    assert list(report["rho_by_task"]) == experts
    assert list(report["rho_by_task"].values()) == pytest.approx(recomputed.rho_by_task, abs=1e-5)
    solved = {t["name"] for t in report["tensors"] if t["fallback"] is None}
    assert solved == {t["name"] for t in recomputed.tensors}
    assert [layer["layer"] for layer in report["layers"]][:2] == [0, 1]
    assert "merge_report.md" in (outs["output_qp"] / "README.md").read_text()
    assert (outs["output_qp"] / "merge_report.md").read_text().startswith("# output_qp merge report")
    assert (outs["output_qp"] / "merge_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (outs["ties"] / "merge_report.json").exists()


def test_second_merge_reuses_cached_statistics(merged, tmp_path):
    kind, paths, cache, outs = merged
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    result = merge(paths, "output_qp", tmp_path / "diag", cache, parameters={"basis": "diagonal", "ridge": 0.01})
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert "output_qp statistics" not in result.stderr  # no forward pass, no progress bar


def test_bert_needs_and_gets_the_plan_tensor_fix(tmp_path):
    paths = tiny_models.build("bert", tmp_path / "bert")
    config = tiny_models.write_config(tmp_path / "ties.yml", paths, "ties")
    cache = tmp_path / "cache"
    broken = run([executable("mergekit-yaml"), str(config), str(tmp_path / "a")], cache,
                 env_extra={"MERGEKIT_QP_NO_AUTOLOAD": "1"}, check=False)
    if broken.returncode == 0:
        pytest.fail("mergekit no longer crashes on BERT aliases: the version-gated fix can go")
    assert "can only concatenate list" in broken.stderr
    run([executable("mergekit-yaml"), str(config), str(tmp_path / "b")], cache)
    assert (tmp_path / "b" / "config.json").exists()


def test_opt_out_and_explicit_command(tmp_path):
    paths = tiny_models.build("llama", tmp_path / "llama")
    config = tiny_models.write_config(tmp_path / "qp.yml", paths, "output_qp")
    cache = tmp_path / "cache"
    off = {"MERGEKIT_QP_NO_AUTOLOAD": "1"}
    result = run([executable("mergekit-yaml"), str(config), str(tmp_path / "a")], cache, env_extra=off, check=False)
    assert result.returncode != 0 and "Unimplemented merge method output_qp" in result.stderr
    run([executable("mergekit-qp"), "yaml", str(config), str(tmp_path / "b")], cache, env_extra=off)
    assert (tmp_path / "b" / "model.safetensors").exists()


def run_in_process(config: Path, out: Path, cache: Path):
    """mergekit-yaml's own click command, in this process (the checks below need no hook)."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    import mergekit_qp

    mergekit_qp.register()
    return CliRunner().invoke(main, [str(config), str(out)], env={"MERGEKIT_QP_CACHE": str(cache)})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_models.build("llama", tmp_path_factory.mktemp("llama-config"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"parameters": {"rigde": 0.1}}, "unknown parameter 'rigde' in parameters; did you mean 'ridge'?"),
        ({"model_parameters": {"wieght": 2.0}}, "unknown parameter 'wieght' in models[0]"),
        ({"parameters": {"basis": "rank-0"}}, "invalid basis 'rank-0'"),
        ({"parameters": {"ridge": -1.0}}, "ridge must be finite and ≥ 0"),
        ({"parameters": {"nonneg": True}}, "nonneg / sum_to_one apply to basis: task only"),
        ({"parameters": {"fallback": "ties"}}, "invalid fallback 'ties'"),
        ({"parameters": {"calibration_samples": 0}}, "calibration_samples must be ≥ 1"),
        ({"parameters": {"ridge": float("nan")}}, "ridge must be finite"),
        ({"model_parameters": {"ridge": 0.1}}, "'ridge' in models[0]"),
        ({"parameters": {"calibration_samples": [8, 16]}}, "must be a plain value in the top-level parameters"),
        ({"parameters": {"statistics_dtype": "float16"}}, "invalid statistics_dtype 'float16' (parameters); valid: "
                                                          "float32, bfloat16 (float16 overflows"),
        ({"model_parameters": {"statistics_dtype": "bfloat16"}}, "'statistics_dtype' in models[0]"),
    ],
)
def test_bad_configuration_fails_before_writing_anything(tmp_path, llama, change, message):
    config = tiny_models.write_config(tmp_path / "qp.yml", llama, "output_qp", **change)
    out = tmp_path / "out"
    result = run_in_process(config, out, tmp_path / "cache")
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # failed before any forward pass


def test_slices_that_do_not_line_up_are_rejected(tmp_path, llama):
    calib = {"calibration": str(llama["calib_a"])}
    config = {
        "merge_method": "output_qp",
        "base_model": str(llama["base"]),
        "slices": [
            {"sources": [
                {"model": str(llama["base"]), "layer_range": [0, 1]},
                {"model": str(llama["expert_a"]), "layer_range": [1, 2], "parameters": calib},
            ]},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "slices.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_in_process(path, tmp_path / "out", tmp_path / "cache")
    assert result.exit_code != 0
    assert "slices do not line up" in str(result.exception) and "expert_a" in str(result.exception)


def test_diagnose_a_builtin_merge_on_the_output_qp_scale(merged, tmp_path):
    """`mergekit-qp diagnose` on a ties merge, calibration taken from the output_qp config: the
    written report equals the diagnostic computed here, and ranks output_qp above ties."""
    import json
    import shutil

    kind, paths, cache, outs = merged
    qp_config = outs["output_qp"].with_suffix(".yml")
    ties_config = outs["ties"].with_suffix(".yml")
    ties = tmp_path / "ties"
    shutil.copytree(outs["ties"], ties)  # the report is written into the merged folder
    result = run([executable("mergekit-qp"), "diagnose", str(ties_config), str(ties),
                  "--calibration-config", str(qp_config)], cache)
    assert "# output_qp merge report" in result.stdout
    report = json.loads((ties / "merge_report.json").read_text())
    experts = [str(paths["expert_a"]), str(paths["expert_b"])]
    expected = linear_diagnostic(str(paths["base"]), experts, statistics(paths, cache), str(ties), [1.0, 1.0])
    assert report["rho"] == pytest.approx(expected.rho, abs=1e-6)
    assert list(report["rho_by_task"].values()) == pytest.approx(expected.rho_by_task, abs=1e-6)
    own = json.loads((outs["output_qp"] / "merge_report.json").read_text())
    assert own["rho"] >= report["rho"]
    assert "output_qp statistics" not in result.stderr  # the merge's cached statistics were reused

    missing = run([executable("mergekit-qp"), "diagnose", str(ties_config), str(ties), "--no-write"],
                  cache, check=False)
    assert missing.returncode != 0 and "no calibration for" in missing.stderr


def test_tied_embedding_is_solved_for_both_roles(tmp_path):
    """A model whose output head is its input embedding (SmolLM2, Gemma, Qwen2-0.5B): the one
    tensor is solved for both roles from the cached statistics (token frequencies and the
    head's input Gram); `tied_head: false` gives the token-frequency rule alone."""
    from mergekit_qp.core.statistics import EmbeddingStats

    paths = tiny_models.build("llama", tmp_path / "models", tied=True)
    cache = tmp_path / "cache"
    outs = {}
    for flag in (True, False):
        out = tmp_path / f"out_{flag}"
        config = tiny_models.write_config(out.with_suffix(".yml"), paths, "output_qp",
                                          parameters={"tied_head": flag})
        result = run_in_process(config, out, cache)
        assert result.exit_code == 0, result.output
        outs[flag] = Checkpoint(str(out)).get("model.embed_tokens.weight").double()
        assert Checkpoint(str(out)).get("lm_head.weight") is None  # still one tensor
    stats = statistics(paths, cache)
    name = "model.embed_tokens.weight"
    base = Checkpoint(str(paths["base"])).get(name).double()
    experts = [Checkpoint(str(paths[e])).get(name).double() for e in ("expert_a", "expert_b")]
    freq = [s.lookup("model.embed_tokens").freq.double() for s in stats]
    head = [s.lookup("lm_head") for s in stats]
    assert all(h is not None and not isinstance(h, EmbeddingStats) for h in head)
    deltas = [e - base for e in experts]
    both = tied_rowwise_update(deltas, freq, TiedEmbeddingSystem([h.gram for h in head], [1.0, 1.0], 1e-4))
    tokens_only = qp.rowwise_update(deltas, freq, [1.0, 1.0], 1e-4)
    torch.testing.assert_close(outs[True], base + both.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[False], base + tokens_only.double(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outs[True], outs[False])
