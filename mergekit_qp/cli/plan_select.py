"""`mergekit-qp plan` with several checkpoints per expert: which combination to merge (docs/plan.md,
"Choosing checkpoints").

An expert's `model:` may list checkpoints (`model: [run/ckpt-100, run/ckpt-200]`) or name a folder
of them (subfolders holding a `config.json`, in natural order). Each checkpoint's own gain is its
held-out loss drop on its task against the base (`--eval`, one file per expert in config order); a
combination c scores the gain its merge is predicted to keep,

    score(c) = Σ_k max(gain_k(c_k), 0) · ρ_k(c),

with ρ_k the per-task ρ of the selection method (default `output_qp full`) predicted by plan. All
combinations are scored when there are at most EXHAUSTIVE of them, else coordinate ascent from the
last checkpoints (one expert at a time, until no change). Statistics are cached per checkpoint, so a
candidate costs one calibration pass. The best combination is then planned in full and its config
written (`plan-configs/selected.yml`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .compare import CompareError, check_causal_lm, heldout_sequences, read_config, task_names
from .runner import heldout_loss, load_causal_lm, write_config

EXHAUSTIVE = 16
__all__ = ["candidates_of", "select_checkpoints"]


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def checkpoint_folders(location: str) -> Optional[List[str]]:
    """The checkpoints in a folder of checkpoints (subfolders with a config.json, natural order), or
    None when `location` is a model itself or no folder."""
    folder = Path(location).expanduser()
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    found = sorted((d for d in folder.iterdir() if (d / "config.json").is_file()), key=_natural)
    return [str(d) for d in found] or None


def candidates_of(raw: Dict[str, Any]) -> Dict[int, List[str]]:
    """{index in `models:` → its checkpoints} for the experts given several."""
    base = str(raw["base_model"])
    out = {}
    for index, entry in enumerate(raw["models"]):
        model = entry.get("model")
        if isinstance(model, list):
            if not model or not all(isinstance(m, str) for m in model):
                raise CompareError(f"plan: models[{index}].model must be a path, a list of paths or a folder of "
                                   f"checkpoints; got {model!r}")
            out[index] = list(model)
        elif str(model) != base and (found := checkpoint_folders(str(model))):
            out[index] = found
    return out


def with_choice(raw: Dict[str, Any], choice: Dict[int, str]) -> Dict[str, Any]:
    models = [dict(entry, model=choice.get(i, entry.get("model"))) for i, entry in enumerate(raw["models"])]
    return {**raw, "models": models}


def select_checkpoints(config_path: str, eval_items: Sequence[str], methods: Sequence[str], params: Sequence[str],
                       bases: Sequence[str], out_dir: str, device: str = "cpu", select_by: str = "output_qp full",
                       eval_samples: int = 256, eval_seq_len: Optional[int] = None) -> Dict[str, Any]:
    """Score the combinations of checkpoints, plan the best in full; returns plan's result with a
    `selection` entry (every evaluated combination, the gains, the last and best-individual ones)."""
    from ..calibration.data import batches
    from ..calibration.models import load_tokenizer
    from .plan import plan, planned_configs
    from .plan_report import render_markdown

    with open(config_path, encoding="utf-8") as fp:
        raw = yaml.safe_load(fp)
    if not isinstance(raw, dict) or not raw.get("base_model") or not raw.get("models"):
        raise CompareError(f"plan: {config_path} needs `base_model:` and `models:`")
    candidates = candidates_of(raw)
    experts = [i for i, e in enumerate(raw["models"]) if str(e.get("model")) != str(raw["base_model"])]
    if not eval_items:
        raise CompareError("plan: choosing among checkpoints needs held-out data: --eval FILE, one per expert in "
                           "config order (each checkpoint's gain is its held-out loss drop against the base)")
    if len(eval_items) != len(experts):
        raise CompareError(f"plan: --eval got {len(eval_items)} files for {len(experts)} experts: one per expert, in "
                           "config order")
    out = Path(out_dir)
    folder = out / "plan-configs" / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    last = {i: c[-1] for i, c in candidates.items()}
    # Everything checkable is checked on the last checkpoints before any forward pass.
    first = write_config(folder / "last.yml", with_choice(raw, last))
    read_config(str(first), command="plan")
    rows = planned_configs(read_config(str(first), command="plan"), methods, params, bases)
    if select_by not in [label for label, _ in rows]:
        raise CompareError(f"plan: --select-by {select_by!r} is not a planned row ({', '.join(l for l, _ in rows)})")
    base_dir = str(raw["base_model"])
    check_causal_lm(base_dir)
    tokenizer = load_tokenizer(base_dir)
    if tokenizer is None:
        raise CompareError(f"plan --eval: the base model {base_dir} has no tokenizer to read the held-out text")
    from transformers import AutoConfig

    top = raw.get("parameters") or {}
    seq_len = eval_seq_len or int(top.get("calibration_seq_len", 512))
    context = getattr(AutoConfig.from_pretrained(base_dir, local_files_only=True), "max_position_embeddings", None)
    seq_len = min(seq_len, context) if context else seq_len
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = {i: heldout_sequences(path, tokenizer, eval_samples, seq_len, top.get("calibration_field"))
                 for i, path in zip(experts, eval_items)}

    def loss(model_dir: str, index: int) -> float:
        return heldout_loss(load_causal_lm(model_dir, device), batches(sequences[index], pad_id=pad), device=device)

    base_loss = {i: loss(base_dir, i) for i in candidates}
    gains = {i: {c: base_loss[i] - loss(c, i) for c in cands} for i, cands in candidates.items()}
    fixed_gain = {}  # experts with one checkpoint: their gain, for the score
    for i in experts:
        if i not in candidates:
            fixed_gain[i] = loss(base_dir, i) - loss(str(raw["models"][i]["model"]), i)
    evaluated: Dict[tuple, Dict[str, Any]] = {}
    # one name per expert whatever checkpoint is chosen: a run's folder (the checkpoints' common one)
    names = task_names([os.path.commonpath(candidates[i]) if i in candidates else str(raw["models"][i]["model"])
                        for i in experts])

    def score(choice: Dict[int, str]) -> Dict[str, Any]:
        key = tuple(choice[i] for i in sorted(candidates))
        if key not in evaluated:
            path = write_config(folder / f"combination-{len(evaluated)}.yml", with_choice(raw, choice))
            label, _, basis = select_by.partition(" ")
            result = plan(str(path), [label], params, [basis] if basis else list(bases), out_dir=None, device=device,
                          interference=False)
            row = next(m for m in result["methods"] if m["name"] == select_by)
            rho = [row["rho_by_task"][t] for t in result["tasks"]]  # in expert order
            gain = [gains[i][choice[i]] if i in candidates else fixed_gain[i] for i in experts]
            # a checkpoint that does not improve on the base has nothing for the merge to keep
            evaluated[key] = {"checkpoints": {str(i): choice[i] for i in sorted(candidates)},
                              "rho_by_task": dict(zip(names, rho)), "gain_by_task": dict(zip(names, gain)),
                              "score": sum(max(g, 0.0) * r for g, r in zip(gain, rho))}
            print(f"plan: combination {len(evaluated)}: score {evaluated[key]['score']:.4f}", file=sys.stderr)
        return evaluated[key]

    combinations = list(itertools.product(*(candidates[i] for i in sorted(candidates))))
    if len(combinations) <= EXHAUSTIVE:
        for combo in combinations:
            score(dict(zip(sorted(candidates), combo)))
        search = "exhaustive"
    else:
        current, search = dict(last), "coordinate ascent from the last checkpoints"
        improved = True
        while improved:
            improved = False
            for i in sorted(candidates):
                best = max(candidates[i], key=lambda c: score({**current, i: c})["score"])
                if score({**current, i: best})["score"] > score(current)["score"]:
                    current[i], improved = best, True
    individual = {i: max(cands, key=lambda c: gains[i][c]) for i, cands in candidates.items()}
    reference = {"last": score(last), "best individual": score(individual)}
    chosen = max(evaluated.values(), key=lambda e: e["score"])
    config = with_choice(raw, {int(i): c for i, c in chosen["checkpoints"].items()})
    result = plan(str(write_config(folder / "selected.yml", config)), methods, params, bases, out_dir=str(out),
                  device=device)
    selected = write_config(out / "plan-configs" / "selected.yml", config)  # after plan replaced that folder's files
    result["selection"] = {
        "by": select_by, "search": search, "config": str(selected),
        "candidates": {names[experts.index(i)]: cands for i, cands in candidates.items()},
        "gains": {names[experts.index(i)]: g for i, g in gains.items()},
        "chosen": chosen, "last": reference["last"], "best_individual": reference["best individual"],
        "evaluated": sorted(evaluated.values(), key=lambda e: -e["score"]),
    }
    (out / "plan.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "plan.md").write_text(render_markdown(result), encoding="utf-8")
    return result
