"""What `mergekit-qp compare` writes and prints: the plain-text table, compare.md and compare.png
(the comparison itself is in compare.py)."""

from __future__ import annotations

import json
from typing import Any, Dict, List


def _cells(result: Dict[str, Any], row: Dict[str, Any]) -> List[str]:
    def num(value, digits):
        return "–" if value is None else f"{value:.{digits}f}"

    cells = [row["name"], num(row["rho"], 4), *[num(row["rho_by_task"][t], 4) for t in result["tasks"]]]
    if result["eval"]:
        cells += [num(row["loss_by_task"][t], 4) for t in result["tasks"]]
    cells += [num(row.get("wall_s"), 1), num(row.get("wall_vs_baseline"), 2), num(row.get("peak_rss_mb"), 0)]
    return cells


def _header(result: Dict[str, Any]) -> List[str]:
    header = ["method", "ρ", *[f"ρ {t}" for t in result["tasks"]]]
    if result["eval"]:
        header += [f"loss {t}" for t in result["tasks"]]
    return header + ["wall s", f"× {result['baseline']}", "peak RSS MB"]


def format_table(result: Dict[str, Any]) -> str:
    """The plain-text table printed by the command."""
    header = _header(result)
    body = [_cells(result, r) for r in result["rows"]]
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def render_markdown(result: Dict[str, Any]) -> str:
    header = _header(result)
    spectrum = result["spectrum"]
    lines = [
        "# mergekit-qp compare",
        "",
        f"Config `{result['config']}`; experts {', '.join(f'`{t}`' for t in result['tasks'])}.",
        "",
        "ρ: residual energy captured on the calibration data (1 − J/E over the linear maps, energy-weighted; "
        "1 = the experts' output changes kept exactly, 0 = no better than the base, < 0 worse)."
        + (" loss: held-out mean next-token cross-entropy, nats/token." if result["eval"] else "")
        + f" wall s and peak RSS: the `mergekit-yaml` process; × {result['baseline']}: wall time relative to it.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *["| " + " | ".join(_cells(result, r)) + " |" for r in result["rows"]],
        "",
        "![ρ per layer and per task](compare.png)",
        "",
    ]
    if spectrum is not None:
        ranks = ["full" if i == len(spectrum["ranks"]) - 1 else str(r) for i, r in enumerate(spectrum["ranks"])]
        lines += [
            "## Spectrum of the experts",
            "",
            "ρ of the best update of rank ≤ N (output_qp `basis: rank-N`); details per layer in "
            "[spectrum.md](spectrum.md).",
            "",
            "| N | " + " | ".join(ranks) + " |",
            "|---|" + "---:|" * len(ranks),
            "| ρ | " + " | ".join(f"{v:.4f}" for v in spectrum["rho"]) + " |",
            "",
        ]
    lines += [
        "## Methods",
        "",
    ]
    for r in result["rows"]:
        if r["kind"] == "merge":
            lines.append(f"- **{r['name']}**: per expert {json.dumps(r['per_model_parameters'])}, "
                         f"shared {json.dumps(r['parameters'])}; config `{r['config_file']}`")
    return "\n".join(lines) + "\n"


def plot_compare(result: Dict[str, Any], path: str) -> None:
    """ρ per layer for each model (left) and ρ, or held-out loss, per task (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in result["rows"] if r["kind"] == "merge" or r["name"] == "base"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        layers = [layer for layer in r["layers"] if layer["layer"] != "other"]
        left.plot([layer["layer"] for layer in layers], [layer["rho"] for layer in layers], marker="o", label=r["name"])
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("layer")
    left.set_ylabel("ρ (residual energy captured)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    key, label = ("loss_by_task", "held-out loss (nats/token)") if result["eval"] else ("rho_by_task", "ρ")
    bars = result["rows"] if result["eval"] else rows
    width = 0.8 / len(bars)
    for i, r in enumerate(bars):
        right.bar([t + i * width for t in range(len(result["tasks"]))], [r[key][t] for t in result["tasks"]],
                  width=width, label=r["name"])
    right.set_xticks([t + 0.4 - width / 2 for t in range(len(result["tasks"]))], result["tasks"])
    if result["eval"]:  # losses differ by a few percent: an axis from 0 would hide that
        values = [r[key][t] for r in bars for t in result["tasks"]]
        spread = max(values) - min(values)
        right.set_ylim(min(values) - 0.1 * spread - 1e-6, max(values) + 0.1 * spread + 1e-6)
    right.set_ylabel(label)
    right.set_xlabel("task")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
