"""Sequential merging inside mergekit's task graph: thin graph tasks over the plain-torch chain
of calibration/chain.py.

Per layer L, one `SequentialStep` takes the chain state, gathers the layer's raw tensors, and
runs `chain.merge_layer`, whose per-stage callback calls the layer's own mergekit merge tasks
with the stage's statistics on the merge's state. A `SequentialTensor` per weight hands the
merged tensor to mergekit's writer. Chain tasks hash and compare by key: by value, every hash
would walk the whole chain. Labels sort as seq.<layer>.<phase>, so the scheduler (which orders
ready tasks by label) saves layer L, then loads layer L+1, then merges it; loads are gated
behind the previous step, so raw tensors of later layers are not read early and memory stays
at about a layer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from mergekit.graph import Task
from pydantic import ConfigDict

from ..calibration import chain
from ..calibration.cache import CalibrationSettings
from ..calibration.data import CalibrationSource, batches, load_records, tokenize_calibration
from ..calibration.layers import Backbone, layer_local_name
from ..calibration.models import load_tokenizer, local_model_path
from . import compat
from .merge_state import MergeState


@dataclass
class SequentialSetup:
    """What every step of one sequential merge shares (not part of any hash)."""

    backbone: Any  # calibration.layers.Backbone of the base model
    base: Any  # ModelReference
    experts: Tuple[Any, ...]  # ModelReference, in the merge tasks' order
    calibration: Tuple[str, ...]
    settings: CalibrationSettings
    target: str
    device: str
    trust_remote_code: bool
    layer_names: Dict[int, Dict[str, str]]  # layer → {canonical tensor name: name inside the layer}
    merge_state: MergeState


@dataclass
class StepResult:
    tensors: Dict[str, Optional[torch.Tensor]]
    state: chain.ChainState


class _KeyedTask(Task[Any]):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    key: str

    def __hash__(self):
        return hash((type(self).__name__, self.key))

    def __eq__(self, other):
        return type(self) is type(other) and self.key == other.key


def _label(layer: int, phase: int) -> str:
    return f"seq.{layer:05d}.{phase}"


class GatedLoad(Task[Optional[torch.Tensor]]):
    """mergekit's LoadTensor, run only once `gate` (the previous step) has run."""

    load: Task
    gate: Task
    label: str

    def arguments(self):
        return {"gate": self.gate}

    def execute(self, gate=None):
        return self.load.execute()

    def priority(self) -> int:
        return self.load.priority()

    def group_label(self) -> Optional[str]:
        return self.label


class GatedGather(Task[Dict[Any, torch.Tensor]]):
    inner: Task  # GatherTensors
    gate: Task
    label: str

    def arguments(self):
        return {k: GatedLoad(load=v, gate=self.gate, label=self.label)
                for k, v in compat.gather_loads(self.inner).items()}

    def execute(self, **kwargs):
        return self.inner.execute(**kwargs)

    def group_label(self) -> Optional[str]:
        return self.label


class SequentialStart(_KeyedTask):
    """The first layer's inputs: the calibration tokens through the merged embeddings (and, for
    the expert-output target, through each expert's own)."""

    setup: Any  # SequentialSetup (compared by the task's key, never validated or hashed)
    merged: Tuple[Task, ...]  # merge tasks of the tensors before the first layer
    names: Tuple[str, ...]

    def arguments(self):
        args = {f"m{i}": t for i, t in enumerate(self.merged)}
        if self.setup.target == "expert_outputs":
            args.update({f"r{i}": compat.merge_task_view(t).gather for i, t in enumerate(self.merged)})
        return args

    def group_label(self) -> Optional[str]:
        return _label(0, 0)

    def execute(self, **kwargs) -> StepResult:
        setup = self.setup
        merged_outer = {n: kwargs[f"m{i}"] for i, n in enumerate(self.names) if kwargs[f"m{i}"] is not None}
        expert_outer = None
        if setup.target == "expert_outputs":
            expert_outer = [{n: kwargs[f"r{i}"][e] for i, n in enumerate(self.names) if e in (kwargs[f"r{i}"] or {})}
                            for e in setup.experts]
        state = chain.start(setup.backbone, merged_outer, expert_outer, calibration_batches(setup),
                            torch.device(setup.device))
        return StepResult(tensors={}, state=state)


def calibration_batches(setup: SequentialSetup):
    """Per expert, its calibration sequences as right-padded (input_ids, mask) batches: the same
    tokens the independent statistics use."""
    tokenizer = load_tokenizer(local_model_path(setup.base), setup.trust_remote_code)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    out = []
    for path in setup.calibration:
        source = CalibrationSource(path=str(path), field=setup.settings.field)
        sequences = tokenize_calibration(load_records(source), tokenizer, samples=setup.settings.samples,
                                         seq_len=setup.settings.seq_len, seed=setup.settings.seed,
                                         source_name=source.path, pack=setup.settings.packing)
        out.append(list(batches(sequences, max_tokens=setup.settings.max_batch_tokens, pad_id=pad_id)))
    return out


