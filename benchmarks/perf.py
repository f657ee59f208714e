"""Cost of `output_qp` against `ties`, measured in the same run on the same models.

For each model size it builds a Llama base and two experts (base plus low-rank updates) with
pre-tokenised calibration data, then runs, each in a fresh process: `ties`, `output_qp` with an
empty statistics cache (forward passes included) and `output_qp` again (statistics cached).
It reports merge wall time and peak resident memory as ratios to `ties`, and the statistics
pass against a plain forward pass over the same tokens. Results: benchmarks/results/perf.{json,md}.

    python benchmarks/perf.py            # three sizes, ~10 min on 2 cores
    python benchmarks/perf.py --smoke    # one tiny size, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# (name, hidden, layers, heads, ffn, vocab)
SIZES = [
    ("S", 128, 2, 4, 352, 2048),
    ("M", 256, 4, 4, 704, 4096),
    ("L", 512, 4, 8, 1408, 4096),
]
SMOKE = [("XS", 64, 2, 4, 176, 512)]
BASES = ("full", "diagonal", "task", "rank-16")
TOKEN_SWEEP = (32, 64, 128, 256)  # calibration samples of 128 tokens per expert

RUNNER = r"""
import json, os, sys, threading, time
import yaml
import mergekit_qp
mergekit_qp.register()
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

# Peak anonymous RSS, sampled: VmHWM also counts the file-backed pages of the checkpoints mergekit
# mmaps, which grow with model size whatever the method; RssAnon is what the merge itself holds.
peak_anon = [0]
def sample_anon(stop):
    while not stop.wait(0.005):
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
stop = threading.Event()
threading.Thread(target=sample_anon, args=(stop,), daemon=True).start()
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
shard = {"out_shard_size": int(sys.argv[3])} if len(sys.argv) > 3 else {}
start = time.perf_counter(); cpu = time.process_time()
run_merge(config, sys.argv[2], options=MergeOptions(quiet=True, copy_tokenizer=False, **shard))
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
stop.set()
# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the high-water mark of the process this one was
# forked from (it survives fork and exec), so it would count the memory of whatever started it.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": int(hwm.split()[1]) / 1024,
                  "peak_anon_mb": peak_anon[0] / 1024}))
