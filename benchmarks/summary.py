"""One headline table from benchmarks/results/{clf,lm}.json (the README's benchmark table).

    python benchmarks/summary.py            # prints it and writes benchmarks/results/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, fmt  # noqa: E402


def pm(entry: dict, key: str) -> str:
    value, se = entry.get(key), entry.get(f"{key}_se")
    return "–" if value is None else f"{fmt(value)} ± {fmt(se)}" if se is not None else fmt(value)


def render(results: Path = RESULTS) -> str:
    clf = json.loads((results / "clf.json").read_text())
    lm = json.loads((results / "lm.json").read_text())
    gentle, hard = lm["settings"]["gentle"]["methods"], lm["settings"]["hard"]["methods"]
    # the grid's order (each _svc row beside its method), whichever suite has the most rows
    names = [n for n in gentle if not n.startswith("expert:")]
    names += [n for n in clf["methods"] if n not in names and not n.startswith("expert:")]
    lines = [
        "| method | clf gain kept | clf accuracy (mean of 4) | lm gentle gain kept | lm gentle mean loss "
        "| lm hard gain kept | lm hard mean loss | merge s × ties (clf / lm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        c, g, h = clf["methods"].get(name, {}), gentle.get(name, {}), hard.get(name, {})
        ratio = " / ".join(fmt(x.get("wall_vs_ties"), 2) for x in (c, g))
        lines.append(f"| {name} | {pm(c, 'gain_kept')} | {fmt(c.get('accuracy'))} | {pm(g, 'gain_kept')} "
                     f"| {fmt(g.get('mean_loss'))} | {pm(h, 'gain_kept')} | {fmt(h.get('mean_loss'))} "
                     f"| {ratio if name not in ('base',) else '–'} |")
    corr = (f"Spearman correlation of ρ with gain kept across merge methods: clf "
            f"{fmt(clf['correlation']['spearman_rho_vs_gain_kept'], 2)}, lm gentle "
            f"{fmt(lm['settings']['gentle']['spearman_rho_vs_gain_kept'], 2)}, lm hard "
            f"{fmt(lm['settings']['hard']['spearman_rho_vs_gain_kept'], 2)}.")
    return "\n".join(lines) + "\n\n" + corr + "\n"


if __name__ == "__main__":
    text = render()
    (RESULTS / "summary.md").write_text(text)
    print(text)
