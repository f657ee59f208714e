"""The one boundary to mergekit's private API: every private symbol the plugin touches, in one
table checked at registration, and the accessors the rest of the plugin uses instead of naming
them. A mergekit whose private API differs is refused with a message naming the symbol, never
patched blindly. (docs/architecture.md lists the table with what each entry is for.)
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

__all__ = ["PRIVATE_API", "MergeTaskView", "check_mergekit", "concat_safe_weight", "install", "merge_task_view",
           "planned_tensors", "read_tensor", "set_planned_tensors", "tensor_names", "unregister",
           "with_merge_parameters", "execute_merge_task", "merge_task_type", "mergekit_version"]


@dataclass(frozen=True)
class Private:
    """One private mergekit symbol: `module`:`path`; `parameters` (a callable's parameter names)
    or `fields` (pydantic fields / class annotations) that the plugin relies on."""

    module: str
    path: str
    why: str
    parameters: Optional[Tuple[str, ...]] = None
    fields: Tuple[str, ...] = ()


PRIVATE_API: Tuple[Private, ...] = (
    Private("mergekit.plan", "MergePlanner.normalize_config", "parameter checks and the statistics pre-pass "
            "before planning", ("self",)),
    Private("mergekit.plan", "MergePlanner.plan_tensor", "BERT fix: tuple aliases concatenated with a list",
            ("self", "weight", "weights_in", "models", "cfg_reader")),
    Private("mergekit.plan", "MergePlanner.plan_layer", "which planned tensors make up each output layer",
            ("self", "sources", "layer_offset", "t", "cfg_reader", "module_name")),
    Private("mergekit.plan", "MergePlanner._plan", "per-merge state into output_qp tasks; sequential chain",
            ("self",)),
    Private("mergekit.plan", "MergePlanner", "the planned (weight, task) list, read and rewritten",
            fields=("_tensors",)),
    Private("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask", "sequential steps read a layer's "
            "merge tasks and call them; per-merge state rides in `parameters`",
            fields=("gather_tensors", "model_order", "base_model", "output_weight", "parameters",
                    "input_parameters")),
    Private("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask.execute", "called by sequential steps",
            ("self", "tensors", "_kwargs")),
    Private("mergekit.io.tasks", "GatherTensors.arguments", "sequential: gated loads", ("self",)),
    Private("mergekit.io.tasks", "LoadTensor.execute", "sequential: gated loads", ("self",)),
    Private("mergekit.io.tasks", "LoadTensor.priority", "sequential: gated loads", ("self",)),
    Private("mergekit.io.tasks", "LoaderCache.get", "reading a bias beside its weight", ("self", "model")),
    Private("mergekit.io.tasks", "FinalizeModel.execute", "merge report after the last tensor",
            ("self", "writer", "kwargs")),
    Private("mergekit.io.tasks", "FinalizeModel", "finding the merge's state from its save tasks",
            fields=("tensor_save_tasks", "writer_task")),
    Private("mergekit.io.tasks", "SaveTensor.execute", "write failures name the output folder",
            ("self", "writer", "tensor")),
    Private("mergekit.io.tasks", "SaveTensor", "finding the merge's state", fields=("tensor_task", "writer_task")),
    Private("mergekit.io.tasks", "TensorWriterTask.execute", "stale config.json removed when writing starts",
            ("self", "_kwargs")),
    Private("mergekit.io.tasks", "TensorWriterTask", "the output folder", fields=("out_path",)),
    Private("mergekit.merge", "generate_card", "model card section", ("config", "config_yaml", "name")),
    Private("mergekit.merge_methods.registry", "_METHODS", "unregister (mergekit has no public one)"),
    Private("mergekit.merge_methods", "get", "wrapped once by the start-up hook", ("name",)),
    Private("mergekit.architecture", "WeightInfo", "BERT fix", fields=("aliases",)),
)


def _resolve(entry: Private) -> Tuple[Any, Any]:
    """(owner, symbol) of a table entry, or (owner, None) when it is missing."""
    owner: Any = importlib.import_module(entry.module)
    parts = entry.path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, None
    return owner, getattr(owner, parts[-1], None)


def _fields(symbol) -> set:
    names = set(getattr(symbol, "model_fields", {}) or {})
    for klass in getattr(symbol, "__mro__", ()):
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def mismatches() -> List[str]:
    """Every table entry that this mergekit does not provide as expected."""
    problems = []
    for entry in PRIVATE_API:
        try:
            owner, symbol = _resolve(entry)
        except ImportError as error:
            problems.append(f"{entry.module} ({error})")
            continue
        where = f"{entry.module}.{entry.path}"
        if symbol is None:
            problems.append(f"{where} is missing")
            continue
        if entry.parameters is not None:
            try:
                found = tuple(inspect.signature(symbol).parameters)
            except (TypeError, ValueError):
                found = None
            if found != entry.parameters:
                problems.append(f"{where} takes {found}, expected {entry.parameters}")
        missing = [f for f in entry.fields if f not in _fields(symbol)]
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}")
    return problems


def mergekit_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return None


def check_mergekit() -> None:
    """Refuse a mergekit whose private API is not the one this plugin was written for."""
    problems = mismatches()
    if problems:
        from .. import __version__

        raise RuntimeError(
            f"mergekit {mergekit_version()}: {'; '.join(problems)} — not what mergekit-qp {__version__} expects "
            "(written for mergekit 0.1.5); output_qp is disabled. Upgrade mergekit-qp.")


# -- accessors -------------------------------------------------------------------------------------
def install(replacements: Dict[str, Callable[[Callable], Callable]]) -> None:
    """Patch table entries: `replacements[path](original)` returns the new callable."""
    for entry in PRIVATE_API:
        if entry.path in replacements:
            owner, original = _resolve(entry)
            setattr(owner, entry.path.split(".")[-1], replacements[entry.path](original))


def planned_tensors(planner) -> List[Tuple[Any, Any]]:
    return planner._tensors


def set_planned_tensors(planner, tensors: List[Tuple[Any, Any]]) -> None:
    planner._tensors = tensors


def merge_task_type():
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return ExecuteMergeMethodTask


@dataclass(frozen=True)
class MergeTaskView:
    """What a sequential step reads of one of mergekit's per-tensor merge tasks."""

    task: Any
    gather: Any  # the task loading every model's version of the tensor
    model_order: Tuple[Any, ...]
    base_model: Any
    weight_name: str
    parameters: Dict[str, Any]
    input_parameters: Dict[Any, Dict[str, Any]]


def merge_task_view(task) -> MergeTaskView:
    return MergeTaskView(task=task, gather=task.gather_tensors, model_order=tuple(task.model_order),
                         base_model=task.base_model, weight_name=task.output_weight.name,
                         parameters=dict(task.parameters.items()),
                         input_parameters={m: dict(v.items()) for m, v in task.input_parameters.items()})


def merge_task_parameter(task, name: str) -> Any:
    """A shared parameter of one of mergekit's merge tasks (None when it has none, or when the
    task is of another kind)."""
    if not isinstance(task, merge_task_type()):
        return None
    return dict(task.parameters.items()).get(name)


def execute_merge_task(task, tensors):
    return task.execute(tensors=tensors)


def with_merge_parameters(task, extra: Dict[str, Any]):
    """The merge task with `extra` added to the shared parameters its method receives."""
    from mergekit.common import ImmutableMap

    return task.model_copy(update={"parameters": ImmutableMap(data={**dict(task.parameters.items()), **extra})})


def gather_loads(gather) -> Dict[str, Any]:
    return gather.arguments()


def save_task_outputs(finalize) -> Iterable[Any]:
    """The tensor tasks whose results a FinalizeModel waits for."""
    return [save.tensor_task for save in finalize.tensor_save_tasks]


def writer_folder(task) -> str:
    """The output folder of a FinalizeModel, SaveTensor or TensorWriterTask."""
    writer = getattr(task, "writer_task", task)
    return writer.out_path


def _loader(model):
    """mergekit's cached loader of a ModelReference, or of a folder named by a string (inputs of
    mergekit's Python API identified by their folders)."""
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    if isinstance(model, str):
        model = ModelReference.model_validate(model)
    return LoaderCache().get(model)


def tensor_names(model) -> set:
    return set(_loader(model).index.tensor_paths)


def read_tensor(model, name: str, device: str):
    return _loader(model).get_tensor(name, device=device)


def unregister(names: Iterable[str]) -> None:
    from mergekit.merge_methods import registry

    for name in names:
        registry._METHODS.pop(name, None)


class _ConcatTuple(tuple):
    """A tuple that `list + tuple` accepts, for mergekit 0.1.5's alias concatenation."""

    def __radd__(self, other):
        return list(other) + list(self)


def concat_safe_weight(weight):
    """mergekit 0.1.5 computes `[w.name] + (w.aliases or [])` for optional weights while aliases
    is a tuple: every BERT-family merge crashes on embeddings.position_ids."""
    if isinstance(weight.aliases, tuple) and not isinstance(weight.aliases, _ConcatTuple):
        # model_copy does not re-validate, so the subclass survives (and hashes like a tuple).
        return weight.model_copy(update={"aliases": _ConcatTuple(weight.aliases)})
    return weight
