"""Peak memory and time of the widest solve of a 7B-class model: one `down_proj` (4096 × 14336,
the input width of Llama-2/Mistral-7B's MLP) of K experts, full basis, with the report's ρ.

Each variant runs in its own process (peak RSS of that process, minus what its inputs hold):
- `current`: this checkout's `core.problems.solve_linear` (float32 statistics converted to
  float64 one task at a time, symmetrised in place, factorised in place) with the objective
  taken from the solve's own products (ρ's time: what runs after the factorised solve);
- `before`: the solve as commit 1ba17d5 ran it (`--before-tree DIR` with that commit's
  `mergekit_qp`), every Gram converted to float64 first.
The inputs are synthetic (a rank-64 + identity Gram per task): memory and time do not depend on
the values. Results: benchmarks/results/solve_memory.{json,md}.

    python benchmarks/solve_memory.py --threads 1 [--before-tree /path/to/1ba17d5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
m, d, K = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
w0 = torch.randn(m, d, generator=g) * 0.02
experts = [w0 + 0.002 * torch.randn(m, 8, generator=g) @ torch.randn(8, d, generator=g) for _ in range(K)]
grams = []
for k in range(K):
    x = torch.randn(d, 64, generator=g)
    gram = x @ x.T / 64
    gram.diagonal().add_(1.0)
    grams.append(gram)  # float32, as the statistics store them
del x
inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if sys.argv[1] == "current":
    from mergekit_qp.core.problems import solve_linear, SolveSettings
    from mergekit_qp.core.statistics import LinearStats
    from mergekit_qp.core import objective as objective_module
    # ρ's own cost: what runs after the factorised solve returns (the objective's terms from
    # the solve's products, K − 1 quadratic forms of their own).
    times = {}
    original = objective_module._solve_dev
    def timed(*a, **kw):
        out = original(*a, **kw); times["solved_at"] = time.perf_counter(); return out
    objective_module._solve_dev = timed
    stats = [LinearStats(gram=gk, mean=torch.zeros(d)) for gk in grams]
    solution = solve_linear(w0, experts, stats, [1.0] * K, SolveSettings(ridge=1e-4))
    times["rho"] = time.perf_counter() - times["solved_at"]
    result = solution.weight
else:  # the solve of commit 1ba17d5 (plugin.OutputQPMerge._linear without the bias), its own qp module
    from mergekit_qp import qp
    times = {}
    w = w0.double()
    deltas = [e.double() - w for e in experts]
    g64 = [gk.to(torch.float64) for gk in grams]
    update = qp.full_update(deltas, g64, [1.0] * K, 1e-4).double()
    t = time.perf_counter()
    qp.objective(update, deltas, g64, [1.0] * K)
    times["rho"] = time.perf_counter() - t
    result = (w + update).float()
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"inputs_bytes": inputs, "peak_bytes": peak, "wall_s": wall, "rho_s": times["rho"],
                  "checksum": float(result.double().abs().sum())}))
"""


def run(variant: str, tree: Path, threads: int, m: int, d: int, k: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "MERGEKIT_QP_NO_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(threads), str(m), str(d), str(k)],
                         capture_output=True, text=True, env=env, cwd="/", check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before-tree", type=Path, default=None, help="a checkout of commit 1ba17d5")
    parser.add_argument("--shape", default="4096x14336", help="out × in of the map (default: 7B down_proj)")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-before", action="store_true",
                        help="re-measure `current` only; keep the `before` row of the existing results")
    args = parser.parse_args()
    m, d = (int(x) for x in args.shape.split("x"))
    variants = [("current", ROOT)] + ([("before", args.before_tree)] if args.before_tree else [])
    rows = {}
    if args.keep_before:
        rows["before"] = json.loads((args.out / "solve_memory.json").read_text())["variants"]["before"]
        variants = [("current", ROOT)]
    for name, tree in variants:
        rows[name] = run(name, tree, args.threads, m, d, args.experts)
        r = rows[name]
        print(f"{name:8s} solve peak {(r['peak_bytes'] - r['inputs_bytes']) / 1e9:6.2f} GB above its inputs "
              f"({r['inputs_bytes'] / 1e9:.2f} GB)  wall {r['wall_s']:7.1f} s  ρ {r['rho_s']:6.1f} s "
              f"({r['rho_s'] / r['wall_s']:.0%} of the solve)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    import torch

    payload = {"shape": [m, d], "experts": args.experts, "threads": args.threads, "variants": rows,
               "provenance": {"commit": commit, "torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d")}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "solve_memory.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# Widest solve of a 7B-class model: {m} × {d}, K = {args.experts}, full basis, with ρ", "",
             f"`python benchmarks/solve_memory.py --threads {args.threads}` — commit {commit}, torch "
             f"{torch.__version__}, {payload['provenance']['date']}. Synthetic float32 statistics; peak RSS of the "
             "process minus what its inputs hold (the base, the experts and their Grams).", "",
             "| variant | solve peak above inputs (GB) | inputs (GB) | wall (s) | ρ (s) | ρ ÷ solve |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {(r['peak_bytes'] - r['inputs_bytes']) / 1e9:.2f} | {r['inputs_bytes'] / 1e9:.2f} | "
                     f"{r['wall_s']:.1f} | {r['rho_s']:.1f} | {r['rho_s'] / r['wall_s']:.0%} |")
    rows = {name: rows[name] for name in ("current", "before") if name in rows}
    if len(rows) == 2:
        same = abs(rows["current"]["checksum"] - rows["before"]["checksum"]) <= 1e-9 * abs(rows["before"]["checksum"])
        lines += ["", f"Merged weights {'agree' if same else 'DIFFER'} (checksum of |W|: "
                      f"{rows['current']['checksum']:.6f} vs {rows['before']['checksum']:.6f})."]
    (args.out / "solve_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
