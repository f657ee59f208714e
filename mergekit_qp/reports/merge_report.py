"""The merge report: residual energy captured (ρ, docs/method.md) per tensor, layer, task and
overall, written next to the merged model as merge_report.json (machines), merge_report.md
(people) and merge_report.png (ρ per layer per task). Aggregates are energy-weighted:
ρ = 1 − ΣJ / ΣE over the tensors (core.objective.aggregate_rho)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from ..core.objective import aggregate_rho, layer_of


def tensor_record(name: str, objective, weights: Sequence[float], tasks: Sequence[str]) -> Dict:
    """One solved tensor, from a `core.objective.Objective` of the experts `tasks` (ω-weighted
    per-task terms, keyed by task name, kept for aggregation)."""
    return {
        "name": name,
        "rho": objective.rho,
        "rho_by_task": dict(zip(tasks, objective.rho_per_task)),
        "fallback": None,
        "objective_by_task": {t: w * j for t, w, j in zip(tasks, weights, objective.per_task)},
        "energy_by_task": {t: w * e for t, w, e in zip(tasks, weights, objective.energy_per_task)},
    }


def fallback_record(name: str, reason: str) -> Dict:
    return {"name": name, "rho": None, "rho_by_task": None, "fallback": reason}


def _aggregate(records: Sequence[Dict], tasks: Sequence[str]) -> Dict:
    solved = [r for r in records if r["fallback"] is None]
    return {"rho": aggregate_rho(solved),
            # None for a task no tensor of this group was merged from (a `slices:` config).
            "rho_by_task": {t: aggregate_rho(solved, t) if any(t in r["objective_by_task"] for r in solved) else None
                            for t in tasks}}


def _cell(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def task_order(records: Sequence[Dict]) -> List[str]:
    """Every task named by the records, in order of first appearance."""
    seen: Dict[str, None] = {}
    for r in records:
        for t in r.get("objective_by_task") or {}:
            seen.setdefault(t, None)
    return list(seen)


def build_report(records: Sequence[Dict], tasks: Optional[Sequence[str]] = None,
                 settings: Optional[Dict] = None) -> Dict:
    """The report as a dict: top-level `rho`, `rho_by_task`, `layers`, `tensors` (tasks: those
    the records name, unless given)."""
    tasks = list(tasks) if tasks is not None else task_order(records)
    by_layer: Dict[str, List[Dict]] = {}
    for r in records:
        by_layer.setdefault(layer_of(r["name"]), []).append(r)
    order = sorted(by_layer, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return {
        **_aggregate(records, tasks),
        "tasks": list(tasks),
        "settings": settings or {},
        "layers": [{"layer": int(k) if k.isdigit() else k, **_aggregate(by_layer[k], tasks)} for k in order],
        "tensors": [{"name": r["name"], "rho": r["rho"], "rho_by_task": r["rho_by_task"], "fallback": r["fallback"]}
                    for r in sorted(records, key=lambda r: r["name"])],
    }


def _token_lines(settings: Dict) -> List[str]:
    """The calibration tokens each expert's statistics rest on, with the budget asked for."""
    tokens = settings.get("calibration_tokens")
    if not tokens:
        return []
    budget = ""
    if "calibration_samples" in settings and "calibration_seq_len" in settings:
        budget = (f" (budget {settings['calibration_samples']} × {settings['calibration_seq_len']} = "
                  f"{settings['calibration_samples'] * settings['calibration_seq_len']}"
                  f"{', packed' if settings.get('calibration_packing') else ''})")
    return [f"Calibration tokens per expert{budget}: "
            + ", ".join(f"{os.path.basename(m.rstrip('/')) or m} {n}" for m, n in tokens.items()), ""]


def render_markdown(report: Dict) -> str:
    tasks = report["tasks"]
    lines = [
        "# output_qp merge report",
        "",
        "ρ is the share of the experts' output change on calibration data that the merge keeps "
        "(1 − J/E, energy-weighted; 1 = perfect, 0 = no better than the base).",
        "",
        f"**Overall ρ = {report['rho']:.4f}**",
        "",
        *_token_lines(report.get("settings", {})),
        "| task | ρ |",
        "|---|---|",
        *[f"| {t} | {_cell(report['rho_by_task'][t])} |" for t in tasks],
        "",
        "## Per layer",
        "",
        "![ρ per layer per task](merge_report.png)",
        "",
        "| layer | ρ | " + " | ".join(f"ρ {os.path.basename(t.rstrip('/')) or t}" for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for layer in report["layers"]:
        cells = " | ".join(_cell(layer["rho_by_task"][t]) for t in tasks)
        lines.append(f"| {layer['layer']} | {layer['rho']:.4f} | {cells} |")
    fallbacks = [t for t in report["tensors"] if t["fallback"]]
    lines += ["", f"## Fallbacks ({len(fallbacks)})", ""]
    lines += [f"- `{t['name']}`: {t['fallback']}" for t in fallbacks] or ["None: every tensor was solved."]
    return "\n".join(lines) + "\n"


def plot_layers(report: Dict, path: str) -> None:
    """ρ per layer, one line per task and one for all tasks together (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = [layer for layer in report["layers"] if layer["layer"] != "other"]
    xs = [layer["layer"] for layer in layers]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for task in report["tasks"]:
        ax.plot(xs, [layer["rho_by_task"][task] if layer["rho_by_task"][task] is not None else float("nan")
                     for layer in layers], marker="o",
                label=os.path.basename(task.rstrip("/")) or task)
    ax.plot(xs, [layer["rho"] for layer in layers], color="black", linestyle="--", label="all tasks")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("ρ (residual energy captured)")
    ax.set_title(f"overall ρ = {report['rho']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out_dir: str, stem: str, data: Dict, markdown: str, plot, allow_nan: bool = True) -> None:
    """STEM.png (drawn by `plot(data, path)`), STEM.json and STEM.md into out_dir: the files of
    every report of the package."""
    os.makedirs(out_dir, exist_ok=True)
    plot(data, os.path.join(out_dir, f"{stem}.png"))
    with open(os.path.join(out_dir, f"{stem}.json"), "w", encoding="utf-8") as fp:
        json.dump(data, fp, indent=1, allow_nan=allow_nan)
        fp.write("\n")
    with open(os.path.join(out_dir, f"{stem}.md"), "w", encoding="utf-8") as fp:
        fp.write(markdown)


def write_report(out_path: str, report: Dict) -> None:
    write_outputs(out_path, "merge_report", report, render_markdown(report), plot_layers)
