"""Unequal task weights through a whole merge, and the report's ρ recomputed independently from
activations gathered here with hooks (not through the package's objective): the merged weight
is the ω-weighted least-squares optimum, the report's ρ overall and per task is 1 − ΣωJ/ΣωE
over every linear map, and `diagnose` on the same merge agrees."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import tiny_models
from mergekit_qp.calibration.checkpoint import Checkpoint
from mergekit_qp.calibration.data import CalibrationSource, load_records, tokenize_calibration
from test_end_to_end import run_in_process

WEIGHTS = {"expert_a": 0.3, "expert_b": 1.7}


def linear_inputs(model_dir, calibration, tokenizer):
    """Every nn.Linear's inputs on the calibration sequences the statistics pass uses (one
    sequence at a time: no padding), float64 rows by module name."""
    sequences = tokenize_calibration(load_records(CalibrationSource(str(calibration))), tokenizer, samples=128,
                                     seq_len=512, seed=0, source_name=str(calibration))
    model = LlamaForCausalLM.from_pretrained(model_dir).float().eval()
    rows = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: rows.setdefault(n, []).append(args[0][0].double()))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for s in sequences:
            model(input_ids=s[None])
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    paths = tiny_models.build("llama", root)
    config = tiny_models.write_config(root / "qp.yml", paths, "output_qp", parameters={"ridge": 0.0})
    import yaml

    raw = yaml.safe_load(config.read_text())
    for model, name in zip(raw["models"], ("expert_a", "expert_b")):
        model["parameters"]["weight"] = WEIGHTS[name]
    config.write_text(yaml.safe_dump(raw))
    out = root / "out"
    result = run_in_process(config, out, root / "cache")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    inputs = {e: linear_inputs(paths[e], paths[c], tokenizer) for e, c in (("expert_a", "calib_a"),
                                                                         ("expert_b", "calib_b"))}
    return paths, config, out, inputs


def test_weighted_merge_is_the_weighted_least_squares_optimum(weighted):
    paths, _, out, inputs = weighted
    module = "model.layers.1.mlp.down_proj"
    w0 = Checkpoint(str(paths["base"])).get(f"{module}.weight").double()
    rows, targets = [], []
    for e in ("expert_a", "expert_b"):
        x = inputs[e][module]
        wk = Checkpoint(str(paths[e])).get(f"{module}.weight").double()
        rows.append(x * (WEIGHTS[e] / len(x)) ** 0.5)
        targets.append(rows[-1] @ (wk - w0).T)
    expected = w0 + torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    got = Checkpoint(str(out)).get(f"{module}.weight").double()
    assert torch.linalg.norm(got - expected) <= 1e-3 * torch.linalg.norm(expected - w0)
    # and the weights matter: the equal-weight optimum is measurably elsewhere
    equal = w0 + torch.linalg.lstsq(torch.cat([r / WEIGHTS[e] ** 0.5 for r, e in zip(rows, WEIGHTS)]),
                                    torch.cat([t / WEIGHTS[e] ** 0.5 for t, e in zip(targets, WEIGHTS)])).solution.T
    assert torch.linalg.norm(got - equal) > 10 * torch.linalg.norm(got - expected)


def independent_rho(paths, merged_dir, inputs):
    base, merged = Checkpoint(str(paths["base"])), Checkpoint(str(merged_dir))
    j = {e: 0.0 for e in WEIGHTS}
    energy = {e: 0.0 for e in WEIGHTS}
    for e in WEIGHTS:
        expert = Checkpoint(str(paths[e]))
        for module, x in inputs[e].items():
            w0, wk, wm = (c.get(f"{module}.weight").double() for c in (base, expert, merged))
            j[e] += float(((x @ (wm - wk).T) ** 2).sum()) / len(x)
            energy[e] += float(((x @ (wk - w0).T) ** 2).sum()) / len(x)
    overall = 1 - sum(WEIGHTS[e] * j[e] for e in WEIGHTS) / sum(WEIGHTS[e] * energy[e] for e in WEIGHTS)
    return overall, {e: 1 - j[e] / energy[e] for e in WEIGHTS}


def test_report_rho_equals_an_independent_recomputation(weighted):
    paths, _, out, inputs = weighted
    report = json.loads((out / "merge_report.json").read_text())
    linear = {t["name"] for t in report["tensors"] if t["fallback"] is None}
    assert linear == {f"{m}.weight" for m in inputs["expert_a"]}, "every linear map solved, nothing else recorded"
    overall, by_task = independent_rho(paths, out, inputs)
    assert report["rho"] == pytest.approx(overall, abs=2e-4)
    for e in WEIGHTS:
        assert report["rho_by_task"][str(paths[e])] == pytest.approx(by_task[e], abs=2e-4)
    # ω enters the overall ρ: the unweighted combination is measurably different here
    assert abs(overall - (by_task["expert_a"] + by_task["expert_b"]) / 2) > 1e-3


def test_diagnose_of_a_weighted_merge_agrees(weighted):
    from mergekit_qp.plugin import diagnose

    paths, config, out, inputs = weighted
    report = diagnose(str(config), str(out))
    overall, by_task = independent_rho(paths, out, inputs)
    assert report["rho"] == pytest.approx(overall, abs=2e-4)
    assert [report["rho_by_task"][str(paths[e])] for e in WEIGHTS] == pytest.approx(
        [by_task[e] for e in WEIGHTS], abs=2e-4)
