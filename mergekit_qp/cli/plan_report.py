"""What `mergekit-qp plan` writes: plan.md, plan.png (the interference heat map) and the printed
summary (the computation is in plan.py)."""

from __future__ import annotations

from typing import Any, Dict, List


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: List[str], body: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def format_table(result: Dict[str, Any]) -> str:
    """The predicted ρ per method, as printed by the command."""
    tasks = result["tasks"]
    header = ["method", "ρ", *[f"ρ {t}" for t in tasks]]
    body = [[m["name"] + (" *" if m["random"] else ""), _num(m["rho"], 4),
             *[_num(m["rho_by_task"][t], 4) for t in tasks]] for m in result["methods"]]
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def render_markdown(result: Dict[str, Any]) -> str:
    tasks = result["tasks"]
    lines = [f"# Merge plan: {result['config']}", "",
             f"Predicted from the calibration statistics of {len(tasks)} experts over {result['linear_maps']} linear "
             "maps; no model was written. ρ = 1 − ΣωJ/ΣωE is the share of the experts' output change a merge would "
             "keep (the ρ `mergekit-qp diagnose` measures on that merge).", "", "## Methods", ""]
    lines += _table(["method", "ρ", *[f"ρ {t}" for t in tasks]],
                    [[m["name"] + (" *" if m["random"] else ""), _num(m["rho"], 4),
                      *[_num(m["rho_by_task"][t], 4) for t in tasks]] for m in result["methods"]])
    if any(m["random"] for m in result["methods"]):
        lines += ["", "\\* random sparsification: one draw; a merge draws anew."]
    lines += ["", "Best per task: " + "; ".join(f"{t} {_num(b['rho'])} ({b['method']})" for t, b in result["best"].items()),
              "", "## Experts", ""]
    lines += _table(["expert", "weight ω", "energy E", "share of ωE"],
                    [[t, f"{w:g}", f"{result['energy'][t]:.4g}", _num(result["energy_share"][t])]
                     for t, w in zip(tasks, result["weights"])])
    lines += ["", "## Interference", "",
              "I[j, k] = tr(Δ_j G_k Δ_jᵀ) / E_k: how strongly expert j (row) moves task k's outputs (column), "
              "relative to expert k's own change (diagonal 1).", ""]
    lines += _table(["expert \\ task", *tasks], [[t, *[_num(v) for v in row]] for t, row in
                                                   zip(tasks, result["interference"])])
    lines += ["", "Cosine of the experts' output changes on each task's data (−1: one undoes the other):", ""]
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    lines += _table(["task", *[f"{tasks[i]} · {tasks[j]}" for i, j in pairs]],
                    [[t, *[_num(result["cosine"][t][i][j]) for i, j in pairs]] for t in tasks])
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in result["warnings"]] or ["none"])
    if result.get("selection"):
        lines += ["", *_selection(result["selection"])]
    return "\n".join(lines) + "\n"


def _selection(selection: Dict[str, Any]) -> List[str]:
    """The checkpoint-selection section: every evaluated combination, best first."""
    lines = ["## Checkpoints", "",
             f"Score = Σ_k max(gain_k, 0) · ρ_k: the held-out loss drop of each chosen checkpoint (nats/token) times the "
             f"share of its output change the merge keeps ({selection['by']}); search: {selection['search']}. "
             f"Chosen config: `{selection['config']}`.", ""]
    lines += _table(["expert", "checkpoint", "gain"],
                    [[name, c, f"{gain:.4f}"] for name, cands in selection["candidates"].items()
                     for c, gain in ((c, selection["gains"][name][c]) for c in cands)])
    lines += [""]
    rows = []
    for entry in selection["evaluated"]:
        tag = [n for key, n in (("last", "last"), ("best_individual", "best individual"))
               if selection[key]["checkpoints"] == entry["checkpoints"]]
        if entry["checkpoints"] == selection["chosen"]["checkpoints"]:
            tag.insert(0, "chosen")
        rows.append([", ".join(entry["checkpoints"].values()), f"{entry['score']:.4f}",
                     " ".join(f"{t} {_num(r)}" for t, r in entry["rho_by_task"].items()), " / ".join(tag)])
    lines += _table(["checkpoints", "score", "ρ per task", ""], rows)
    return lines


def plot_interference(result: Dict[str, Any], path) -> None:
    """Heat map of the interference matrix I (log colour scale: I spans orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    tasks = result["tasks"]
    values = [[v if v is not None and v > 0 else float("nan") for v in row] for row in result["interference"]]
    finite = [v for row in values for v in row if v == v]
    size = 1.2 + 0.9 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    norm = LogNorm(vmin=min(finite), vmax=max(finite)) if finite and min(finite) < max(finite) else None
    image = ax.imshow(values, cmap="viridis", norm=norm)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("task k (its calibration data)")
    ax.set_ylabel("expert j")
    for j, row in enumerate(result["interference"]):
        for k, v in enumerate(row):
            ax.text(k, j, _num(v, 2), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="I[j, k] = tr(Δj Gk Δjᵀ) / Ek")
    ax.set_title("How strongly each expert moves each task's outputs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
