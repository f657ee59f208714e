"""Singular value calibration in weight space against output space, on the `lm` suite's models.

Issue 6 asks whether SVC measured in output space helps when calibration data is there: the
merged and expert updates of a linear map are whitened by the pooled calibration Gram
G = mean_i E[x xᵀ] (+ ridge) before the SVD, so that singular values are output energies
(‖Δ X‖² = ‖Δ R‖², R Rᵀ = G) rather than weight norms, calibrated with the same rule, and mapped
back: Δ' = calibrate(Δm R, [Δi R]) R⁻¹. Tensors without statistics get the weight-space rule.

For every inner method and expert seed this script merges once through `mergekit-yaml`, applies
both rules to the merged model in this process, and scores the three models (plain, weight-space
SVC = what `<method>_svc` writes, output-space SVC) on the `lm` suite's held-out loss and ρ.
Results: OUT/svc_space.json and .md.

    python benchmarks/svc_space.py --threads 1            # lm gentle and hard, seeds 0 1 (~25 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm  # noqa: E402
from harness import RESULTS, clean_nan, fmt, mean, merge_config, method_grid, rho_function, run_merge, save_json, stderr  # noqa: E402

RIDGE = 1e-4  # output_qp's default, relative to tr(G)/d: keeps R invertible on unused directions


def whitening(gram, ridge: float = RIDGE):
    """Lower-triangular R with R Rᵀ = G + ridge·tr(G)/d·I, in float64."""
    import torch

    g = gram.double()
    d = g.shape[0]
    lam = ridge * float(torch.trace(g)) / d
    return torch.linalg.cholesky(g + lam * torch.eye(d, dtype=g.dtype))


def calibrated_models(base: Path, experts: list[Path], merged: Path, stats, out_weight: Path, out_output: Path) -> dict:
    """Write the weight-space and output-space SVC of `merged`; seconds spent on each rule."""
    import torch
    from safetensors.torch import save_file

    from mergekit_qp.core import svc
    from mergekit_qp.calibration.checkpoint import Checkpoint

    base_ck, merged_ck = Checkpoint(str(base)), Checkpoint(str(merged))
    expert_ck = [Checkpoint(str(p)) for p in experts]
    linear = {f"{m}.weight": m for m in stats[0].linear_modules()}
    weight_space, output_space, seconds = {}, {}, {"weight_s": 0.0, "output_s": 0.0}
    for name in sorted(merged_ck.files):
        tensor = merged_ck.get(name)
        weight_space[name] = output_space[name] = tensor
        if tensor.ndim != 2 or "embed" in name or "lm_head" in name:
            continue  # as `<method>_svc`: embeddings and output heads untouched
        b = base_ck.get(name).float()
        deltas = [e.get(name).float() - b for e in expert_ck]
        start = time.perf_counter()
        update = svc.calibrate(tensor.float() - b, deltas).update
        seconds["weight_s"] += time.perf_counter() - start
        weight_space[name] = (b + update).to(tensor.dtype)
        module = linear.get(name) or next((m for k, m in linear.items() if name.endswith("." + k)), None)
        if module is None:
            output_space[name] = weight_space[name]
            continue
        start = time.perf_counter()
        r = whitening(mean_gram([s.lookup(module).gram for s in stats]))
        whitened = svc.calibrate((tensor.double() - b.double()) @ r, [d.double() @ r for d in deltas]).update
        update = torch.linalg.solve_triangular(r, whitened, upper=False, left=False)  # X R = whitened
        seconds["output_s"] += time.perf_counter() - start
        output_space[name] = (b.double() + update).to(tensor.dtype)
    for folder, tensors in ((out_weight, weight_space), (out_output, output_space)):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(merged, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    return seconds


def mean_gram(grams):
    total = grams[0].double().clone()
    for g in grams[1:]:
        total += g.double()
    return total / len(grams)


VARIANTS = ("plain", "weight-space SVC", "output-space SVC")


def run(build, root: Path, models: dict, setting: str, seeds: list[int], threads: int, inner: list) -> dict:
    calibration = {d: root / "calibration" / f"{d}.jsonl" for d in lm.DOMAINS}
    calib_params = {"calibration_samples": build.calibration_samples, "calibration_seq_len": build.context}
    rows = {m.name: {v: {} for v in VARIANTS} for m in inner}
    work = root / "svc_space" / setting
    for seed in seeds:
        experts = models["experts"][setting, seed]
        rho = rho_function(models["base"], experts, calibration, calib_params, root / "statistics")
        from mergekit_qp.calibration.cache import CalibrationSettings, expert_statistics

        settings = CalibrationSettings(samples=calib_params["calibration_samples"],
                                       seq_len=calib_params["calibration_seq_len"], cache_dir=str(root / "statistics"))
        import torch

        stats = [expert_statistics(str(experts[d]), str(models["base"]), str(calibration[d]), settings,
                                   torch.device("cpu")) for d in lm.DOMAINS]
        base_losses = lm.heldout_losses(models["base"], models["windows"])
        expert_losses = {d: lm.heldout_losses(experts[d], models["windows"]) for d in lm.DOMAINS}
        for method in inner:
            slug = method.name.replace(" ", "_").replace("=", "")
            plain = work / f"seed{seed}" / slug
            config = merge_config(method, models["base"], experts, calibration, calib_params, root / "statistics")
            cost = run_merge(config, plain, work / "logs", threads=threads)
            folders = {"plain": plain, "weight-space SVC": plain.with_name(slug + "-w"),
                       "output-space SVC": plain.with_name(slug + "-o")}
            seconds = calibrated_models(models["base"], [experts[d] for d in lm.DOMAINS], plain, stats,
                                        folders["weight-space SVC"], folders["output-space SVC"])
            for variant, folder in folders.items():
                losses = lm.heldout_losses(folder, models["windows"])
                row = {**lm.seed_metrics(losses, base_losses, expert_losses), **rho(folder), "merge_wall_s": cost["wall_s"],
                       "svc_s": {"plain": 0.0, "weight-space SVC": seconds["weight_s"],
                                 "output-space SVC": seconds["output_s"]}[variant]}
                rows[method.name][variant][str(seed)] = row
                shutil.rmtree(folder)
                print(f"[svc_space] {setting} seed {seed} {method.name} {variant}: gain kept {fmt(row['gain_kept'])}, "
                      f"rho {fmt(row['rho'])}", file=sys.stderr, flush=True)
    summary = {}
    for name, variants in rows.items():
        summary[name] = {}
        for variant, per_seed in variants.items():
            values = list(per_seed.values())
            summary[name][variant] = {
                "gain_kept": mean([r["gain_kept"] for r in values]), "gain_kept_se": stderr([r["gain_kept"] for r in values]),
                "mean_loss": mean([r["mean_loss"] for r in values]), "rho": mean([r["rho"] for r in values]),
                "svc_s": mean([r["svc_s"] for r in values]), "seeds": per_seed}
    return summary


def render(result: dict) -> str:
    lines = ["# Singular value calibration: weight space against output space (`lm` suite)", "",
             ("Each inner method merged once through `mergekit-yaml`; the weight-space rule (what `<method>_svc` "
              "writes) and the output-space rule (updates whitened by the pooled calibration Gram, ridge "
              f"{RIDGE:g}·tr/d, before the SVD) applied to that merge. Gain kept on the own domain (± se over "
              "seeds), mean held-out loss, ρ on the calibration data. SVC s: time of the rule alone."), ""]
    for setting, block in result["settings"].items():
        lines += [f"## Setting `{setting}`", "", "| inner method | " + " | ".join(
            f"{v}: gain kept | ρ" for v in VARIANTS) + " | weight s | output s |", "|---" * (2 + 2 * len(VARIANTS) + 1) + "|"]
        for name, variants in block.items():
            cells = [f"{fmt(variants[v]['gain_kept'])} ± {fmt(variants[v]['gain_kept_se'])} | {fmt(variants[v]['rho'])}"
                     for v in VARIANTS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(variants['weight-space SVC']['svc_s'], 2)} | "
                         f"{fmt(variants['output-space SVC']['svc_s'], 2)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", choices=["gentle", "hard"], default=["gentle", "hard"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAYON_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    build = lm.FULL
    root = lm.bench_dir() / "lm" / build.key()
    lm.prepare_data(build, root)
    models = lm.build_models(build, root, args.settings, args.seeds)
    grid = {m.name: m for m in method_grid(rank=32)}
    inner = [grid[n] for n in ("task_arithmetic λ=0.3", "task_arithmetic λ=0.5", "task_arithmetic λ=1.0", "ties",
                               "dare_ties", "output_qp")]
    start = time.perf_counter()
    result = {"meta": {"seeds": args.seeds, "threads": args.threads, "ridge": RIDGE}, "settings": {}}
    for setting in args.settings:
        result["settings"][setting] = run(build, root, models, setting, args.seeds, args.threads, inner)
        result["meta"]["total_s"] = round(time.perf_counter() - start, 1)
        save_json(args.out / "svc_space.json", clean_nan(result))
        (args.out / "svc_space.md").write_text(render(result) + "\n", encoding="utf-8")
    print(render(result))


if __name__ == "__main__":
    main()
