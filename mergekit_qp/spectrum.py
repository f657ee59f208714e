"""The spectrum of a merge (design §3.2 rank-N, §3.3): residual energy captured ρ by the best
update of rank ≤ N, for N = 1, 2, 4, … up to full rank, per linear map, per layer and overall.

For one linear map, `qp.low_rank_directions` gives the full-basis optimum Δ* and the output
directions u_1, u_2, … (best first) with Δ_N = U_N U_Nᵀ Δ* (what `basis: rank-N` writes). Per
task k the objective of Δ_N splits over directions,

    J_k(Δ_N) = E_k + Σ_{i≤N} (u_iᵀ Δ* G_k Δ*ᵀ u_i − 2 u_iᵀ Δ* G_k Δ_kᵀ u_i),

so one factorisation and two r×d products per task give every rank at once (float64). ρ is
measured on J without the ridge, like every other ρ the package reports; at full rank it is the
ρ of output_qp's full-basis merge with the same ridge. Aggregates are energy-weighted like
report.py: ρ(N) = 1 − ΣJ(N) / ΣE over the tensors of a layer (or of the model).

Pure maths and rendering: this module imports neither mergekit nor transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import qp
from .report import layer_of

_F64 = torch.float64


@dataclass
class TensorSpectrum:
    """One linear map: objective[k][N − 1] is ω_k J_k of its best rank-N update for
    N = 1 … full_rank (the last entry is the full-basis optimum); energy[k] is ω_k E_k."""

    name: str
    objective: List[List[float]]
    energy: List[float]

    @property
    def full_rank(self) -> int:
        return len(self.objective[0])

    def objective_at(self, rank: int) -> List[float]:
        """ω_k J_k per task at rank N (ranks beyond this map's full rank give the full optimum)."""
        return [row[min(rank, self.full_rank) - 1] for row in self.objective]


def tensor_spectrum(name: str, task_vectors, grams, weights, ridge: float = 0.0) -> TensorSpectrum:
    """ω-weighted J of the best rank-N update of one linear map, for every N (see module doc)."""
    full, U = qp.low_rank_directions(task_vectors, grams, weights, ridge)
    at_full = qp.objective(full, task_vectors, grams, weights)
    full_rank = min(full.shape)
    along = U[:, : full_rank - 1].mT @ full  # Δ* seen along each output direction (r−1 × d)
    objective, energy = [], []
    for k, (delta, gram) in enumerate(zip(task_vectors, grams)):
        gk = gram.to(full.device, _F64)
        gk = (gk + gk.mT) / 2
        dk = delta.to(full.device, _F64)
        projected = along @ gk
        # Change of J_k from adding direction i: its quadratic term minus twice its cross term.
        steps = (projected * along).sum(1) - 2 * (projected * (U[:, : full_rank - 1].mT @ dk)).sum(1)
        e_k = at_full.energy_per_task[k]
        # J ≥ 0 exactly; the clamp only removes rounding (as qp.objective does).
        partial = [max(0.0, e_k + float(s)) for s in torch.cumsum(steps, 0)]
        w = float(weights[k])
        objective.append([w * j for j in partial] + [w * at_full.per_task[k]])
        energy.append(w * e_k)
    return TensorSpectrum(name, objective, energy)


def rank_grid(full_ranks: Sequence[int]) -> List[int]:
    """1, 2, 4, … below the largest full rank, then the largest full rank itself."""
    largest = max(full_ranks)
    grid, n = [], 1
    while n < largest:
        grid.append(n)
        n *= 2
    return grid + [largest]


def _rho_curve(tensors: Sequence[TensorSpectrum], grid: Sequence[int], task: Optional[int] = None) -> List[float]:
    """ρ(N) = 1 − ΣJ(N)/ΣE over the tensors, for all tasks (task None) or one task."""
    def pick(values):
        return sum(values) if task is None else values[task]

    energy = sum(pick(t.energy) for t in tensors)
    return [qp.energy_captured(sum(pick(t.objective_at(n)) for t in tensors), energy) for n in grid]


def _aggregate(tensors: Sequence[TensorSpectrum], grid: Sequence[int], tasks: Sequence[str]) -> Dict:
    return {"rho": _rho_curve(tensors, grid),
            "rho_by_task": {name: _rho_curve(tensors, grid, k) for k, name in enumerate(tasks)}}


def build_spectrum(tensors: Sequence[TensorSpectrum], tasks: Sequence[str], settings: Optional[Dict] = None) -> Dict:
    """The spectrum as a dict: `ranks` (the last one is full rank for every tensor), overall
    `rho` and `rho_by_task` (one value per rank), `layers` and `tensors` likewise."""
    if not tensors:
        raise ValueError("spectrum: no linear map with calibration statistics to measure")
    grid = rank_grid([t.full_rank for t in tensors])
    by_layer: Dict[str, List[TensorSpectrum]] = {}
    for t in tensors:
        by_layer.setdefault(layer_of(t.name), []).append(t)
    order = sorted(by_layer, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return {
        "ranks": grid,
        "tasks": list(tasks),
        "settings": settings or {},
        **_aggregate(tensors, grid, tasks),
        "layers": [{"layer": int(k) if k.isdigit() else k, **_aggregate(by_layer[k], grid, tasks)} for k in order],
        "tensors": [{"name": t.name, "full_rank": t.full_rank, "rho": _rho_curve([t], grid)}
                    for t in sorted(tensors, key=lambda t: t.name)],
    }


def _rank_label(spectrum: Dict, i: int) -> str:
    return "full" if i == len(spectrum["ranks"]) - 1 else str(spectrum["ranks"][i])


def render_markdown(spectrum: Dict, image: Optional[str] = "spectrum.png") -> str:
    ranks = range(len(spectrum["ranks"]))
    header = "| | " + " | ".join(f"N={_rank_label(spectrum, i)}" for i in ranks) + " |"
    rule = "|---|" + "---:|" * len(spectrum["ranks"])

    def row(label, values):
        return f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + " |"

    lines = [
        "# Spectrum: energy captured against rank",
        "",
        "ρ(N) is the residual energy captured (1 − J/E, energy-weighted) by the best update of rank ≤ N "
        "of each linear map (`basis: rank-N`); `full` is the full-basis optimum "
        f"(largest full rank {spectrum['ranks'][-1]}; a smaller map counts as full from its own rank on). "
        f"Ridge {spectrum['settings'].get('ridge', 'n/a')}.",
        "",
        *([f"![ρ against rank]({image})", ""] if image else []),
        header, rule,
        row("**all layers**", spectrum["rho"]),
        *[row(f"task {os.path.basename(t.rstrip('/')) or t}", spectrum["rho_by_task"][t]) for t in spectrum["tasks"]],
        *[row(f"layer {layer['layer']}", layer["rho"]) for layer in spectrum["layers"]],
    ]
    return "\n".join(lines) + "\n"


def plot_spectrum(spectrum: Dict, path: str) -> None:
    """ρ against rank (log₂ axis): one line per layer, the whole model in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = spectrum["ranks"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = plt.cm.viridis([i / max(1, len(spectrum["layers"]) - 1) for i in range(len(spectrum["layers"]))])
    for colour, layer in zip(colours, spectrum["layers"]):
        ax.plot(ranks, layer["rho"], color=colour, alpha=0.8, linewidth=1, label=f"layer {layer['layer']}")
    ax.plot(ranks, spectrum["rho"], color="black", linewidth=2, marker="o", label="all layers")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks[:-1]] + [f"full\n({ranks[-1]})"])
    ax.set_xlabel("rank N of the update")
    ax.set_ylabel("ρ (residual energy captured)")
    ax.set_title("energy captured against rank")
    ax.grid(alpha=0.3)
    if len(spectrum["layers"]) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_spectrum(out_dir: str, spectrum: Dict) -> None:
    """spectrum.json, spectrum.md and spectrum.png into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    plot_spectrum(spectrum, os.path.join(out_dir, "spectrum.png"))
    with open(os.path.join(out_dir, "spectrum.json"), "w", encoding="utf-8") as fp:
        json.dump(spectrum, fp, indent=1, allow_nan=False)
        fp.write("\n")
    with open(os.path.join(out_dir, "spectrum.md"), "w", encoding="utf-8") as fp:
        fp.write(render_markdown(spectrum))
