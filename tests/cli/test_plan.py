"""`mergekit-qp plan` through the installed command on tiny GPT-2 models (Conv1D weights stored
in × out, biases): the ρ it predicts for each method equals the ρ `diagnose` measures on the
model `mergekit-yaml` writes from the config plan wrote for it; output_qp's prediction also equals
its own merge report (the solve's float64 update, computed apart); the same on Llama models merged
in bfloat16 with a top-level weight and `ties_svc` (which must leave the untied output head alone,
as the merge does); the interference matrix equals one recomputed here from forward hooks, without
Grams; bad inputs are refused before any work."""

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_models
from test_compare import environment, executable  # the installed commands, one thread each
from mergekit_qp.cli.compare import CompareError
from mergekit_qp.cli.plan import plan

METHODS = "output_qp,linear,task_arithmetic,ties,dare_ties"
TASKS = ["expert_a", "expert_b"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    paths = tiny_models.build("gpt2", root)
    config = tiny_models.write_config(root / "qp.yml", paths, "output_qp")
    cache, out = root / "cache", root / "out"
    result = subprocess.run([executable("mergekit-qp"), "plan", str(config), "--methods", METHODS,
                             "--bases", "full,task", "--out", str(out)],
                            capture_output=True, text=True, env=environment(cache), cwd=str(root))
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((out / "plan.json").read_text())
    return SimpleNamespace(root=root, paths=paths, config=config, cache=cache, out=out, result=result, json=payload,
                           rows={m["name"]: m for m in payload["methods"]})


def test_files_table_and_rows(planned):
    assert list(planned.rows) == ["output_qp full", "output_qp task", "linear", "task_arithmetic", "ties", "dare_ties"]
    assert planned.json["tasks"] == TASKS and planned.json["linear_maps"] > 0
    assert (planned.out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (planned.out / "plan.md").read_text()
    for name in planned.rows:
        assert f"| {name}" in markdown
    assert planned.rows["dare_ties"]["random"] and not planned.rows["ties"]["random"]
    assert "dare_ties *" in planned.result.stdout  # a random draw is marked
    # output_qp keeps most of the output change it optimises; the best per task is the max over rows
    for task in TASKS:
        best = max(planned.rows.values(), key=lambda m: m["rho_by_task"][task])
        assert planned.json["best"][task] == {"rho": best["rho_by_task"][task], "method": best["name"]}
    assert planned.rows["output_qp full"]["rho"] >= max(m["rho"] for m in planned.rows.values()) - 1e-12


def merged_with(planned, label: str) -> Path:
    out = planned.root / "merged" / label.replace(" ", "-")
    if not out.exists():
        config = planned.out / planned.json["configs"][label]
        result = subprocess.run([executable("mergekit-yaml"), str(config), str(out)], capture_output=True, text=True,
                                env=environment(planned.cache), cwd=str(planned.root))
        assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def planned_bf16(tmp_path_factory):
    """Llama (untied output head, which mergekit marks with a vocabulary axis), merged in bfloat16,
    output_qp weights ω from a top-level `weight: 2` that expert_b overrides with 1."""
    root = tmp_path_factory.mktemp("plan_bf16")
    paths = tiny_models.build("llama", root)
    config = tiny_models.write_config(root / "qp.yml", paths, "output_qp", parameters={"weight": 2.0})
    raw = yaml.safe_load(config.read_text())
    raw["dtype"] = "bfloat16"
    raw["models"][1]["parameters"]["weight"] = 1.0
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cache, out = root / "cache", root / "out"
    result = subprocess.run([executable("mergekit-qp"), "plan", str(config), "--methods",
                             "output_qp,task_arithmetic,ties_svc", "--bases", "full", "--out", str(out)],
                            capture_output=True, text=True, env=environment(cache), cwd=str(root))
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((out / "plan.json").read_text())
    return SimpleNamespace(root=root, paths=paths, config=config, cache=cache, out=out, result=result, json=payload,
                           rows={m["name"]: m for m in payload["methods"]})


CASES = [("planned", label) for label in ("output_qp full", "output_qp task", "linear", "task_arithmetic", "ties")] + \
        [("planned_bf16", label) for label in ("output_qp full", "task_arithmetic", "ties_svc")]


@pytest.mark.parametrize("setup,label", CASES)
def test_predicted_rho_is_what_diagnose_measures_on_the_merge(setup, label, request, monkeypatch):
    from mergekit_qp.plugin import diagnose

    planned = request.getfixturevalue(setup)
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(planned.cache))
    # the experts and calibration of the output_qp config (a linear config has no base model)
    measured = diagnose(str(planned.config), str(merged_with(planned, label)))
    row = planned.rows[label]
    assert row["rho"] == pytest.approx(measured["rho"], abs=1e-9)
    by_task = {Path(t).name: v for t, v in measured["rho_by_task"].items()}
    assert row["rho_by_task"] == pytest.approx(by_task, abs=1e-9)
    if setup == "planned_bf16":
        assert planned.json["weights"] == [2.0, 1.0]  # mergekit's order: the model's own, then the top level
        merged = load_file(str(merged_with(planned, label) / "model.safetensors"))
        assert merged["lm_head.weight"].dtype == torch.bfloat16
    elif label.startswith("output_qp"):
        # the merge's own report: ρ of the solve's float64 update, before the weights were rounded to float32
        report = json.loads((merged_with(planned, label) / "merge_report.json").read_text())
        assert row["rho"] == pytest.approx(report["rho"], abs=1e-5)


def test_interference_matrix_equals_output_changes_from_forward_hooks(planned):
    """I[j][k] = Σ over linear maps and task k's tokens of |Δ_j x + δb_j|², over the same for
    expert k: activations captured on each expert running its own calibration texts."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    paths = planned.paths
    tokenizer = AutoTokenizer.from_pretrained(str(paths["base"]))
    base = load_file(str(paths["base"] / "model.safetensors"))
    experts = [load_file(str(paths[t] / "model.safetensors")) for t in TASKS]
    energy = torch.zeros(2, 2, dtype=torch.float64)  # [mover j, task k]
    for k, (task, calib) in enumerate(zip(TASKS, ("calib_a", "calib_b"))):
        model = GPT2LMHeadModel.from_pretrained(str(paths[task]), dtype=torch.float32).eval()
        sums, tokens = torch.zeros(2, dtype=torch.float64), [0]

        def hook(name):
            key = next(n for n in base if n.endswith(f"{name}.weight"))
            def record(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                for j, expert in enumerate(experts):
                    dw = expert[key].double() - base[key].double()  # Conv1D: in × out
                    db = expert[key[:-6] + "bias"].double() - base[key[:-6] + "bias"].double()
                    sums[j] += float(((x @ dw + db) ** 2).sum())
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, Conv1D)]
        with torch.no_grad():
            for line in paths[calib].read_text().splitlines():
                ids = tokenizer(json.loads(line)["text"], return_tensors="pt")["input_ids"]
                tokens[0] += ids.shape[1]
                model(input_ids=ids)
        for h in handles:
            h.remove()
        energy[:, k] = sums / tokens[0]
    found = planned.json["interference"]
    for j in range(2):
        for k in range(2):
            assert found[j][k] == pytest.approx(float(energy[j, k] / energy[k, k]), rel=1e-6)
    assert planned.json["energy"]["expert_a"] == pytest.approx(float(energy[0, 0]), rel=1e-6)


def test_ties_svc_leaves_the_vocabulary_head_alone_as_the_merge_does(planned_bf16):
    """Were SVC applied to lm_head in the prediction, the head's update would differ from ties'."""
    ties_svc = load_file(str(merged_with(planned_bf16, "ties_svc") / "model.safetensors"))
    plain = planned_bf16.root / "merged" / "ties-plain"
    config = yaml.safe_load((planned_bf16.out / planned_bf16.json["configs"]["ties_svc"]).read_text())
    config["merge_method"] = "ties"
    (planned_bf16.root / "ties.yml").write_text(yaml.safe_dump(config))
    subprocess.run([executable("mergekit-yaml"), str(planned_bf16.root / "ties.yml"), str(plain)], check=True,
                   capture_output=True, env=environment(planned_bf16.cache))
    ties = load_file(str(plain / "model.safetensors"))
    assert torch.equal(ties_svc["lm_head.weight"], ties["lm_head.weight"])
    assert not torch.equal(ties_svc["model.layers.0.mlp.down_proj.weight"], ties["model.layers.0.mlp.down_proj.weight"])


def test_bad_inputs_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(tmp_path / "cache"))
    paths = tiny_models.build("llama", tmp_path)
    out = str(tmp_path / "plan-out")
    sequential = tiny_models.write_config(tmp_path / "seq.yml", paths, "output_qp", parameters={"sequential": True})
    with pytest.raises(CompareError, match="sequential: true.*not predicted"):
        plan(str(sequential), out_dir=out)
    per_tensor = tiny_models.write_config(tmp_path / "filtered.yml", paths, "output_qp",
                                          parameters={"ridge": [{"filter": "mlp", "value": 0.01}, {"value": 1e-4}]})
    with pytest.raises(CompareError, match=r"output_qp parameter 'ridge' is given per tensor"):
        plan(str(per_tensor), out_dir=out)
    plain = tiny_models.write_config(tmp_path / "qp.yml", paths, "output_qp")
    with pytest.raises(CompareError, match="unknown merge method 'tie'"):
        plan(str(plain), methods=["tie"], out_dir=out)
    with pytest.raises(CompareError, match="plan: slerp: .*"):  # two inputs only: refused before statistics
        plan(str(plain), methods=["slerp"], params=["slerp:t=0.5"], out_dir=out)
    with pytest.raises(CompareError, match=r"-p output_qp:calibration_samples=… would change the calibration"):
        plan(str(plain), params=["output_qp:calibration_samples=8"], out_dir=out)
    with pytest.raises(CompareError, match="--bases lists a value twice"):
        plan(str(plain), bases=["full", "full"], out_dir=out)
    with pytest.raises(CompareError, match="--methods is empty"):
        plan(str(plain), methods=[], out_dir=out)
    no_data = tmp_path / "none.yml"
    raw = yaml.safe_load(plain.read_text())
    del raw["models"][1]["parameters"]["calibration"]
    no_data.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompareError, match=r"plan: expert .*expert_b in .*none.yml has no `calibration:`"):
        plan(str(no_data), out_dir=out)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "plan-out").exists()  # no statistics, no files


# -- choosing checkpoints ------------------------------------------------------------------------
def save_checkpoints(paths, expert, folder: Path, scales):
    """`expert` saved at several "training lengths": its update over the base scaled by each scale."""
    from safetensors.torch import save_file

    base = load_file(str(paths["base"] / "model.safetensors"))
    tensors = load_file(str(paths[expert] / "model.safetensors"))
    out = []
    for step, scale in scales:
        target = folder / f"ckpt-{step}"
        shutil.copytree(paths[expert], target)
        save_file({k: base[k] + scale * (tensors[k] - base[k]) for k in base}, str(target / "model.safetensors"),
                  metadata={"format": "pt"})
        out.append(str(target))
    return out


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """expert_a saved at three "training lengths" (update × 0.3, 1, 3; a folder of checkpoints),
    expert_b at two (× 0.5, 1; a list); held-out texts of each domain; `plan` through the command."""
    root = tmp_path_factory.mktemp("select")
    paths = tiny_models.build("llama", root)
    run_a = save_checkpoints(paths, "expert_a", root / "run_a", ((50, 0.3), (100, 1.0), (400, 3.0)))
    run_b = save_checkpoints(paths, "expert_b", root / "run_b", ((10, 0.5), (20, 1.0)))
    heldout = [root / "heldout_a.jsonl", root / "heldout_b.jsonl"]
    tiny_models.write_calibration(heldout[0], 11, 0, 35, n=12)
    tiny_models.write_calibration(heldout[1], 12, 25, 60, n=12)
    config = tiny_models.write_config(root / "qp.yml", paths, "output_qp")
    raw = yaml.safe_load(config.read_text())
    raw["models"][0]["model"] = str(root / "run_a")
    raw["models"][1]["model"] = run_b
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cache, out = root / "cache", root / "out"
    result = subprocess.run([executable("mergekit-qp"), "plan", str(config), "--methods", "output_qp,ties",
                             "--bases", "full", "--eval", str(heldout[0]), "--eval", str(heldout[1]), "--out", str(out),
                             "-p", "ties:density=0.3"],
                            capture_output=True, text=True, env=environment(cache), cwd=str(root))
    assert result.returncode == 0, result.stderr[-4000:]
    return SimpleNamespace(root=root, paths=paths, config=config, cache=cache, out=out, result=result, run_a=run_a,
                           run_b=run_b, heldout=heldout, json=json.loads((out / "plan.json").read_text()))


def brute_loss(model_dir, tokenizer_dir, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in Path(path).read_text().splitlines():
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def concrete(selected, a: str, b: str, name: str) -> Path:
    raw = yaml.safe_load(selected.config.read_text())
    raw["models"][0]["model"], raw["models"][1]["model"] = a, b
    path = selected.root / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_chosen_checkpoints_keep_the_most_gain_recomputed_independently(selected, monkeypatch):
    """Gains from transformers' logits, ρ from plan on each combination written out by hand: the
    combination with the largest Σ max(gain, 0)·ρ is the one chosen, over all six."""
    selection = selected.json["selection"]
    assert selection["candidates"] == {"run_a": selected.run_a, "run_b": selected.run_b}  # ckpt-50 < 100 < 400
    assert selection["search"] == "exhaustive" and len(selection["evaluated"]) == 6
    base = selected.paths["base"]
    gains = {}
    for task, run, heldout in (("run_a", selected.run_a, selected.heldout[0]), ("run_b", selected.run_b, selected.heldout[1])):
        base_loss = brute_loss(base, base, heldout)
        gains[task] = {c: base_loss - brute_loss(c, base, heldout) for c in run}
        assert selection["gains"][task] == pytest.approx(gains[task], abs=1e-6)
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(selected.cache))
    scores = {}
    for n, (a, b) in enumerate((a, b) for a in selected.run_a for b in selected.run_b):
        rho = plan(str(concrete(selected, a, b, f"c{n}.yml")), ["output_qp"], bases=["full"], out_dir=None)
        rho = list(rho["methods"][0]["rho_by_task"].values())
        scores[(a, b)] = max(gains["run_a"][a], 0) * rho[0] + max(gains["run_b"][b], 0) * rho[1]
    best = max(scores, key=scores.get)
    chosen = selection["chosen"]
    assert (chosen["checkpoints"]["0"], chosen["checkpoints"]["1"]) == best
    assert chosen["score"] == pytest.approx(scores[best], abs=1e-6)
    assert list(chosen["rho_by_task"]) == ["run_a", "run_b"]  # stable names, whatever the checkpoint
    assert selection["last"]["checkpoints"] == {"0": selected.run_a[-1], "1": selected.run_b[-1]}
    individual = {"0": max(gains["run_a"], key=gains["run_a"].get), "1": max(gains["run_b"], key=gains["run_b"].get)}
    assert selection["best_individual"]["checkpoints"] == individual
    # the selected config is a plain output_qp config of the chosen checkpoints, planned in full
    written = yaml.safe_load((selected.out / "plan-configs" / "selected.yml").read_text())
    assert [m["model"] for m in written["models"]] == list(best)
    assert [m["name"] for m in selected.json["methods"]] == ["output_qp full", "ties"]
    assert "## Checkpoints" in (selected.out / "plan.md").read_text()
    assert "chosen checkpoints:" in selected.result.stdout


def test_coordinate_ascent_ends_where_no_single_change_helps(selected, tmp_path, monkeypatch):
    from mergekit_qp.cli import plan_select

    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(selected.cache))
    monkeypatch.setattr(plan_select, "EXHAUSTIVE", 1)
    found = plan_select.select_checkpoints(str(selected.config), [str(h) for h in selected.heldout], ["output_qp"], [],
                                           ["full"], str(tmp_path / "out"))["selection"]
    assert found["search"].startswith("coordinate ascent")
    scores = {(e["checkpoints"]["0"], e["checkpoints"]["1"]): e["score"] for e in selected.json["selection"]["evaluated"]}
    a, b = found["chosen"]["checkpoints"]["0"], found["chosen"]["checkpoints"]["1"]
    assert found["chosen"]["score"] == pytest.approx(scores[(a, b)], abs=1e-9)  # the exhaustive run's score
    assert all(scores[(x, b)] <= scores[(a, b)] + 1e-12 for x in selected.run_a)
    assert all(scores[(a, y)] <= scores[(a, b)] + 1e-12 for y in selected.run_b)
    assert found["chosen"]["score"] >= found["last"]["score"]


def test_checkpoint_selection_refuses_bad_input_before_any_forward_pass(selected, tmp_path):
    from click.testing import CliRunner

    from mergekit_qp.cli import main

    def plan_cli(*args):
        return CliRunner().invoke(main, ["plan", *args, "--out", str(tmp_path / "o")])

    result = plan_cli(str(selected.config))
    assert result.exit_code != 0 and "needs held-out data: --eval FILE, one per expert" in result.output
    result = plan_cli(str(selected.config), "--eval", str(selected.heldout[0]))
    assert result.exit_code != 0 and "--eval got 1 files for 2 experts" in result.output
    result = plan_cli(str(selected.config), "--eval", str(selected.heldout[0]), "--eval", str(tmp_path / "none.jsonl"))
    assert result.exit_code != 0 and "--eval file does not exist" in result.output
    raw = yaml.safe_load(selected.config.read_text())
    raw["models"][1]["model"] = [str(tmp_path / "typo"), *selected.run_b]
    bad = tmp_path / "typo.yml"
    bad.write_text(yaml.safe_dump(raw))
    evals = ["--eval", str(selected.heldout[0]), "--eval", str(selected.heldout[1])]
    result = plan_cli(str(bad), *evals)
    assert result.exit_code != 0 and "typo of models[1] is not a model folder (no config.json)" in result.output
    raw["models"][1]["model"] = selected.run_b
    raw["parameters"] = {"sequential": True}
    bad.write_text(yaml.safe_dump(raw))
    result = plan_cli(str(bad), *evals)
    assert result.exit_code != 0 and "sequential: true" in result.output
    assert not (tmp_path / "o" / "plan.json").exists()
