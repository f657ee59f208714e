"""The spectrum report (energy captured against rank, core/spectrum.py) as spectrum.json,
spectrum.md and spectrum.png."""

from __future__ import annotations

import os
from typing import Dict, Optional

from .merge_report import write_outputs


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
    write_outputs(out_dir, "spectrum", spectrum, render_markdown(spectrum), plot_spectrum, allow_nan=False)