"""


def build(root: Path, hidden, layers, heads, ffn, vocab, samples, seq_len) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max(seq_len, 128),
                         tie_word_embeddings=False)
    paths = {}
    for name, seed in (("base", None), ("expert_a", 1), ("expert_b", 2)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 2:
                        update = torch.randn(p.shape[0], 8, generator=g) @ torch.randn(8, p.shape[1], generator=g)
                        p += 0.02 * p.std() * update / 8
        model.save_pretrained(root / name, safe_serialization=True)
        paths[name] = root / name
    g = torch.Generator().manual_seed(3)
    for name in ("calib_a", "calib_b"):
        with open(root / f"{name}.jsonl", "w") as fp:
            for _ in range(samples):
                ids = torch.randint(0, vocab, (seq_len,), generator=g).tolist()
                fp.write(json.dumps({"input_ids": ids}) + "\n")
        paths[name] = root / f"{name}.jsonl"
    params = sum(p.numel() for p in model.parameters())
    return {"paths": paths, "params": params}


def write_config(path: Path, paths: dict, method: str, samples: int, seq_len: int, basis: str = "full") -> Path:
    import yaml

    models = []
    for expert, calib in (("expert_a", "calib_a"), ("expert_b", "calib_b")):
        p = {"calibration": str(paths[calib])} if method == "output_qp" else {"weight": 1.0, "density": 0.5}
        models.append({"model": str(paths[expert]), "parameters": p})
    config = {"merge_method": method, "base_model": str(paths["base"]), "models": models, "dtype": "float32"}
    if method == "output_qp":
        config["parameters"] = {"calibration_samples": samples, "calibration_seq_len": seq_len, "basis": basis}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_merge_process(config: Path, out: Path, cache: Path, out_shard_size: int | None = None) -> dict:
    """One merge in a fresh process: wall, CPU, peak RSS (VmHWM) and sampled peak anonymous RSS.

    The merge runs in RUNNER, which times `run_merge` itself (not the interpreter's or mergekit's
    start-up) and reads its own memory; the process is run, and a failure reported (naming the
    config and the output folder), by the shared runner of mergekit_qp/cli/runner.py.
    `out_shard_size` (bytes) makes mergekit's writer flush output shards that often: it holds
    every merged tensor of the current shard in memory (default 5 GB, i.e. the whole model here)."""
    from mergekit_qp.cli.runner import MergeFailed, run_measured

    shutil.rmtree(out, ignore_errors=True)
    shard = [str(out_shard_size)] if out_shard_size else []
    run = run_measured([sys.executable, "-c", RUNNER, str(config), str(out), *shard],
                       env={"MERGEKIT_QP_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    report = next((line for line in reversed(run.output_tail.splitlines()) if line.startswith('{"wall_s"')), None)
    if run.returncode != 0 or report is None:
        raise MergeFailed(config, out, run)
    return json.loads(report)


def forward_ratio(model_dir: Path, calib: Path, samples: int, seq_len: int, reps: int) -> dict:
    """Statistics pass over the calibration tokens against a plain forward pass (median of reps)."""
    from mergekit_qp.calibration.models import load_model
    from mergekit_qp.calibration.data import CalibrationSource, batches, load_records, tokenize_calibration
    from mergekit_qp.calibration.collector import StatisticsCollector

    model = load_model(str(model_dir), torch.device("cpu"))
    sequences = tokenize_calibration(load_records(CalibrationSource(str(calib))), None,
                                     samples=samples, seq_len=seq_len)
    batch_list = list(batches(sequences, max_tokens=4096))

    def plain():
        with torch.no_grad():
            for ids, mask in batch_list:
                model(input_ids=ids, attention_mask=mask.long())

    def with_statistics():
        collector = StatisticsCollector(model)
        for ids, mask in batch_list:
            collector.observe(ids, mask)
        collector.tensors()
        collector.close()

    timings = {"forward_s": [], "statistics_s": []}
    plain(), with_statistics()  # warm-up: first passes on new shapes are slower
    for _ in range(reps):
        for key, fn in (("forward_s", plain), ("statistics_s", with_statistics)):
            start = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - start)
    forward, stats = statistics.median(timings["forward_s"]), statistics.median(timings["statistics_s"])
    return {"forward_s": forward, "statistics_s": stats, "ratio": stats / forward,
            "tokens": sum(len(s) for s in sequences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny size, no result files")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2, help="merge repetitions (fastest kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads here and in each merge process (OMP_NUM_THREADS)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "perf")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every merge process
    sizes = SMOKE if args.smoke else SIZES
    samples = 8 if args.smoke else args.samples
    seq_len = 32 if args.smoke else args.seq_len
    reps = 1 if args.smoke else args.reps

    rows = []
    for name, hidden, layers, heads, ffn, vocab in sizes:
        root = args.workdir / name
        shutil.rmtree(root, ignore_errors=True)
        built = build(root, hidden, layers, heads, ffn, vocab, samples, seq_len)
        paths = built["paths"]
        configs = {"ties": write_config(root / "ties.yml", paths, "ties", samples, seq_len)}
        for basis in BASES:
            configs[basis] = write_config(root / f"qp-{basis}.yml", paths, "output_qp", samples, seq_len, basis)
        cache = root / "cache"
        runs: dict[str, list] = {"ties": [], "output_qp_computed": [], **{f"output_qp_cached_{b}": [] for b in BASES}}
        for _ in range(reps):
            runs["ties"].append(run_merge_process(configs["ties"], root / "out_ties", cache))
            shutil.rmtree(cache, ignore_errors=True)
            runs["output_qp_computed"].append(run_merge_process(configs["full"], root / "out_qp", cache))
            for basis in BASES:
                runs[f"output_qp_cached_{basis}"].append(run_merge_process(configs[basis], root / "out_qp", cache))
        best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
        forward = forward_ratio(paths["expert_a"], paths["calib_a"], samples, seq_len, reps=1 if args.smoke else 3)
        row = {
            "size": name, "hidden": hidden, "layers": layers, "ffn": ffn, "vocab": vocab,
            "params": built["params"], "calibration": f"2 experts x {samples} samples x {seq_len} tokens",
            **{f"{k}_wall_s": v["wall_s"] for k, v in best.items()},
            **{f"{k}_cpu_s": v["cpu_s"] for k, v in best.items()},
            **{f"{k}_peak_rss_mb": v["peak_rss_mb"] for k, v in best.items()},
            "computed_wall_ratio": best["output_qp_computed"]["wall_s"] / best["ties"]["wall_s"],
            "computed_rss_ratio": best["output_qp_computed"]["peak_rss_mb"] / best["ties"]["peak_rss_mb"],
            **{f"cached_{b}_wall_ratio": best[f"output_qp_cached_{b}"]["wall_s"] / best["ties"]["wall_s"]
               for b in BASES},
            **{f"cached_{b}_rss_ratio": best[f"output_qp_cached_{b}"]["peak_rss_mb"] / best["ties"]["peak_rss_mb"]
               for b in BASES},
            "statistics_vs_forward": forward["ratio"],
            "forward_s": forward["forward_s"], "statistics_s": forward["statistics_s"],
        }
        # the names the first version of this file wrote, kept for readers of older results
        row["cached_wall_ratio"], row["cached_rss_ratio"] = row["cached_full_wall_ratio"], row["cached_full_rss_ratio"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Growth with calibration tokens: statistics computed afresh at the middle size.
    token_rows = []
    name, hidden, layers, heads, ffn, vocab = sizes[len(sizes) // 2]
    for n in ([8] if args.smoke else TOKEN_SWEEP):
        root = args.workdir / f"tokens-{n}"
        shutil.rmtree(root, ignore_errors=True)
        paths = build(root, hidden, layers, heads, ffn, vocab, n, seq_len)["paths"]
        ties = run_merge_process(write_config(root / "ties.yml", paths, "ties", n, seq_len), root / "out_ties",
                                 root / "cache")
        qp = run_merge_process(write_config(root / "qp.yml", paths, "output_qp", n, seq_len), root / "out_qp",
                               root / "cache")
        token_rows.append({"size": name, "samples": n, "tokens_per_expert": n * seq_len,
                           "ties_wall_s": ties["wall_s"], "computed_wall_s": qp["wall_s"],
                           "computed_wall_ratio": qp["wall_s"] / ties["wall_s"],
                           "computed_peak_rss_mb": qp["peak_rss_mb"],
                           "computed_rss_ratio": qp["peak_rss_mb"] / ties["peak_rss_mb"]})
        print(json.dumps(token_rows[-1]), flush=True)
        shutil.rmtree(root, ignore_errors=True)

    table = render(rows) + "\n\n" + render_tokens(token_rows)
    print(table)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "reps": reps}
        (args.out / "perf.json").write_text(json.dumps({"meta": meta, "rows": rows, "calibration_tokens": token_rows},
                                                       indent=2) + "\n")
        (args.out / "perf.md").write_text(table + "\n")
        plot(rows, token_rows, args.out / "perf.png")


def render(rows) -> str:
    lines = [
        "| size | params | ties merge s | output_qp computed s (× ties) | cached, × ties: "
        + " / ".join(BASES) + " | peak RSS MB ties / computed / cached full | statistics pass ÷ forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cached = " / ".join(f"{r[f'cached_{b}_wall_ratio']:.2f}" for b in BASES)
        lines.append(
            f"| {r['size']} (h{r['hidden']}×{r['layers']}) | {r['params'] / 1e6:.1f} M | {r['ties_wall_s']:.2f} "
            f"| {r['output_qp_computed_wall_s']:.2f} ({r['computed_wall_ratio']:.2f}×) | {cached} "
            f"| {r['ties_peak_rss_mb']:.0f} / {r['output_qp_computed_peak_rss_mb']:.0f} / "
            f"{r['output_qp_cached_full_peak_rss_mb']:.0f} | {r['statistics_vs_forward']:.2f}× |"
        )
    return "\n".join(lines)


def render_tokens(rows) -> str:
    lines = ["| size | calibration tokens per expert | ties s | output_qp computed s (× ties) | peak RSS × ties |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['tokens_per_expert']} | {r['ties_wall_s']:.2f} "
                     f"| {r['computed_wall_s']:.2f} ({r['computed_wall_ratio']:.2f}×) | {r['computed_rss_ratio']:.2f} |")
    return "\n".join(lines)


def plot(rows, token_rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    x = [r["params"] / 1e6 for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for key, label in (("ties_wall_s", "ties"), ("output_qp_computed_wall_s", "output_qp (statistics computed)"),
                       *[(f"output_qp_cached_{b}_wall_s", f"output_qp {b} (cached)") for b in BASES]):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("model parameters (M)")
    ax.set_ylabel("merge wall time (s)")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if token_rows:
        t = [r["tokens_per_expert"] for r in token_rows]
        ax2.plot(t, [r["ties_wall_s"] for r in token_rows], marker="o", label="ties")
        ax2.plot(t, [r["computed_wall_s"] for r in token_rows], marker="o", label="output_qp (statistics computed)")
        ax2.set_xlabel(f"calibration tokens per expert (size {token_rows[0]['size']})")
        ax2.set_ylabel("merge wall time (s)")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
