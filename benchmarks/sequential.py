"""Sequential (layer-wise) output_qp: peak memory and wall time against depth.

Llama models of 4, 8 and 16 layers (same width) are built here; each depth is merged with
`ties`, independent `output_qp` and sequential `output_qp` (both targets), every merge in its
own process. Memory is reported twice: peak RSS (VmHWM), which also counts the file pages of the
mmap'd checkpoints and so grows with depth for every method, and the sampled peak of anonymous
RSS (RssAnon), what the merge holds itself; output shards are flushed every ~16 MB (about one
layer) so that mergekit's writer does not hold the whole merged model for any method. Independent statistics are computed once
beforehand (untimed), as a re-run would find them; the sequential chain's forward passes
cannot be cached and are always timed. Ratios are against `ties` and independent `output_qp`
of the same depth, measured in the same run.

    python benchmarks/sequential.py [--threads 1] [--smoke]

Writes results/sequential.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import perf

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

DEPTHS = (4, 8, 16)
WIDTH = dict(hidden=512, heads=8, ffn=1408, vocab=4096)
SAMPLES, SEQ_LEN = 32, 128
SHARD_BYTES = 16_000_000  # about one layer at this width: the writer flushes instead of holding the model
METHODS = {
    "ties": ("ties", {}),
    "output_qp": ("output_qp", {}),
    "sequential merged_inputs": ("output_qp", {"sequential": True, "target": "merged_inputs"}),
    "sequential expert_outputs": ("output_qp", {"sequential": True, "target": "expert_outputs"}),
}


def config_for(path: Path, paths: dict, method: str, extra: dict, samples: int, seq_len: int) -> Path:
    import yaml

    perf.write_config(path, paths, method, samples, seq_len)
    config = yaml.safe_load(path.read_text())
    if extra:
        config["parameters"].update(extra)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per merge (OMP_NUM_THREADS)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 and 4 layers (for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from harness import save_json

    depths = (2, 4) if args.smoke else DEPTHS
    width = dict(hidden=64, heads=4, ffn=176, vocab=512) if args.smoke else WIDTH
    samples, seq_len = (8, 32) if args.smoke else (SAMPLES, SEQ_LEN)
    work = Path(os.environ.get("MERGEKIT_QP_BENCH_DIR", HERE / ".work")) / ("sequential-smoke" if args.smoke else "sequential")
    rows = []
    for depth in depths:
        root = work / f"d{depth}"
        built = perf.build(root, width["hidden"], depth, width["heads"], width["ffn"], width["vocab"], samples, seq_len)
        cache = root / "cache"
        warm = config_for(root / "warm.yml", built["paths"], "output_qp", {}, samples, seq_len)
        perf.run_merge_process(warm, root / "out-warm", cache, SHARD_BYTES)  # fills the statistics cache (untimed)
        for name, (method, extra) in METHODS.items():
            config = config_for(root / f"{name.replace(' ', '_')}.yml", built["paths"], method, extra, samples, seq_len)
            cost = perf.run_merge_process(config, root / f"out-{name.replace(' ', '_')}", cache, SHARD_BYTES)
            row = {"layers": depth, "params": built["params"], "method": name, **cost}
            rows.append(row)
            print(f"{depth:>3} layers  {name:<26} {cost['wall_s']:7.2f} s  {cost['peak_rss_mb']:7.0f} MB RSS  "
                  f"{cost['peak_anon_mb']:7.0f} MB anonymous", flush=True)
    for row in rows:
        same = {r["method"]: r for r in rows if r["layers"] == row["layers"]}
        row["wall_vs_ties"] = row["wall_s"] / same["ties"]["wall_s"]
        row["wall_vs_independent"] = row["wall_s"] / same["output_qp"]["wall_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sequential-smoke" if args.smoke else "sequential"
    payload = {"depths": list(depths), "width": width, "calibration": {"samples": samples, "seq_len": seq_len},
               "threads": args.threads, "out_shard_bytes": SHARD_BYTES, "rows": rows}
    save_json(args.out / f"{stem}.json", payload)
    (args.out / f"{stem}.md").write_text(render(rows, depths))
    plot(rows, depths, args.out / f"{stem}.png")
    print(render(rows, depths))


def render(rows, depths) -> str:
    lines = ["| layers | method | wall s | × ties | × independent | peak anonymous MB | anonymous vs fewest layers "
             "| peak RSS MB (incl. mmap'd checkpoints) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        first = next(r for r in rows if r["method"] == row["method"] and r["layers"] == depths[0])
        lines.append(f"| {row['layers']} | {row['method']} | {row['wall_s']:.2f} | {row['wall_vs_ties']:.2f} | "
                     f"{row['wall_vs_independent']:.2f} | {row['peak_anon_mb']:.0f} | "
                     f"{row['peak_anon_mb'] / first['peak_anon_mb']:.2f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, depths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        ax_time.plot([r["layers"] for r in mine], [r["wall_s"] for r in mine], marker="o", label=method)
        ax_mem.plot([r["layers"] for r in mine], [r["peak_anon_mb"] for r in mine], marker="o", label=method)
    ax_time.set(xlabel="layers", ylabel="wall time (s)", xticks=list(depths), title="time")
    ax_mem.set(xlabel="layers", ylabel="peak anonymous RSS (MB)", xticks=list(depths),
               title="peak memory (without mmap'd files)")
    ax_mem.set_ylim(bottom=0)
    ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
