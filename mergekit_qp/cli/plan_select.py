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
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .compare import CompareError, check_causal_lm, heldout_sequences, read_config
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
    # a symlink (e.g. last-checkpoint) would repeat one; tmp-* folders are unfinished saves
    found = sorted((d for d in folder.iterdir() if (d / "config.json").is_file() and not d.is_symlink()
                    and not d.name.startswith("tmp")), key=_natural)
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


def expert_names(raw: Dict[str, Any], experts: List[int], candidates: Dict[int, List[str]]) -> List[str]:
    """One name per expert whatever checkpoint is chosen: a folder of checkpoints' own name, a
    list's common folder, a single model's folder; `models[i]` where those would collide."""
    def name(i: int) -> str:
        if i not in candidates:
            return os.path.basename(str(raw["models"][i]["model"]).rstrip("/"))
        model = raw["models"][i]["model"]
        common = model if isinstance(model, str) else os.path.commonpath([os.path.abspath(c) for c in model])
        return os.path.basename(str(common).rstrip("/")) or f"models[{i}]"

    names = [name(i) for i in experts]
    return [n if names.count(n) == 1 else f"models[{i}]" for i, n in zip(experts, names)]


def select_checkpoints(config_path: str, eval_items: Sequence[str], methods: Sequence[str], params: Sequence[str],
                       bases: Sequence[str], out_dir: str, device: str = "cpu", select_by: str = "output_qp full",
                       eval_samples: int = 256, eval_seq_len: Optional[int] = None) -> Dict[str, Any]:
    """Score the combinations of checkpoints, plan the best in full; returns plan's result with a
    `selection` entry (every evaluated combination, the gains, the last and best-individual ones)."""
    import torch

    from ..calibration.data import batches
    from ..calibration.models import load_tokenizer
    from .plan import checked_plan, plan
    from .plan_report import render_markdown

    raw = read_config(config_path, command="plan")
    candidates = candidates_of(raw)
    experts = [i for i, e in enumerate(raw["models"]) if str(e.get("model")) != str(raw["base_model"])]
    # Everything checkable is checked before any forward pass.
    if not eval_items:
        raise CompareError("plan: choosing among checkpoints needs held-out data: --eval FILE, one per expert in "
                           "config order (each checkpoint's gain is its held-out loss drop against the base)")
    if len(eval_items) != len(experts):
        raise CompareError(f"plan: --eval got {len(eval_items)} files for {len(experts)} experts: one per expert, in "
                           "config order")
    if eval_samples < 1 or (eval_seq_len is not None and eval_seq_len < 2):
        raise CompareError("plan: --eval-samples must be ≥ 1 and --eval-seq-len ≥ 2")
    for path in eval_items:
        if not os.path.isfile(path):
            raise CompareError(f"plan: --eval file does not exist: {path}")
    for i, cands in candidates.items():
        if (raw["models"][i].get("parameters") or {}).get("statistics"):
            raise CompareError(f"plan: models[{i}] lists several checkpoints and one `statistics:` artifact, which "
                               "describes one model: give `calibration:` data instead")
        for c in cands:
            if not os.path.isfile(os.path.join(c, "config.json")):
                raise CompareError(f"plan: checkpoint {c} of models[{i}] is not a model folder (no config.json)")
    names = expert_names(raw, experts, candidates)
    out = Path(out_dir)
    folder = out / "plan-configs" / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yml"):  # an earlier selection's configs
        old.unlink()
    last = {i: c[-1] for i, c in candidates.items()}
    rows, _, _ = checked_plan(str(write_config(folder / "last.yml", with_choice(raw, last))), methods, params, bases)
    if select_by not in [label for label, _ in rows]:
        known = ", ".join(name for name, _ in rows)
        raise CompareError(f"plan: --select-by {select_by!r} is not a planned row ({known})")
    label, _, basis = select_by.partition(" ")
    select_params = [p for p in params if p.partition(":")[0].strip() == label]
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
    for i in experts:
        if not any(len(seq) >= 2 for seq in sequences[i]):
            raise CompareError(f"plan --eval: the held-out data of {names[experts.index(i)]} has no sequence of two "
                               "or more tokens")

    def losses(model_dir: str, indices) -> Dict[int, float]:
        model = load_causal_lm(model_dir, device)  # once per model, all its tasks
        return {i: heldout_loss(model, batches(sequences[i], pad_id=pad), device=device) for i in indices}

    base_loss = losses(base_dir, experts)
    gains = {i: {c: base_loss[i] - losses(c, [i])[i] for c in cands} for i, cands in candidates.items()}
    fixed_gain = {i: base_loss[i] - losses(str(raw["models"][i]["model"]), [i])[i]
                  for i in experts if i not in candidates}  # experts with one checkpoint, for the score
    evaluated: Dict[tuple, Dict[str, Any]] = {}

    def score(choice: Dict[int, str]) -> Dict[str, Any]:
        key = tuple(choice[i] for i in sorted(candidates))
        if key not in evaluated:
            path = write_config(folder / f"combination-{len(evaluated)}.yml", with_choice(raw, choice))
            torch.manual_seed(0)  # a random method scores every combination on the same draw
            result = plan(str(path), [label], select_params, [basis] if basis else list(bases), out_dir=None,
                          device=device, interference=False)
            row = next(m for m in result["methods"] if m["name"] == select_by)
            rho = [row["rho_by_task"][t] for t in result["tasks"]]  # in expert order
            gain = [gains[i][choice[i]] if i in candidates else fixed_gain[i] for i in experts]
            # a checkpoint that does not improve on the base has nothing for the merge to keep
            evaluated[key] = {"checkpoints": {str(i): choice[i] for i in sorted(candidates)},
                              "rho_by_task": dict(zip(names, rho)), "gain_by_task": dict(zip(names, gain)),
                              "score": sum(max(g, 0.0) * r for g, r in zip(gain, rho))}
            print(f"plan: combination {len(evaluated)}: score {evaluated[key]['score']:.4f}", file=sys.stderr)
        return evaluated[key]

    if math.prod(len(c) for c in candidates.values()) <= EXHAUSTIVE:
        for combo in itertools.product(*(candidates[i] for i in sorted(candidates))):
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
