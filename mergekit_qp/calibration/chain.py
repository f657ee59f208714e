"""The layer-by-layer pass of sequential merging, in plain torch (no mergekit).

State: per task, the calibration hidden states on the merged model (and, for the expert-output
target, on the expert itself). For each layer: its modules in stages (q/k/v, then o_proj, ...);
per stage, each task's statistics of the stage's input with the stages before it already
merged; a callback merges the stage's tensors from those statistics; then the merged layer
runs and its outputs are the next layer's inputs. plugin/sequential.py drives this inside
mergekit's task graph; tests drive it against a reference loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.statistics import Accumulator, LinearStats, NormStats, is_conv1d, is_linear
from . import layers
from .layers import Backbone, Batch

# merge(modules, statistics per task) → merged tensors of those modules (names inside the layer);
# called once per stage, then once with (None, None) for the layer's tensors of no stage.
MergeStage = Callable[[Optional[List[str]], Optional[List[object]]], Dict[str, torch.Tensor]]


@dataclass
class ChainState:
    merged: List[List[Batch]]  # per task: the merged model's hidden states
    expert: Optional[List[List[Batch]]]  # per task: the expert's own (expert-output target only)


def start(backbone: Backbone, merged_outer: Dict[str, torch.Tensor],
          expert_outer: Optional[Sequence[Dict[str, torch.Tensor]]], tokens: Sequence[Sequence], device) -> ChainState:
    """The first layer's inputs: each task's calibration batches through the merged embeddings
    (and through each expert's own, when `expert_outer` is given)."""
    merged = [layers.embed(backbone, merged_outer, batches, device) for batches in tokens]
    expert = None
    if expert_outer is not None:
        expert = [layers.embed(backbone, own, batches, device) for own, batches in zip(expert_outer, tokens)]
    return ChainState(merged=merged, expert=expert)


def merge_layer(backbone: Backbone, index: int, state: ChainState, base_weights: Dict[str, torch.Tensor],
                expert_weights: Optional[Sequence[Dict[str, torch.Tensor]]], merge: MergeStage,
                device) -> Tuple[Dict[str, torch.Tensor], ChainState]:
    """Merge layer `index` stage by stage; returns its merged tensors and the next state."""
    structure = backbone.layer(index, base_weights, device)
    stage_list = layers.stages(structure, index, state.merged[0][0])
    del structure

    expert_rows, next_expert = None, None
    if state.expert is not None:
        expert_rows, next_expert = [], []
        for k, own_weights in enumerate(expert_weights):
            own = backbone.layer(index, own_weights, device)
            rows, outputs = layers.all_module_inputs(own, index, state.expert[k], [s[0] for s in stage_list])
            expert_rows.append((own, rows))
            next_expert.append(outputs)

    merged: Dict[str, torch.Tensor] = {}
    for stage in stage_list:
        layer = backbone.layer(index, {**base_weights, **merged}, device)
        statistics = []
        for k, batches in enumerate(state.merged):
            rows = layers.stage_inputs(layer, index, stage[0], batches)
            statistics.append(stage_statistics(layer, stage[0], rows, None if expert_rows is None else expert_rows[k]))
        del layer
        merged.update(merge(list(stage), statistics))
    merged.update(merge(None, None))
    layer = backbone.layer(index, {**base_weights, **merged}, device)
    next_merged = [layers.run_layer(layer, index, batches) for batches in state.merged]
    return merged, ChainState(merged=next_merged, expert=next_expert)


def _moments(rows: Sequence[torch.Tensor], other: Optional[Sequence[torch.Tensor]] = None,
             second: str = "full") -> Accumulator:
    # float64 products: the expert-output target inverts per-task Grams (see core.statistics).
    acc = Accumulator(second, product_dtype=torch.float64)
    for i, r in enumerate(rows):
        acc.add(r, None if other is None else other[i])
    return acc


def stage_statistics(layer, module_name: str, rows: Sequence[torch.Tensor], expert=None):
    """Statistics of one stage's shared input for one task: merged-model rows, and for the
    expert-output target (`expert` = (the expert's layer, its rows per module)) the expert's own
    rows at the same tokens."""
    module = layer.get_submodule(module_name)
    expert_rows = None
    if expert is not None:
        own_layer, own_rows = expert
        expert_rows = own_rows[module_name]
    if is_linear(module):
        transposed = is_conv1d(module)
        own = _moments(rows)
        if expert_rows is None:
            return LinearStats(gram=own.second_moment(), mean=own.mean(), transposed=transposed)
        theirs = _moments(expert_rows)
        return LinearStats(gram=own.second_moment(), mean=own.mean(),
                           cross=_moments(rows, expert_rows).second_moment(), expert_mean=theirs.mean(),
                           expert_gram=theirs.second_moment(), transposed=transposed)
    normed = [layers.normalised(layer, module_name, r) for r in rows]
    own = _moments(normed, second="diagonal")
    if expert_rows is None:
        return NormStats(m2=own.second_moment(), m1=own.mean())
    theirs = [layers.normalised(own_layer, module_name, r) for r in expert_rows]
    return NormStats(m2=own.second_moment(), m1=own.mean(),
                     cross=_moments(normed, theirs, second="diagonal").second_moment(),
                     expert_m1=_moments(theirs, second="diagonal").mean())
