"""Issue 18's experiment: which checkpoint of each expert to merge, on suite `lm-real`.

arXiv 2506.14126 reports that longer expert fine-tuning merges worse. Here each lm-real expert
(SmolLM2-135M-Instruct, domains code / man / prose / german) is fine-tuned again with the recipe
of lm_real.py (4 x 256 tokens per step, AdamW lr 1e-4, constant after a 10 % warm-up, bfloat16
autocast, the same data order) for the longest of STEPS, saving a checkpoint at each of STEPS.
Then, per seed:
- `mergekit-qp plan` (the command users run) on an output_qp config listing every expert's
  checkpoints, with the validation split as `--eval`, chooses a combination: each checkpoint's gain
  is its validation loss drop against the base, a combination's score is Σ_k max(gain_k, 0) · ρ_k
  of the output_qp merge (predicted from the calibration statistics, no model written);
- the chosen combination, the last checkpoints, each expert's best individual checkpoint and every
  uniform length (all experts at n steps) are merged with output_qp through `mergekit-yaml` and
  scored on the test windows (never seen in training, calibration or selection): the merged
  model's loss drop against the base on each domain, summed over domains (the measured
  counterpart of the score), and its mean loss.
Whether the paper's effect appears (do merges of longer-trained experts keep less?) and whether the
prediction catches it (does the plan score order the merges as the test loss does?) are the
findings, reported either way. Results: benchmarks/results/checkpoints.{json,md,png}.

    python benchmarks/checkpoints.py --threads 2             # seeds 0 1 (~25 min per seed on 2 cores)
    python benchmarks/checkpoints.py --smoke --out /tmp/x    # tiny stand-in model, local text
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm
import lm_real
from harness import RESULTS, Method, clean_nan, fmt, mean, merge_config, provenance, run_merge, save_json, spearman
from mergekit_qp.cli.runner import write_config
from sources import bench_dir

STEPS = (15, 30, 60)  # lm_real's experts take 60 (code 120): a quarter, a half, all of it
SMOKE_STEPS = (5, 10, 20)


def run_folder(root: Path, build, seed: int) -> Path:
    """One seed's training run: its checkpoints and scored rows (a checkpoint at n steps depends on
    the run's length through the warm-up, not on where else it saves)."""
    return root / "checkpoints" / f"lr{build.expert_lr:g}-x{build.expert_batch}-to{max(steps_of(build))}-seed{seed}"


def checkpoint_folder(root: Path, build, seed: int, domain: str, steps: int) -> Path:
    return run_folder(root, build, seed) / domain / f"step{steps}"


def steps_of(build) -> tuple:
    return SMOKE_STEPS if build.smoke else STEPS


def train_checkpoints(build, root: Path, shared: dict, seed: int, log: dict) -> dict[str, list[Path]]:
    """Per domain the checkpoint folders, in training order (trains what is missing)."""
    import torch
    from transformers import LlamaForCausalLM

    saved = json.loads((shared["base"] / "config.json").read_text())
    dtype = getattr(torch, saved.get("dtype") or saved.get("torch_dtype") or "float32")
    folders = {}
    for i, d in enumerate(build.domains):
        folders[d] = [checkpoint_folder(root, build, seed, d, n) for n in steps_of(build)]
        if all((f / "config.json").is_file() for f in folders[d]):
            continue
        for f in folders[d]:  # an interrupted run's checkpoints: this run saves them all again
            shutil.rmtree(f, ignore_errors=True)
            f.parent.mkdir(parents=True, exist_ok=True)

        def save(done: int, model, d=d):
            if done in steps_of(build):
                lm.save_model(copy.deepcopy(model).to(dtype), shared["tokenizer"],
                              checkpoint_folder(root, build, seed, d, done))

        model = LlamaForCausalLM.from_pretrained(str(shared["base"]), dtype=torch.float32)
        log[f"{run_folder(root, build, seed).name}/{d}"] = lm.train(  # lm_real's training seed: the same data order as its experts
            model, [shared["streams"][d]], steps=max(steps_of(build)), batch=build.expert_batch, lr=build.expert_lr,
            seed=1000 * seed + i + 1, cosine=False, desc=f"seed {seed} {d}", context=build.context,
            bf16=not build.smoke, on_step=save)
        save_json(root / "checkpoints" / "training.json", log)
    return folders


