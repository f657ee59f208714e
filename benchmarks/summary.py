"""One headline table from benchmarks/results/{lm_real,clf,lm}.json (the README's benchmark table):
lm-real (SmolLM2-135M, the models people merge) first, clf and lm beside it.

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
    real = json.loads((results / "lm_real.json").read_text())["methods"]
    clf = json.loads((results / "clf.json").read_text())
    lm = json.loads((results / "lm.json").read_text())
    gentle, hard = lm["settings"]["gentle"]["methods"], lm["settings"]["hard"]["methods"]
    # lm-real's order (each _svc row beside its method), then rows only the other suites have
    names = [n for n in real if not n.startswith("expert:")]
    for suite in (gentle, clf["methods"]):
        names += [n for n in suite if n not in names and not n.startswith("expert:")]
    lines = [
        "| method | lm-real gain kept | lm-real mean loss | lm-real worst Δ vs base | clf gain kept "
        "| clf accuracy (mean of 4) | lm gentle gain kept | lm hard gain kept | merge s × ties (lm-real / clf / lm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r, c, g, h = real.get(name, {}), clf["methods"].get(name, {}), gentle.get(name, {}), hard.get(name, {})
        ratio = " / ".join(fmt(x.get("wall_vs_ties"), 2) for x in (r, c, g))
        lines.append(f"| {name} | {pm(r, 'gain_kept')} | {fmt(r.get('mean_loss'))} | {fmt(r.get('worst_vs_base'))} "
                     f"| {pm(c, 'gain_kept')} | {fmt(c.get('accuracy'))} | {pm(g, 'gain_kept')} "
                     f"| {pm(h, 'gain_kept')} | {ratio if name not in ('base',) else '–'} |")
    real_corr = json.loads((results / "lm_real.json").read_text()).get("spearman_rho_vs_gain_kept")
    corr = (f"Spearman correlation of ρ with gain kept across merge methods: lm-real {fmt(real_corr, 2)}, clf "
            f"{fmt(clf['correlation']['spearman_rho_vs_gain_kept'], 2)}, lm gentle "
            f"{fmt(lm['settings']['gentle']['spearman_rho_vs_gain_kept'], 2)}, lm hard "
            f"{fmt(lm['settings']['hard']['spearman_rho_vs_gain_kept'], 2)}.")
    return "\n".join(lines) + "\n\n" + corr + "\n"


if __name__ == "__main__":
    text = render()
    (RESULTS / "summary.md").write_text(text)
    print(text)
