"""`mergekit-qp compare` through the installed command (real `mergekit-yaml` merges in
subprocesses) on tiny Llama models, and the spectrum (ρ against rank, design §3.2 rank-N).

ρ and held-out losses are checked against recomputations here that share no code with the
package: Grams from forward hooks on the calibration texts, J and E from the saved tensors,
losses from transformers' logits, and the best rank-N update from an SVD of the whitened problem.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from mergekit_qp.core.objective import objective as evaluate_objective
from mergekit_qp.core import qp, spectrum

F64 = torch.float64
METHODS = ["output_qp", "ties", "dare_ties", "task_arithmetic"]
TASKS = ["expert_a", "expert_b"]


def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: run `pip install .` first"
    return found


def environment(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # One thread: tiny models gain nothing from more, and the tests share the machine.
    env.update({"MERGEKIT_QP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1"})
    return env


def texts(path: Path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    paths = tiny_models.build("llama", root)
    heldout = {"expert_a": root / "heldout_a.jsonl", "expert_b": root / "heldout_b.jsonl"}
    tiny_models.write_calibration(heldout["expert_a"], 11, 0, 35, n=12)  # fresh samples of each domain
    tiny_models.write_calibration(heldout["expert_b"], 12, 25, 60, n=12)
    config = tiny_models.write_config(root / "qp.yml", paths, "output_qp")
    cache, out = root / "cache", root / "out"
    result = subprocess.run(
        [executable("mergekit-qp"), "compare", str(config), "--methods", ",".join(METHODS),
         "--eval", str(heldout["expert_a"]), "--eval", str(heldout["expert_b"]), "--out", str(out), "--keep-models"],
        capture_output=True, text=True, env=environment(cache), cwd=str(root))
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((out / "compare.json").read_text())
    return SimpleNamespace(root=root, paths=paths, heldout=heldout, config=config, cache=cache, out=out,
                           result=result, json=payload, rows={r["name"]: r for r in payload["rows"]})


# -- independent recomputation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def grams(compared):
    """Per expert: {linear module: input Gram Σ x xᵀ / n} over its calibration tokens, from
    forward hooks (each text on its own, tokenised with the base tokenizer: no padding)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    paths = compared.paths
    tokenizer = AutoTokenizer.from_pretrained(str(paths["base"]))
    found = {}
    for task, calib in (("expert_a", "calib_a"), ("expert_b", "calib_b")):
        model = LlamaForCausalLM.from_pretrained(str(paths[task]), dtype=torch.float32).eval()
        sums, count = {}, [0]

        def hook(name):
            def record(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for text in texts(paths[calib]):
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                count[0] += ids.shape[1]
                model(input_ids=ids)
        for h in handles:
            h.remove()
        found[task] = {name: s / count[0] for name, s in sums.items()}
    return found


def brute_rho(model_dir, paths, grams):
    """ρ overall and per task, ω = 1: 1 − Σ J / Σ E over every linear weight of the model."""
    base = load_file(str(Path(paths["base"]) / "model.safetensors"))
    merged = load_file(str(Path(model_dir) / "model.safetensors"))
    experts = {t: load_file(str(Path(paths[t]) / "model.safetensors")) for t in TASKS}
    objective, energy = dict.fromkeys(TASKS, 0.0), dict.fromkeys(TASKS, 0.0)
    for module, _ in grams[TASKS[0]].items():
        w0 = base[f"{module}.weight"].double()
        update = merged[f"{module}.weight"].double() - w0
        for t in TASKS:
            delta, g = experts[t][f"{module}.weight"].double() - w0, grams[t][module]
            objective[t] += float(torch.trace((update - delta) @ g @ (update - delta).T))
            energy[t] += float(torch.trace(delta @ g @ delta.T))
    return (1 - sum(objective.values()) / sum(energy.values()),
            {t: 1 - objective[t] / energy[t] for t in TASKS})


def brute_losses(model_dir, tokenizer_dir, files):
    """Per file: mean next-token cross-entropy over its texts, each scored on its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    losses = {}
    for task, path in files.items():
        total, count = 0.0, 0
        with torch.no_grad():
            for text in texts(path):
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                logits = model(input_ids=ids).logits[0, :-1].double()
                total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
        losses[task] = total / count
    return losses


# -- compare ------------------------------------------------------------------------------------
def test_table_json_and_files_have_every_method(compared):
    rows = compared.rows
    assert compared.json["methods"] == METHODS
    assert list(rows) == [*METHODS, "base", "expert:expert_a", "expert:expert_b"]
    table = compared.result.stdout
    header = table.splitlines()[0].split()
    assert header[:4] == ["method", "ρ", "ρ", "expert_a"] and "×" in header and "ties" in header
    for name in rows:
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    markdown = (compared.out / "compare.md").read_text()
    for name in rows:
        assert f"| {name} |" in markdown
    for image in ("compare.png", "spectrum.png"):
        assert (compared.out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        row = rows[method]
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 50 and row["cpu_s"] > 0
        assert Path(row["model_dir"]).joinpath("config.json").is_file()  # --keep-models
    assert compared.json["baseline"] == "ties" and rows["ties"]["wall_vs_baseline"] == 1.0
    assert rows["output_qp"]["wall_vs_baseline"] == pytest.approx(rows["output_qp"]["wall_s"] / rows["ties"]["wall_s"])
    # built-in defaults, and no calibration parameters handed to a built-in method
    assert rows["ties"]["per_model_parameters"] == {"weight": 1.0, "density": 0.5}
    assert rows["task_arithmetic"]["per_model_parameters"] == {"weight": 0.5}
    ties_config = (compared.out / "configs" / "ties.yml").read_text()
    assert "calibration" not in ties_config and "dtype: float32" in ties_config
    # statistics computed once, by compare: the output_qp merge read them from the cache
    assert "output_qp statistics" not in Path(rows["output_qp"]["log"]).read_text()
    assert "merged in" in compared.result.stderr  # one progress line per merge


def test_rho_equals_an_independent_recomputation(compared, grams):
    for name, row in compared.rows.items():
        rho, by_task = brute_rho(row["model_dir"], compared.paths, grams)
        assert row["rho"] == pytest.approx(rho, abs=1e-6), name
        assert row["rho_by_task"] == pytest.approx(by_task, abs=1e-6), name
    for method in METHODS[1:]:
        assert compared.rows["output_qp"]["rho"] >= compared.rows[method]["rho"], method
    assert 0 < compared.rows["output_qp"]["rho"] < 1


def test_base_captures_nothing_and_an_expert_all_of_its_own_task(compared, grams):
    """Design §3.3 on whole checkpoints: the base (Δ = 0) has ρ = 0 for every task; an expert
    taken alone (Δ = Δk) has ρ_k = 1 (J_k = 0) and, overall, 1 − Σ_{j≠k} J_j / Σ_j E_j."""
    base = compared.rows["base"]
    assert base["rho"] == 0.0 and base["rho_by_task"] == {t: 0.0 for t in TASKS}
    assert all(layer["rho"] == 0.0 for layer in base["layers"])
    for own in TASKS:
        row = compared.rows[f"expert:{own}"]
        assert row["rho_by_task"][own] == pytest.approx(1.0, abs=1e-12)
        other = next(t for t in TASKS if t != own)
        rho, by_task = brute_rho(row["model_dir"], compared.paths, grams)
        assert row["rho_by_task"][other] == pytest.approx(by_task[other], abs=1e-6)
        assert row["rho_by_task"][other] < 1 - 1e-3  # the other task is not kept for free
        assert row["rho"] == pytest.approx(rho, abs=1e-6)


def test_heldout_losses_equal_transformers_losses(compared):
    for name in [*METHODS, "base"]:
        row = compared.rows[name]
        expected = brute_losses(row["model_dir"], compared.paths["base"], compared.heldout)
        assert row["loss_by_task"] == pytest.approx(expected, rel=1e-6), name


def test_spectrum_is_monotone_and_ends_at_the_output_qp_merge(compared):
    found = compared.json["spectrum"]
    assert json.loads((compared.out / "spectrum.json").read_text()) == found
    assert found["ranks"] == [1, 2, 4, 8, 16, 32]  # hidden 32, intermediate 48, vocab 64
    curves = [found["rho"], *(layer["rho"] for layer in found["layers"]), *(t["rho"] for t in found["tensors"])]
    for curve in curves:
        assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:])), curve
    # The experts are base + rank-2 updates: two of them need rank ≤ 4, and rank 1 cannot do it.
    assert found["rho"][0] < found["rho"][2] - 0.1
    assert found["rho"][2] == pytest.approx(found["rho"][-1], abs=1e-9)
    qp_row = compared.rows["output_qp"]
    assert found["rho"][-1] == pytest.approx(qp_row["rho"], abs=1e-6)
    assert {t: v[-1] for t, v in found["rho_by_task"].items()} == pytest.approx(qp_row["rho_by_task"], abs=1e-6)
    by_layer = {layer["layer"]: layer["rho"] for layer in qp_row["layers"]}
    for layer in found["layers"]:
        assert layer["rho"][-1] == pytest.approx(by_layer[layer["layer"]], abs=1e-6)
    assert "| **all layers** |" in (compared.out / "spectrum.md").read_text()


def test_diagnose_spectrum_writes_it_next_to_the_report(compared, tmp_path):
    from click.testing import CliRunner

    from mergekit_qp.cli import main

    merged = tmp_path / "merged"
    shutil.copytree(compared.rows["ties"]["model_dir"], merged)
    result = CliRunner().invoke(main, ["diagnose", str(compared.out / "configs" / "ties.yml"), str(merged),
                                       "--calibration-config", str(compared.config), "--spectrum"],
                                env={"MERGEKIT_QP_CACHE": str(compared.cache)})
    assert result.exit_code == 0, result.output
    assert "# Spectrum: energy captured against rank" in result.output
    written = json.loads((merged / "spectrum.json").read_text())
    assert written["rho"] == pytest.approx(compared.json["spectrum"]["rho"], abs=1e-12)
    assert (merged / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["rho"] == pytest.approx(compared.rows["ties"]["rho"], abs=1e-9)


def test_misspelt_parameter_fails_before_any_merge(compared, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [executable("mergekit-qp"), "compare", str(compared.config), "-p", "ties:densty=0.3", "--out", str(out)],
        capture_output=True, text=True, env=environment(tmp_path / "cache"))
    assert result.returncode != 0
    assert "ties has no parameter 'densty'" in result.stderr and "Did you mean 'density'?" in result.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()  # no merge, no forward pass


@pytest.mark.parametrize("args, message", [
    (["-p", "output_qp:rigde=0.1"], "output_qp has no parameter 'rigde'"),
    (["--methods", "ties,tie"], "unknown merge method 'tie'"),
    (["-p", "ties:density=dense"], "bad value 'dense' for ties:density"),
    (["--eval", "only_one.jsonl"], "--eval got 1 files for 2 experts"),
])
def test_bad_arguments_fail_before_any_merge(compared, tmp_path, args, message):
    from click.testing import CliRunner

    from mergekit_qp.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compare", str(compared.config), "--out", str(out), *args],
                                env={"MERGEKIT_QP_CACHE": str(tmp_path / "cache")})
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


def test_eval_needs_a_causal_lm(tmp_path):
    from click.testing import CliRunner

    from mergekit_qp.cli import main

    paths = tiny_models.build("bert", tmp_path / "bert")
    config = tiny_models.write_config(tmp_path / "qp.yml", paths, "output_qp")
    result = CliRunner().invoke(main, ["compare", str(config), "--out", str(tmp_path / "out"),
                                       "--eval", str(paths["calib_a"]), "--eval", str(paths["calib_b"])])
    assert result.exit_code != 0
    assert "is not a causal LM (architectures: BertModel)" in result.output and str(paths["base"]) in result.output
    assert not (tmp_path / "out").exists()


def test_failed_merge_names_the_method_and_leaves_no_complete_json(compared, tmp_path):
    """slerp takes exactly two models; mergekit rejects three only once the merge runs."""
    from click.testing import CliRunner

    from mergekit_qp.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(compared.json))  # an earlier, complete run
    result = CliRunner().invoke(main, ["compare", str(compared.config), "--methods", "slerp", "-p", "slerp:t=0.5",
                                       "--out", str(out)], env={"MERGEKIT_QP_CACHE": str(compared.cache)})
    assert result.exit_code != 0
    assert "the slerp merge failed" in result.output and "requires exactly 2 inputs" in result.output
    assert str(out / "logs" / "slerp.log") in result.output
    assert not (out / "compare.json").exists() and not (out / "compare.md").exists()


# -- the spectrum's mathematics -------------------------------------------------------------------
def test_rank_grid():
    assert spectrum.rank_grid([32, 5]) == [1, 2, 4, 8, 16, 32]
    assert spectrum.rank_grid([5]) == [1, 2, 4, 5]
    assert spectrum.rank_grid([1]) == [1]


def whitened_best_rank(xs, deltas, weights, ridge, rank):
    """argmin over rank ≤ N of J_λ, another way: with H = Σ w̃k Gk + λI (w̃ = ω/Σω, λ = ridge ·
    tr(Σ w̃k Gk)/d, the ridge centred on Δ̄ = Σ w̃k Δk), J_λ(Δ) = ‖(Δ − Δ*) H^½‖² + const, so the
    best rank-N Δ is the truncated SVD of Δ* H^½ (Eckart–Young) times H^-½ (symmetric roots)."""
    w = [x / sum(weights) for x in weights]
    grams = [x.T @ x / x.shape[0] for x in xs]
    G = sum(wk * g for wk, g in zip(w, grams))
    d = G.shape[0]
    lam = ridge * float(torch.trace(G)) / d
    mean = sum(wk * dk for wk, dk in zip(w, deltas))
    H = G + lam * torch.eye(d, dtype=F64)
    optimum = (sum(wk * dk @ g for wk, dk, g in zip(w, deltas, grams)) + lam * mean) @ torch.linalg.inv(H)
    mu, V = torch.linalg.eigh(H)
    root, inverse_root = V @ torch.diag(mu.sqrt()) @ V.T, V @ torch.diag(1 / mu.sqrt()) @ V.T
    U, S, Vh = torch.linalg.svd(optimum @ root)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank] @ inverse_root


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("m, d", [(7, 5), (4, 6)])
def test_spectrum_equals_the_best_rank_n_least_squares_solution(ridge, m, d):
    g = torch.Generator().manual_seed(m * 10 + d)
    weights = [1.0, 2.5, 0.7]
    xs = [torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) for n in (9, 13, 11)]
    deltas = [torch.randn(m, d, generator=g, dtype=F64) for _ in weights]

    def rho_of(update):  # straight from the data: Σ ωk ‖Xk (Δ − Δk)ᵀ‖² / nk
        J = sum(wk * float(((x @ (update - dk).T) ** 2).sum()) / x.shape[0] for wk, x, dk in zip(weights, xs, deltas))
        E = sum(wk * float(((x @ dk.T) ** 2).sum()) / x.shape[0] for wk, x, dk in zip(weights, xs, deltas))
        return 1 - J / E

    grams = [x.T @ x / x.shape[0] for x in xs]
    found = spectrum.tensor_spectrum("w", deltas, grams, weights, ridge)
    assert found.full_rank == min(m, d)
    energy = sum(found.energy)
    curve = [1 - sum(found.objective_at(n)) / energy for n in range(1, min(m, d) + 1)]
    for n, value in enumerate(curve, start=1):
        assert value == pytest.approx(rho_of(whitened_best_rank(xs, deltas, weights, ridge, n)), abs=1e-9), n
        # and the package's own rank-N merge has that ρ
        assert value == pytest.approx(evaluate_objective(qp.low_rank_update(deltas, grams, weights, ridge, n), deltas,
                                                   grams, weights).rho, abs=1e-6), n
    if ridge == 0.0:  # J itself is what the rank-N optimum minimises: more rank never captures less
        assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    assert all(math.isfinite(v) for v in curve)


def test_eval_values_pair_only_with_an_expert_name(tmp_path):
    from mergekit_qp.cli.compare import CompareError, parse_eval

    (tmp_path / "lr=1").mkdir()
    a, b = tmp_path / "lr=1" / "a.jsonl", tmp_path / "lr=1" / "b.jsonl"
    a.write_text("{}"), b.write_text("{}")
    experts, names = ["/m/expert_a", "/m/expert_b"], ["expert_a", "expert_b"]
    assert parse_eval([f"expert_b={b}", f"/m/expert_a={a}"], experts, names) == {"expert_a": str(a), "expert_b": str(b)}
    # a path that holds '=' is a file, not a pair
    assert parse_eval([str(a), str(b)], experts, names) == {"expert_a": str(a), "expert_b": str(b)}
    with pytest.raises(CompareError, match="use one form for all"):
        parse_eval([f"expert_a={a}", str(b)], experts, names)


def test_markdown_without_the_spectrum(compared):
    """--no-spectrum: the table and methods stay, the spectrum section goes."""
    from mergekit_qp.cli.compare_report import render_markdown

    with_spectrum = render_markdown(compared.json)
    without = render_markdown({**compared.json, "spectrum": None})
    assert "## Spectrum of the experts" in with_spectrum and "## Spectrum of the experts" not in without
    assert without.split("## Methods")[1] == with_spectrum.split("## Methods")[1]
    assert all(f"| {name} |" in without for name in compared.rows)