class SequentialStep(_KeyedTask):
    """Merge layer `index` on the merged model's calibration inputs, stage by stage."""

    setup: Any  # SequentialSetup (compared by the task's key, never validated or hashed)
    index: int
    previous: Task
    merges: Tuple[Task, ...]  # this layer's ExecuteMergeMethodTasks, called from here

    def arguments(self):
        label = _label(self.index, 1)
        args = {"previous": self.previous}
        args.update({f"g{i}": GatedGather(inner=compat.merge_task_view(t).gather, gate=self.previous, label=label)
                     for i, t in enumerate(self.merges)})
        return args

    def group_label(self) -> Optional[str]:
        return _label(self.index, 2)

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, previous: StepResult, **gathered) -> StepResult:
        setup, index = self.setup, self.index
        local = setup.layer_names[index]
        views = [compat.merge_task_view(t) for t in self.merges]
        raw = {v.weight_name: gathered[f"g{i}"] for i, v in enumerate(views)}
        base_weights = {local[n]: v[setup.base] for n, v in raw.items() if setup.base in v}
        expert_weights = None
        if previous.state.expert is not None:
            expert_weights = [{local[n]: v[e] for n, v in raw.items() if e in v} for e in setup.experts]
        prefix = _layer_prefix(local)
        by_module: Dict[str, List[Any]] = {}
        for v in views:
            by_module.setdefault(local[v.weight_name].rpartition(".")[0], []).append(v)
        merged: Dict[str, Optional[torch.Tensor]] = {}
        merge_state = setup.merge_state

        def merge(modules, statistics):
            """The merge tasks of `modules` (None: every one left) with the stage's statistics."""
            found = {}
            if modules is not None:
                for k, expert in enumerate(setup.experts):
                    for module in modules:
                        found[(str(expert), prefix + module)] = statistics[k]
            tasks = [t for m in (modules if modules is not None else list(by_module)) for t in by_module.pop(m, [])]
            # Tensors of no stage get no statistics: the configured fallback.
            merge_state.stage_statistics = found
            try:
                out = {}
                for view in tasks:
                    result = compat.execute_merge_task(view.task, raw[view.weight_name])
                    merged[view.weight_name] = result
                    if result is not None:
                        out[local[view.weight_name]] = result
                return out
            finally:
                merge_state.stage_statistics = None

        _, state = chain.merge_layer(setup.backbone, index, previous.state, base_weights, expert_weights, merge,
                                     torch.device(setup.device))
        return StepResult(tensors=merged, state=state)


def _layer_prefix(local: Dict[str, str]) -> str:
    name, inside = next(iter(local.items()))
    return name[: len(name) - len(inside)]


class SequentialTensor(_KeyedTask):
    """One merged tensor of a step, for mergekit's writer."""

    step: Task
    name: str
    index: int

    def arguments(self):
        return {"step": self.step}

    def group_label(self) -> Optional[str]:
        return _label(self.index, 3)

    def execute(self, step: StepResult) -> Optional[torch.Tensor]:
        return step.tensors.get(self.name)

    @property
    def merge_state(self) -> MergeState:
        return self.step.setup.merge_state


def plan_sequential(planner, layer_entries: List[List[int]], merge_state: MergeState) -> None:
    """Rewrite the planned tensors of an output_qp merge with `sequential: true` into the chain
    above (called after mergekit has planned every tensor)."""
    config = planner.config
    if len(config.modules) != 1:
        raise ValueError("output_qp: sequential: true needs a single-module model (this one has "
                         f"modules {', '.join(config.modules)})")
    tensors = compat.planned_tensors(planner)
    in_layers = {i for entries in layer_entries for i in entries}
    first_layer = min(in_layers) if in_layers else len(tensors)
    pre = [i for i in range(first_layer) if i not in in_layers]
    if not layer_entries or not layer_entries[0]:
        raise ValueError("output_qp: sequential: true found no layers to merge")
    merge0 = compat.merge_task_view(tensors[layer_entries[0][0]][1])
    base = merge0.base_model
    experts = tuple(m for m in merge0.model_order if m != base)
    params = merge0.parameters
    calibration = []
    for m in experts:
        value = merge0.input_parameters[m]["calibration"]
        if merge0.input_parameters[m].get("statistics"):
            raise ValueError(f"output_qp: sequential: true computes each layer's statistics on the merged layers' "
                             f"outputs, which a statistics artifact cannot hold: give model {m} calibration data")
        if not isinstance(value, str) or not value:
            raise ValueError(f"output_qp: no calibration data for model {m}: sequential merging needs one per expert")
        calibration.append(value)
    backbone = Backbone(base.config(trust_remote_code=planner.options.trust_remote_code))
    if len(layer_entries) != backbone.num_layers:
        raise ValueError(f"output_qp: sequential: true needs the output to have the base model's "
                         f"{backbone.num_layers} layers; the config gives {len(layer_entries)}")
    layer_names: Dict[int, Dict[str, str]] = {}
    for index, entries in enumerate(layer_entries):
        names = {}
        for i in entries:
            name = tensors[i][0].name
            parsed = layer_local_name(name)
            if parsed is None or parsed[0] != index:
                raise ValueError(f"output_qp: sequential: tensor {name} of output layer {index} does not "
                                 "name that layer")
            names[name] = parsed[1]
        layer_names[index] = names
    setup = SequentialSetup(
        backbone=backbone, base=base, experts=experts, calibration=tuple(calibration),
        settings=CalibrationSettings.from_params(params), target=params["target"],
        device=str(planner.options.device or "cpu"), trust_remote_code=bool(planner.options.trust_remote_code),
        layer_names=layer_names, merge_state=merge_state)
    run = uuid.uuid4().hex
    previous: Task = SequentialStart(key=f"{run}/start", setup=setup, merged=tuple(tensors[i][1] for i in pre),
                                     names=tuple(tensors[i][0].name for i in pre))
    replaced = {}
    for index, entries in enumerate(layer_entries):
        step = SequentialStep(key=f"{run}/{index}", setup=setup, index=index, previous=previous,
                              merges=tuple(tensors[i][1] for i in entries))
        for i in entries:
            weight = tensors[i][0]
            replaced[i] = (weight, SequentialTensor(key=f"{run}/{index}/{weight.name}", step=step,
                                                    name=weight.name, index=index))
        previous = step
    compat.set_planned_tensors(planner, [replaced.get(i, entry) for i, entry in enumerate(tensors)])
