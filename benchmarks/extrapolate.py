"""Arithmetic, not measurement: what an output_qp merge of a 7B–70B model needs, from the
model shapes and constants measured here (benchmarks/results/scale-quarter.json and
solve_memory.json). Three experts, 128 × 512 calibration tokens each, full basis.

    python benchmarks/extrapolate.py

Memory: the larger of the statistics pass (one expert at a time: one layer in float32, its
float64 Gram sums and float32 means, the hidden states, one batch; or the weights outside the
layers) and the merge (the widest solve: the direct solve's d × d and m × d float64 buffers, or
the row-blocked solve's K + 2 Grams, plus its inputs), on top of a process baseline. Time:
Gram and forward multiply-adds at the throughput measured for the statistics pass, and the
solves' float64 multiply-adds at the throughput measured for the 7B down_proj solve.
Results: benchmarks/results/extrapolation.md.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # hidden, MLP, layers, KV width, vocabulary
    "Mistral-7B": (4096, 14336, 32, 1024, 32000),
    "Llama-3-8B": (4096, 14336, 32, 1024, 128256),
    "Qwen2.5-7B": (3584, 18944, 28, 512, 152064),
    "Llama-3-70B": (8192, 28672, 80, 1024, 128256),
}
K, TOKENS, BATCH, SEQ = 3, 128 * 512, 4096, 512
BASELINE = 0.6e9  # anonymous memory of a merge process before its first solve (quarter geometry, measured)
ROW_BLOCK = 1 << 25


def linears(h, f, kv):
    """(m, d) of one layer's linear maps, Llama layout."""
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def solve_bytes(m, d):
    """The widest buffers of one solve: direct (3 d × d and K + 3.3 m × d float64, fitted to
    the measured 7B down_proj) unless blocks of rows pay (K + 2 d × d and 2K + 4 blocks)."""
    if m * (K + 4) <= d * (K + 1):
        return 3 * 8 * d * d + (K + 3.3) * 8 * m * d
    return (K + 2) * 8 * d * d + (2 * K + 4) * ROW_BLOCK


def main() -> None:
    scale = json.loads((RESULTS / "scale-quarter.json").read_text())
    solve = json.loads((RESULTS / "solve_memory.json").read_text())
    current = solve["variants"]["current"]
    m0, d0, k0 = 4096, 14336, 2
    solve_flops = (2 * k0 + 1) * 2 * m0 * d0 * d0 + d0 ** 3 / 3
    f64_rate = solve_flops / current["wall_s"]
    geometry = scale["provenance"]["geometry"]
    h0, f0 = geometry["hidden_size"], geometry["intermediate_size"]
    kv0 = h0 * geometry["num_key_value_heads"] // geometry["num_attention_heads"]
    layers, stats = max((int(k), v) for k, v in scale["statistics_pass"].items())
    tokens0 = 8 * 256
    pass_flops = layers * tokens0 * 2 * (3 * h0 * h0 + f0 * f0 + sum(m * d for m, d in linears(h0, f0, kv0)))
    pass_rate = pass_flops / stats["statistics_s"]
    rows = []
    for name, (h, f, n, kv, vocab) in MODELS.items():
        layer = sum(m * d for m, d in linears(h, f, kv)) + 2 * h
        outer = 2 * vocab * h + h
        grams = 3 * h * h + f * f
        activations = 4 * BATCH * (4 * h + 2 * f) + 4 * BATCH * SEQ * (h // 128)
        statistics_pass = max(4 * layer + 12 * grams, 4 * outer) + 8 * TOKENS * h + activations
        widest = max([solve_bytes(m, d) + K * 4 * d * d + (K + 2) * 2 * m * d for m, d in linears(h, f, kv)]
                     + [solve_bytes(vocab, h) + K * 4 * h * h + (K + 2) * 2 * vocab * h])
        peak = BASELINE + max(statistics_pass, widest)
        disk = K * (n * 4 * grams + 4 * h * h + 4 * vocab)
        disk_bf16 = K * (n * 2 * grams + 2 * h * h + 4 * vocab)  # statistics_dtype: bfloat16
        pass_s = K * n * TOKENS * 2 * (grams + layer) / pass_rate
        # 2K products of m × d by d × d per map; one factorisation per distinct input (q/k/v
        # share one, gate/up one: SharedSystems).
        factorisations = (3 * h ** 3 + f ** 3) / 3
        solve_s = (sum(2 * K * 2 * m * d * d for m, d in linears(h, f, kv)) + factorisations) * n / f64_rate
        solve_s += (2 * K * 2 * vocab * h * h + h ** 3 / 3) / f64_rate
        rows.append((name, peak, statistics_pass + BASELINE, widest + BASELINE, disk, disk_bf16, pass_s, solve_s))
    lines = ["# Extrapolation: output_qp on 7B–70B models (arithmetic from measured constants)", "",
             f"`python benchmarks/extrapolate.py` — three experts, {TOKENS} calibration tokens each (128 × 512), "
             "full basis, independent mode. **Arithmetic, not measurement**: model shapes and the constants measured "
             f"on this machine with one thread — statistics pass {pass_rate / 1e9:.1f} GFLOP/s "
             f"(`scale-quarter.json`, {layers} layers), float64 solve {f64_rate / 1e9:.1f} GFLOP/s "
             "(`solve_memory.json`, the 7B down_proj), process baseline 0.6 GB. See docs/scale.md for the model.",
             "", "| model | peak RAM (GB) | statistics pass (GB) | widest solve with inputs (GB) | "
             "statistics disk (GB) | disk, bfloat16 Grams (GB) | statistics pass, this CPU 1 thread (h) | "
             "solves, this CPU 1 thread (h) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, peak, pass_b, widest, disk, disk_bf16, pass_s, solve_s in rows:
        lines.append(f"| {name} | {peak / 1e9:.1f} | {pass_b / 1e9:.1f} | {widest / 1e9:.1f} | {disk / 1e9:.0f} | "
                     f"{disk_bf16 / 1e9:.0f} | {pass_s / 3600:.1f} | {solve_s / 3600:.1f} |")
    lines += ["", "One GPU: not measured (no device was lent to this session); `benchmarks/gpu_check.sh` is the "
              "check to run when one is. Goals: 7B class within 24 GB, 70B within 48 GB."]
    (RESULTS / "extrapolation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