def output_qp_config(build, shared: dict, choice: list, root: Path) -> dict:
    """lm_real's output_qp config (its calibration budget and statistics cache) for one checkpoint per domain."""
    return merge_config(Method("output_qp", "output_qp"), shared["base"], dict(zip(build.domains, map(Path, choice))),
                        shared["calibration"],
                        {"calibration_samples": build.calibration_windows, "calibration_seq_len": build.context},
                        root / "statistics")


def combination_key(choice: list) -> str:
    return "-".join(Path(c).name for c in choice)


def plan_config(build, shared: dict, folders: dict, root: Path) -> dict:
    """The output_qp config with every expert's checkpoints listed (`model: [step15, ...]`)."""
    config = output_qp_config(build, shared, [folders[d][-1] for d in build.domains], root)
    for model, d in zip(config["models"], build.domains):
        model["model"] = [str(f) for f in folders[d]]
    return config


def run_plan(config: dict, out: Path, build, root: Path, threads: int) -> None:
    """`mergekit-qp plan` with the validation split as --eval (OUT/plan.json; plan_wall.json last)."""
    config_path = write_config(out / "checkpoints.yml", config)
    evals = [str(root / "data" / f"{d}.val.jsonl") for d in build.domains]
    cmd = [sys.executable, "-c", "from mergekit_qp.cli import main; main()", "plan", str(config_path),
           "--methods", "output_qp", "--bases", "full", "--out", str(out),
           "--eval-samples", str(build.eval_windows), "--eval-seq-len", str(build.context),
           *[arg for path in evals for arg in ("--eval", path)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "plan.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"checkpoints: mergekit-qp plan failed (exit {done.returncode}); log {out / 'plan.log'}:\n"
                         + "\n".join((done.stdout + done.stderr).splitlines()[-20:]))
    save_json(out / "plan_wall.json", {"wall_s": time.perf_counter() - start})


def predicted_score(config: dict, choice: list[str], gains: list[float], out: Path) -> dict:
    """Plan's score of a combination it did not evaluate (the same row and formula as plan's; saved)."""
    import torch

    from mergekit_qp.cli.plan import plan

    saved = out / "extra" / f"{combination_key(choice)}.json"
    if not saved.is_file():
        one = {**config, "models": [{**m, "model": c} for m, c in zip(config["models"], choice)]}
        path = write_config(saved.with_suffix(".yml"), one)
        torch.manual_seed(0)  # as plan scores a combination
        result = plan(str(path), ["output_qp"], [], ["full"], out_dir=None, device="cpu", interference=False)
        row = next(m for m in result["methods"] if m["name"] == "output_qp full")
        save_json(saved, {"rho_by_task": [row["rho_by_task"][t] for t in result["tasks"]]})
    rho = json.loads(saved.read_text())["rho_by_task"]
    return {"rho_by_task": rho, "score": sum(max(g, 0.0) * r for g, r in zip(gains, rho))}


def combinations(build, folders: dict, selection: dict) -> dict[str, list[str]]:
    """The merges to run: name → one checkpoint folder per domain (plan numbers the experts by
    their place in the config, which is build.domains' order)."""
    def pick(entry: dict) -> list[str]:
        return [entry["checkpoints"][str(i)] for i in range(len(build.domains))]

    named = {"chosen by plan": pick(selection["chosen"]), "last": [str(folders[d][-1]) for d in build.domains],
             "best individual": pick(selection["best_individual"])}
    for j, n in enumerate(steps_of(build)[:-1]):
        named[f"all {n} steps"] = [str(folders[d][j]) for d in build.domains]
    return named


def score_merge(build, root: Path, shared: dict, choice: list[str], name: str, seed: int, threads: int) -> dict:
    """output_qp merge of one combination through mergekit-yaml, scored on the test windows (saved)."""
    key = combination_key(choice)
    path = run_folder(root, build, seed) / "rows" / f"merge-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = root / "merges" / f"checkpoints-seed{seed}" / key
    cost = run_merge(output_qp_config(build, shared, choice, root), out, root / "logs" / f"checkpoints-seed{seed}", threads=threads)
    row = {"scores": lm_real.evaluate(out, shared["windows"]), **cost}
    shutil.rmtree(out)  # a merged model is 0.5 GB
    save_json(path, row)
    print(f"[checkpoints] seed {seed} {name} ({key}): mean loss "
          f"{fmt(mean(s['loss'] for s in row['scores'].values()))}", file=sys.stderr, flush=True)
    return row


def own_domain_loss(shared: dict, folder: Path, domain: str) -> float:
    """A checkpoint's test loss on its own domain (saved)."""
    path = folder.parent.parent / "rows" / f"{domain}-{folder.name}.json"
    if not path.is_file():
        save_json(path, lm_real.evaluate(folder, {domain: shared["windows"][domain]})[domain])
    return json.loads(path.read_text())["loss"]


def run_seed(build, root: Path, shared: dict, base_scores: dict, seed: int, threads: int, log: dict) -> dict:
    folders = train_checkpoints(build, root, shared, seed, log)
    out = run_folder(root, build, seed) / ("plan-steps" + "-".join(map(str, steps_of(build))))
    config = plan_config(build, shared, folders, root)
    if not (out / "plan_wall.json").is_file():  # written last: plan finished
        run_plan(config, out, build, root, threads)
    planned = json.loads((out / "plan.json").read_text())
    selection = planned["selection"]
    val_gain = list(selection["gains"].values())  # per expert in config order: checkpoint → gain
    checkpoints = {d: {f.name: {"val_gain": val_gain[i][str(f)],
                                "test_gain": base_scores[d]["loss"] - own_domain_loss(shared, f, d)}
                       for f in folders[d]} for i, d in enumerate(build.domains)}
    scored = {tuple(e["checkpoints"][str(i)] for i in range(len(build.domains))): e for e in selection["evaluated"]}
    merges = {}
    for name, choice in combinations(build, folders, selection).items():
        entry = scored.get(tuple(choice))
        if entry is None:  # a uniform length the search did not visit: the same score, computed here
            entry = predicted_score(config, choice, [val_gain[i][c] for i, c in enumerate(choice)], out)
            entry["rho_by_task"] = dict(zip(build.domains, entry["rho_by_task"]))
        row = score_merge(build, root, shared, choice, name, seed, threads)
        drop = {d: base_scores[d]["loss"] - row["scores"][d]["loss"] for d in build.domains}
        merges[name] = {"checkpoints": {d: Path(c).name for d, c in zip(build.domains, choice)},
                        "predicted_score": entry["score"], "rho_by_task": list(entry["rho_by_task"].values()),
                        "test_loss_drop": drop, "test_loss_drop_sum": sum(drop.values()),
                        "mean_loss": mean(s["loss"] for s in row["scores"].values()), "wall_s": row["wall_s"]}
    names = list(merges)
    return {"checkpoints": checkpoints, "merges": merges, "search": selection["search"],
            "combinations_scored": len(selection["evaluated"]), "plan_wall_s": json.loads((out / "plan_wall.json").read_text())["wall_s"],
            "spearman_predicted_vs_measured": spearman([merges[n]["predicted_score"] for n in names],
                                                       [merges[n]["test_loss_drop_sum"] for n in names])}


def steps_label(checkpoints: dict) -> str:
    return ", ".join(f"{d} {c.removeprefix('step')}" for d, c in checkpoints.items())


def render(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Which checkpoints to merge: `mergekit-qp plan` on lm-real (issue 18)", "",
             f"Experts: {meta['experts']}; checkpoints at {', '.join(map(str, meta['steps']))} steps. Selection: "
             "`mergekit-qp plan --methods output_qp --bases full --eval <domain>.val.jsonl` (validation split, "
             f"{meta['build']['eval_windows']} windows × {meta['build']['context']} tokens): score Σ_k max(val gain_k, 0)"
             " · ρ_k. Every merge is output_qp through `mergekit-yaml` (calibration "
             f"{meta['build']['calibration_windows']} windows × {meta['build']['context']} tokens per expert), "
             "scored on the test windows: Σ test loss drop = Σ over domains of (base loss − merged loss), "
             "nats/token (higher is better); it is what the score predicts, on other data.", ""]
    for seed, block in result["seeds"].items():
        lines += [f"## Seed {seed}", "", "Each checkpoint's gain on its own domain (nats/token, base loss − its "
                  "loss), validation / test:", "",
                  "| domain | " + " | ".join(f"{n} steps" for n in meta["steps"]) + " |",
                  "|---" * (1 + len(meta["steps"])) + "|"]
        for d, ck in block["checkpoints"].items():
            lines.append(f"| {d} | " + " | ".join(f"{fmt(c['val_gain'])} / {fmt(c['test_gain'])}" for c in ck.values())
                         + " |")
        lines += ["", f"Search: {block['search']}, {block['combinations_scored']} combinations scored"
                  + (f" in {block['plan_wall_s']:.0f} s" if block.get("plan_wall_s") else "") + ".", "",
                  "| merge | steps per expert | predicted score | ρ per task | Σ test loss drop | mean test loss |",
                  "|---|---|---:|---|---:|---:|"]
        for name, m in block["merges"].items():
            lines.append(f"| {name} | {steps_label(m['checkpoints'])} | {fmt(m['predicted_score'])} | "
                         + ", ".join(fmt(r, 2) for r in m["rho_by_task"])
                         + f" | {fmt(m['test_loss_drop_sum'])} | {fmt(m['mean_loss'])} |")
        lines += ["", f"Spearman correlation of predicted score and Σ test loss drop over these merges: "
                  f"{fmt(block['spearman_predicted_vs_measured'], 2)}.", ""]
    lines += ["## Over seeds", "", "| merge | predicted score | Σ test loss drop | mean test loss |", "|---|---:|---:|---:|"]
    for name, m in result["summary"].items():
        lines.append(f"| {name} | {fmt(m['predicted_score'])} | {fmt(m['test_loss_drop_sum'])} | {fmt(m['mean_loss'])} |")
    lines += ["", f"Provenance: commit {meta['commit']}, {meta['date']}, {meta['machine']}, {meta['threads']} threads, "
              f"Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
              f"mergekit {meta['mergekit']}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (seed, block), marker in zip(result["seeds"].items(), "os^v"):
        same: dict[tuple, list[str]] = {}  # one point per distinct combination, all its names
        for name, m in block["merges"].items():
            same.setdefault(tuple(m["checkpoints"].values()), []).append(name)
        for names in same.values():
            m = block["merges"][names[0]]
            ax.scatter(m["predicted_score"], m["test_loss_drop_sum"], marker=marker,
                       color="tab:orange" if "chosen by plan" in names else "tab:blue")
            ax.annotate(f"{' = '.join(names)} (s{seed})", (m["predicted_score"], m["test_loss_drop_sum"]),
                        fontsize=6, xytext=(-4, -9), textcoords="offset points", ha="right")
    ax.margins(x=0.3, y=0.1)  # room for the labels left of the points
    ax.set_xlabel("plan's score Σ max(val gain, 0) · ρ (predicted, no model written)")
    ax.set_ylabel("Σ test loss drop of the output_qp merge (nats/token)")
    ax.set_title("lm-real: which checkpoints to merge", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in model on local Python text, no download")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: work folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, nargs="+", help="expert seeds (default 0 1; smoke 0)")
    args = parser.parse_args()
    build = lm_real.SMOKE if args.smoke else lm_real.FULL
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAYON_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.smoke else [0, 1])
    root = bench_dir() / "lm_real" / build.data_key()
    out = args.out or (root / "results" if args.smoke else RESULTS)
    lm_real.prepare_data(build, root)
    shared = lm_real.shared_data(build, root)
    base_path = root / "checkpoints" / "base_test.json"
    if not base_path.is_file():
        save_json(base_path, lm_real.evaluate(shared["base"], shared["windows"]))
    base_scores = json.loads(base_path.read_text())
    log_path = root / "checkpoints" / "training.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    per_seed = {str(s): run_seed(build, root, shared, base_scores, s, args.threads, log) for s in seeds}
    names = list(per_seed[str(seeds[0])]["merges"])
    summary = {n: {k: mean(b["merges"][n][k] for b in per_seed.values())
                   for k in ("predicted_score", "test_loss_drop_sum", "mean_loss")} for n in names}
    result = {"meta": {
        **provenance(args.threads), "seeds": seeds, "build": dataclasses.asdict(build), "steps": list(steps_of(build)), "training": log,
        "experts": (f"full fine-tunes of the base, {build.expert_batch} x {build.context} tokens per step, AdamW lr "
                    f"{build.expert_lr:g}, constant after a 10 % warm-up of {max(steps_of(build))} steps"),
        "base_test_loss": {d: s["loss"] for d, s in base_scores.items()},
    }, "seeds": per_seed, "summary": summary}
    save_json(out / "checkpoints.json", clean_nan(result))
    (out / "checkpoints.md").write_text(render(result) + "\n", encoding="utf-8")
    plot(result, out / "checkpoints.png")
    print(render(result))


if __name__ == "__main__":
    main()
