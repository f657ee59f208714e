"""Everything that touches mergekit: the `output_qp` method, its parameters, registration,
and the narrow, version-gated patches of mergekit's planner.

mergekit 0.1.5 hands a merge method one tensor group at a time (all models' versions of one
weight). `output_qp` looks up the calibration statistics of each expert for that weight
(computed once per expert and cached on disk, see `statistics.py`) and solves the QP of
`qp.py`. Anything without statistics falls back to a configured simple method, visibly.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from . import qp, report
from .diagnostic import augmented_gram
from .statistics import EmbeddingStats, LinearStats, NormStats

LOG = logging.getLogger("mergekit_qp")

METHOD_NAME = "output_qp"
FALLBACKS = ("linear", "task_arithmetic", "base")
# Settings of the forward passes: one value for the whole merge, so plain top-level scalars.
CALIBRATION_SETTINGS = ("calibration_field", "calibration_samples", "calibration_seq_len",
                        "calibration_seed", "cache_dir")


def _parameters() -> Tuple[ParameterSpec, ...]:
    def shared(name, value_type, default, description):
        return ParameterSpec(name, value_type, ParameterScope.SHARED, default, description)

    def per_expert(name, value_type, default, description):
        return ParameterSpec(name, value_type, ParameterScope.NON_BASE, default, description)

    return (
        per_expert("weight", float, 1.0, "task weight ω of this expert in the objective"),
        per_expert(
            "calibration",
            Optional[str],
            None,
            "calibration data of this expert's task (file, folder or hub name); "
            "a top-level value is the default for every expert",
        ),
        shared("calibration_field", Optional[str], None, "text (or input_ids) field; default text"),
        shared("calibration_samples", int, 128, "number of calibration sequences per expert"),
        shared("calibration_seq_len", int, 512, "maximum tokens per calibration sequence"),
        shared("calibration_seed", int, 0, "seed of the deterministic sample selection"),
        shared("basis", str, "full", "full | diagonal | task | rank-N"),
        shared("ridge", float, 1e-4, "Tikhonov weight relative to tr(G)/d, centred on the average update"),
        shared("nonneg", bool, False, "task basis: coefficients ≥ 0"),
        shared("sum_to_one", bool, False, "task basis: coefficients sum to one"),
        shared("fallback", str, "linear", "method for tensors without statistics: " + " | ".join(FALLBACKS)),
        shared("cache_dir", Optional[str], None, "statistics cache folder (default $MERGEKIT_QP_CACHE or ~/.cache/mergekit_qp)"),
    )


PARAMETERS = _parameters()
PARAMETER_NAMES = tuple(p.name for p in PARAMETERS)
_PER_EXPERT = {p.name for p in PARAMETERS if p.scope != ParameterScope.SHARED}


@dataclass(frozen=True)
class Basis:
    kind: str  # full | diagonal | task | rank
    rank: Optional[int] = None

    @staticmethod
    def parse(text: str) -> "Basis":
        value = str(text).strip().lower()
        if value in ("full", "diagonal", "task"):
            return Basis(value)
        match = re.fullmatch(r"rank-(\d+)", value)
        if match and int(match.group(1)) >= 1:
            return Basis("rank", int(match.group(1)))
        raise ValueError(
            f"output_qp: invalid basis {text!r}; valid: full, diagonal, task, rank-N (N ≥ 1, e.g. rank-16)"
        )


def validate_values(params: Dict[str, Any], where: str = "") -> None:
    """Checks of shared values beyond their types; raises ValueError naming the parameter."""
    at = f" ({where})" if where else ""
    basis = Basis.parse(params.get("basis", "full"))
    ridge = params.get("ridge", 0.0)
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"output_qp: ridge must be finite and ≥ 0{at}; got {ridge}")
    for name in ("calibration_samples", "calibration_seq_len"):
        if name in params and params[name] < 1:
            raise ValueError(f"output_qp: {name} must be ≥ 1{at}; got {params[name]}")
    if params.get("fallback", "linear") not in FALLBACKS:
        raise ValueError(
            f"output_qp: invalid fallback {params['fallback']!r}{at}; valid: {', '.join(FALLBACKS)}"
        )
    if basis.kind != "task" and (params.get("nonneg") or params.get("sum_to_one")):
        raise ValueError(f"output_qp: nonneg / sum_to_one apply to basis: task only{at}")
    if "weight" in params and not (math.isfinite(params["weight"]) and params["weight"] > 0):
        raise ValueError(f"output_qp: weight must be finite and > 0{at}; got {params['weight']}")


class OutputQPMerge(GroupMergeMethod):
    """Merging as the convex QP of design §3, one tensor group at a time."""

    def __init__(self):
        self.spec = MergeMethodSpec(
            name=METHOD_NAME,
            parameters=PARAMETERS,
            contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2, min_non_base=1),
            pretty_name="Output-space QP",
            reference_url="https://arxiv.org/abs/2605.29101",
        )
        self._lock = threading.Lock()
        self.reset()

    def reset(self, vocabulary_permuted: bool = False, report_settings: Optional[Dict] = None) -> None:
        """Forget everything of an earlier merge in this process (called when a merge is planned)."""
        with self._lock:
            self._pending: Dict[Tuple, torch.Tensor] = {}  # the other half of a joint weight+bias solve
            self.records: List[Dict[str, Any]] = []  # per tensor: ρ or the fallback, for the report
            self.tasks: List[str] = []  # the experts, in the order of the records' per-task values
            # Set while an output_qp merge planned in this process has not written its report.
            self.report_settings = report_settings
            # mergekit re-orders embedding rows when a tokenizer is merged; token statistics
            # follow each expert's own order, so they cannot be used then.
            self.vocabulary_permuted = vocabulary_permuted

    # -- the per-tensor entry point -------------------------------------------------------
    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        from .calibrate import statistics_for

        name = group.metadata.name or ""
        validate_values({k: v for k, v in params.items() if k not in _PER_EXPERT}, where=name)
        base = group.base
        experts = group.non_base
        weights = [float(params["weight"][e.id]) for e in experts]
        for e, w in zip(experts, weights):
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"output_qp: weight of {e.id} must be finite and > 0 (tensor {name}); got {w}")
        if not base.tensor.is_floating_point():
            return base.tensor
        self.tasks = [str(e.id) for e in experts]

        stats = statistics_for(base, experts, params, device=base.tensor.device)
        module, _, leaf = name.rpartition(".")
        found = [s.lookup(module) for s in stats]
        kinds = {type(f) for f in found}
        if None in kinds or len(kinds) != 1:
            return self._fallback(group, weights, params, "no calibration statistics")
        kind = kinds.pop()
        try:
            if kind is LinearStats and base.tensor.ndim == 2 and leaf == "weight":
                return self._linear(group, found, weights, params, part="weight")
            if kind is LinearStats and base.tensor.ndim == 1 and leaf == "bias":
                return self._linear(group, found, weights, params, part="bias")
            if kind is NormStats and base.tensor.ndim == 1 and leaf in ("weight", "bias"):
                return self._norm(group, found, weights, params, part=leaf)
            if kind is EmbeddingStats and base.tensor.ndim == 2:
                if self.vocabulary_permuted and group.metadata.vocabulary_axis is not None:
                    raise _ShapeMismatch("embedding rows re-ordered by the tokenizer merge")
                return self._embedding(group, found, weights, params)
        except _ShapeMismatch as reason:
            return self._fallback(group, weights, params, str(reason))
        return self._fallback(group, weights, params, f"no QP form for a {leaf} of a {kind.__name__[:-5].lower()} module")

    # -- parameter types ------------------------------------------------------------------
    def _linear(self, group, found: Sequence[LinearStats], weights, params, part: str) -> torch.Tensor:
        name = group.metadata.name
        module = name.rpartition(".")[0]
        key = (module, tuple(str(e.id) for e in group.entries), _params_key(params))
        with self._lock:
            if (cached := self._pending.pop((key, part), None)) is not None:
                return cached.to(device=group.base.tensor.device, dtype=group.base.tensor.dtype)

        other = "bias" if part == "weight" else "weight"
        partner = partner_tensors(group, f"{module}.{other}")  # None when the layer has no bias
        if part == "bias" and partner is None:
            raise _ShapeMismatch(f"bias {name} without a weight")
        weight_group = group if part == "weight" else partner
        bias_group = partner if part == "weight" else group

        w0 = weight_group.base.tensor
        deltas = [(e.tensor.double() - w0.double()) for e in weight_group.non_base]
        grams = [s.gram.to(w0.device, torch.float64) for s in found]
        d = w0.shape[1]
        if any(g.shape != (d, d) for g in grams):
            raise _ShapeMismatch(f"statistics of width {grams[0].shape[0]} for a weight of width {d}")
        if bias_group is not None:
            # Homogeneous coordinates: x → [x, 1] so the bias is solved jointly with W.
            b0 = bias_group.base.tensor.double()
            deltas = [torch.cat([dw, (e.tensor.double() - b0)[:, None]], 1) for dw, e in zip(deltas, bias_group.non_base)]
            grams = [augmented_gram(g, s.mean.to(w0.device, torch.float64)) for g, s in zip(grams, found)]

        update = self._solve(deltas, grams, weights, params)
        # One record per linear map (weight and bias solved together), under the weight's name.
        self._record(f"{module}.weight", update, deltas, grams, weights)
        if bias_group is None:
            return (w0.double() + update).to(w0.dtype)
        new_w = (w0.double() + update[:, :d]).to(w0.dtype)
        new_b = (bias_group.base.tensor.double() + update[:, d]).to(bias_group.base.tensor.dtype)
        mine, theirs = (new_w, new_b) if part == "weight" else (new_b, new_w)
        with self._lock:
            self._pending[(key, other)] = theirs
        return mine

    def _solve(self, deltas, grams, weights, params) -> torch.Tensor:
        basis = Basis.parse(params["basis"])
        ridge = float(params["ridge"])
        if basis.kind == "full":
            return qp.full_update(deltas, grams, weights, ridge).double()
        if basis.kind == "diagonal":
            return qp.diagonal_update(deltas, [torch.diagonal(g) for g in grams], weights, ridge).double()
        if basis.kind == "task":
            update, _ = qp.task_update(
                deltas, grams, weights, ridge, nonneg=params["nonneg"], sum_to_one=params["sum_to_one"]
            )
            return update.double()
        return qp.low_rank_update(deltas, grams, weights, ridge, basis.rank).double()

    def _norm(self, group, found: Sequence[NormStats], weights, params, part: str) -> torch.Tensor:
        name = group.metadata.name
        module = name.rpartition(".")[0]
        other = "bias" if part == "weight" else "weight"
        partner = partner_tensors(group, f"{module}.{other}")
        scale_group = group if part == "weight" else partner
        bias_group = partner if part == "weight" else group
        if scale_group is None:
            raise _ShapeMismatch(f"norm bias {name} without a scale")
        g0 = scale_group.base.tensor
        if any(s.m2.shape != g0.shape for s in found):
            raise _ShapeMismatch(f"statistics of width {found[0].m2.shape[0]} for a norm of width {g0.shape[0]}")
        scale_deltas = [e.tensor.double() - g0.double() for e in scale_group.non_base]
        bias_deltas = None
        if bias_group is not None:
            b0 = bias_group.base.tensor.double()
            bias_deltas = [e.tensor.double() - b0 for e in bias_group.non_base]
        dev = g0.device
        scale, bias = qp.featurewise_affine_update(
            scale_deltas,
            bias_deltas,
            [s.m2.to(dev, torch.float64) for s in found],
            [s.m1.to(dev, torch.float64) for s in found],
            weights,
            float(params["ridge"]),
        )
        result = scale if part == "weight" else bias
        return (group.base.tensor.double() + result.to(dev).double()).to(group.base.tensor.dtype)

    def _embedding(self, group, found: Sequence[EmbeddingStats], weights, params) -> torch.Tensor:
        e0 = group.base.tensor
        if any(s.freq.shape[0] != e0.shape[0] for s in found):
            raise _ShapeMismatch(
                f"token statistics for {found[0].freq.shape[0]} rows, embedding has {e0.shape[0]}"
            )
        deltas = [e.tensor.double() - e0.double() for e in group.non_base]
        update = qp.rowwise_update(
            deltas, [s.freq.to(e0.device, torch.float64) for s in found], weights, float(params["ridge"])
        )
        return (e0.double() + update.to(e0.device).double()).to(e0.dtype)

    # -- fallback and diagnostics ---------------------------------------------------------
    def _fallback(self, group, weights, params, reason: str) -> torch.Tensor:
        name = group.metadata.name
        method = params["fallback"]
        with self._lock:
            self.records.append(report.fallback_record(name, f"{reason}; merged with {method}"))
        LOG.warning("output_qp: %s falls back to %s (%s)", name, method, reason)
        base = group.base.tensor
        if method == "base" or not base.is_floating_point():
            return base
        deltas = [e.tensor.double() - base.double() for e in group.non_base]
        total = sum(w * d for w, d in zip(weights, deltas))
        if method == "linear":
            total = total / sum(weights)
        return (base.double() + total).to(base.dtype)

    def _record(self, name, update, deltas, grams, weights) -> None:
        record = report.tensor_record(name, qp.objective(update, deltas, grams, weights), weights)
        with self._lock:
            self.records.append(record)

    def write_report(self, out_path: str) -> None:
        """merge_report.json / .md of the merge that just finished, into its output folder."""
        with self._lock:
            settings, self.report_settings = self.report_settings, None
            records, tasks = list(self.records), list(self.tasks)
        if settings is not None:
            report.write_report(out_path, report.build_report(records, tasks, settings))


class _ShapeMismatch(Exception):
    """Statistics exist but do not fit this tensor: fall back rather than guess."""


def partner_tensors(group: TensorGroup, name: str) -> Optional[TensorGroup]:
    """Another tensor of the same module (a linear layer's bias for its weight, and so on)
    from every model of the group, read through mergekit's own loaders; None if the base
    model has no such tensor."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge_methods.base import TensorEntry

    entries = []
    # The base decides whether the module has this tensor at all, so look at it first.
    for entry in sorted(group.entries, key=lambda e: not e.is_base):
        loader = LoaderCache().get(entry.id)
        names = loader.index.tensor_paths
        # Checkpoints may carry a model prefix that the output name lacks (bert.…).
        key = name if name in names else next((k for k in sorted(names, key=len) if k.endswith("." + name)), None)
        if key is None:
            if entry.is_base:
                return None
            raise _ShapeMismatch(f"{entry.id} has no {name} while the base model has one")
        tensor = loader.get_tensor(key, device=str(group.base.tensor.device))
        entries.append(TensorEntry(id=entry.id, tensor=tensor, is_base=entry.is_base))
    return TensorGroup(entries=tuple(entries))


def _params_key(params: Dict[str, Any]) -> Tuple:
    return tuple(
        (k, tuple(sorted((str(i), v) for i, v in params[k].items())) if hasattr(params[k], "items") else params[k])
        for k in sorted(params)
    )


# -- configuration checks that mergekit does not make --------------------------------------


def check_config(config) -> None:
    """Reject unknown parameter names and bad values of our methods before any work is done.

    mergekit silently ignores parameters a method does not declare (and shared parameters
    written under a model), so a misspelt or misplaced `ridge` would merge with the default:
    for our methods that is an error naming the place.
    """
    if config.merge_method != METHOD_NAME:
        return
    shared_places: List[Tuple[str, Optional[Dict[str, Any]]]] = [("parameters", config.parameters)]
    expert_places: List[Tuple[str, Optional[Dict[str, Any]]]] = []

    def add_models(prefix, models):
        for i, model in enumerate(models or []):
            expert_places.append((f"{prefix}models[{i}] ({model.model}) parameters", model.parameters))

    def add_slices(prefix, slices):
        for i, out_slice in enumerate(slices or []):
            shared_places.append((f"{prefix}slices[{i}] parameters", out_slice.parameters))
            for j, source in enumerate(out_slice.sources):
                expert_places.append((f"{prefix}slices[{i}].sources[{j}] ({source.model}) parameters", source.parameters))

    add_models("", config.models)
    add_slices("", config.slices)
    for name, module in (config.modules or {}).items():
        shared_places.append((f"modules.{name} parameters", module.parameters))
        add_models(f"modules.{name}.", module.models)
        add_slices(f"modules.{name}.", module.slices)

    for where, settings in shared_places + expert_places:
        per_expert_place = (where, settings) in expert_places
        for key, value in (settings or {}).items():
            if key not in PARAMETER_NAMES:
                close = difflib.get_close_matches(key, PARAMETER_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"output_qp: unknown parameter {key!r} in {where}{hint} "
                    f"Valid parameters: {', '.join(PARAMETER_NAMES)}"
                )
            if per_expert_place and key not in _PER_EXPERT:
                raise ValueError(
                    f"output_qp: {key!r} in {where} is a shared parameter, which mergekit would ignore "
                    f"there: set it in the top-level parameters. Per-model parameters: {', '.join(sorted(_PER_EXPERT))}"
                )
            plain = isinstance(value, (bool, int, float, str)) or value is None
            if key in CALIBRATION_SETTINGS and (where != "parameters" or not plain):
                raise ValueError(
                    f"output_qp: {key!r} in {where} must be a plain value in the top-level parameters "
                    "(one forward pass per expert serves the whole merge)"
                )
            if key == "calibration" and not plain:
                raise ValueError(f"output_qp: calibration in {where} must be a path or dataset name, not {value!r}")
        scalars = {}
        for spec in PARAMETERS:
            value = (settings or {}).get(spec.name)
            if isinstance(value, (bool, int, float, str)) or (value is None and spec.name in (settings or {})):
                try:
                    scalars[spec.name] = spec.validate(value)
                except Exception as error:
                    raise ValueError(f"output_qp: bad value for {spec.name!r} in {where}: {error}") from None
        validate_values(scalars, where)


def check_slices(config) -> None:
    """output_qp needs each output layer to come from the same layer index in every input:
    statistics are gathered per layer of each expert, and a shifted or mixed slice would pair
    a weight with another layer's inputs."""
    if config.merge_method != METHOD_NAME:
        return
    for module_name, module in (config.modules or {}).items():
        position = 0
        for i, out_slice in enumerate(module.slices or []):
            for source in out_slice.sources:
                start, end = source.layer_range
                if start != position:
                    raise ValueError(
                        f"output_qp: slices do not line up in module {module_name!r}: slice {i} takes "
                        f"layers {start}..{end} of {source.model} for output layers starting at {position}; "
                        "every source must supply the same layer indices as the output layers it fills"
                    )
            position += out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]


def precompute_statistics(planner) -> None:
    """Gather every expert's statistics while planning, before any tensor is merged, so that
    bad calibration input fails at once and the merge itself only reads the cache."""
    config = planner.config
    if config.merge_method != METHOD_NAME:
        return
    from .calibrate import CalibrationSettings, expert_statistics, forget_requests

    forget_requests()  # models or data may have changed since an earlier merge in this process

    top = config.parameters or {}
    shared = {}
    for spec in PARAMETERS:
        value = top.get(spec.name, spec.default)
        shared[spec.name] = spec.validate(value) if isinstance(value, (bool, int, float, str)) or value is None else spec.default
    METHOD.reset(vocabulary_permuted=config.tokenizer is not None or config.tokenizer_source is not None,
                 report_settings={k: v for k, v in shared.items() if k != "cache_dir"})
    settings = CalibrationSettings.from_params(shared)
    device = torch.device(planner.options.device or "cpu")
    for module in config.modules.values():
        for out_slice in module.slices:
            base = out_slice.base_model or config.base_model
            for source in out_slice.sources:
                if source.model == base:
                    continue
                scopes = (source.parameters, out_slice.parameters, module.parameters, config.parameters)
                calibration = next((s["calibration"] for s in scopes if s and "calibration" in s), None)
                if calibration is None or isinstance(calibration, str):
                    expert_statistics(source.model, base, calibration, settings, device,
                                      trust_remote_code=planner.options.trust_remote_code)


_patch_lock = threading.Lock()
_patched = False


def patch_mergekit() -> None:
    """Install the planner patches (idempotent). They touch mergekit's private planner API, so
    its shape is checked first: a mergekit whose planner differs is refused with a clear error
    rather than patched blindly."""
    global _patched
    from mergekit.plan import MergePlanner

    with _patch_lock:
        if _patched:
            return
        check_planner_api(MergePlanner)
        original_normalize = MergePlanner.normalize_config
        original_plan_tensor = MergePlanner.plan_tensor

        def normalize_config(self):
            check_config(self.config)
            original_normalize(self)
            check_slices(self.config)
            precompute_statistics(self)

        def plan_tensor(self, weight, weights_in, models, cfg_reader):
            # mergekit 0.1.5 computes `[w.name] + (w.aliases or [])` for optional weights, and
            # aliases is a tuple: every BERT-family merge crashes on embeddings.position_ids.
            weights_in = [_concat_safe(w) for w in weights_in]
            return original_plan_tensor(self, weight, weights_in, models, cfg_reader)

        MergePlanner.normalize_config = normalize_config
        MergePlanner.plan_tensor = plan_tensor
        _patch_outputs()
        _patched = True


def _patch_outputs() -> None:
    """The report is written when mergekit finalises the output (the last task of the graph),
    and the model card points to it."""
    import mergekit.merge
    from mergekit.io.tasks import FinalizeModel

    original_finalize = FinalizeModel.execute
    original_card = mergekit.merge.generate_card

    def execute(self, writer, **kwargs):
        result = original_finalize(self, writer, **kwargs)
        METHOD.write_report(self.writer_task.out_path)
        return result

    def generate_card(config, config_yaml, name=None):
        card = original_card(config, config_yaml, name)
        if config.merge_method == METHOD_NAME:
            card += (
                "\n\n## Residual energy captured\n\nThis model was merged with output_qp (mergekit-qp). "
                "`merge_report.md` (and `merge_report.json`) list, per layer, task and tensor, the share of "
                "the experts' output change on the calibration data that the merge keeps.\n"
            )
        return card

    FinalizeModel.execute = execute
    mergekit.merge.generate_card = generate_card


def check_planner_api(planner_class) -> None:
    """The private planner API the patches rely on, as in mergekit 0.1.5."""
    import mergekit

    import mergekit.merge
    from mergekit.io.tasks import FinalizeModel

    expected = {
        (planner_class, "normalize_config"): ["self"],
        (planner_class, "plan_tensor"): ["self", "weight", "weights_in", "models", "cfg_reader"],
        (FinalizeModel, "execute"): ["self", "writer", "kwargs"],
        (mergekit.merge, "generate_card"): ["config", "config_yaml", "name"],
    }
    for (owner, name), params in expected.items():
        method = getattr(owner, name, None)
        if method is None or list(inspect.signature(method).parameters) != params:
            version = getattr(mergekit, "__version__", None) or _distribution_version()
            raise RuntimeError(
                f"mergekit {version}: {getattr(owner, '__name__', owner)}.{name} is not what mergekit-qp {_package_version()} "
                "expects (written for mergekit 0.1.5); output_qp is disabled. Upgrade mergekit-qp."
            )


def _package_version() -> str:
    from . import __version__

    return __version__


class _ConcatTuple(tuple):
    """A tuple that `list + tuple` accepts, for mergekit 0.1.5's alias concatenation."""

    def __radd__(self, other):
        return list(other) + list(self)


def _concat_safe(weight):
    if isinstance(weight.aliases, tuple) and not isinstance(weight.aliases, _ConcatTuple):
        # model_copy does not re-validate, so the subclass survives (and hashes like a tuple).
        return weight.model_copy(update={"aliases": _ConcatTuple(weight.aliases)})
    return weight


def _distribution_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return None


_registered = False


def register_method() -> None:
    """Add `output_qp` to mergekit's registry (idempotent)."""
    global _registered
    from mergekit.merge_methods import registry

    with _patch_lock:
        if not _registered and METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
            registry.register(METHOD)
        _registered = True


def unregister_method() -> None:
    """Take `output_qp` out again (when mergekit's planner cannot be patched safely)."""
    global _registered
    from mergekit.merge_methods import registry

    with _patch_lock:
        registry._METHODS.pop(METHOD_NAME, None)  # mergekit has no public unregister
        _registered = False


def register() -> None:
    """Make `output_qp` available to mergekit and patch its planner (idempotent)."""
    register_method()
    try:
        patch_mergekit()
    except RuntimeError:
        unregister_method()
        raise


METHOD = OutputQPMerge()

# The start-up hook fires while this module is still importing mergekit (when user code
# imports mergekit_qp before mergekit); it then leaves its callback here to finish the job.
_callback = globals().pop("_register_when_loaded", None)
if _callback is not None:
    _callback()


def diagnose(config_path: str, merged_path: str, calibration_config: Optional[str] = None,
             device: str = "cpu") -> Dict[str, Any]:
    """The merge report (ρ per tensor, layer, task) of any merged checkpoint of a `models:`
    config, whatever its method: calibration data and settings come from the config's own
    `calibration` parameters or from an output_qp config of the same experts."""
    import yaml
    from mergekit.config import MergeConfiguration

    from .calibrate import CalibrationSettings, expert_statistics, local_model_path
    from .diagnostic import linear_diagnostic

    def load(path):
        with open(path, encoding="utf-8") as fp:
            return MergeConfiguration.model_validate(yaml.safe_load(fp))

    config = load(config_path)
    source = load(calibration_config) if calibration_config else config
    if not config.models or config.base_model is None:
        raise ValueError(f"diagnose: {config_path} needs `base_model:` and `models:` (slices are not supported)")
    calibration_of = {str(m.model): (m.parameters or {}).get("calibration") for m in source.models or []}
    # Task weights ω of the objective: those of the output_qp config when there is one, so that
    # every method is measured on the objective output_qp optimises.
    weight_of = {str(m.model): float((m.parameters or {}).get("weight", 1.0)) if source.merge_method == METHOD_NAME
                 else 1.0 for m in source.models or []}
    top = source.parameters or {}
    shared = {p.name: p.validate(top.get(p.name, p.default)) for p in PARAMETERS if p.name in CALIBRATION_SETTINGS}
    settings = CalibrationSettings.from_params(shared)
    experts = [m for m in config.models if m.model != config.base_model]
    stats, weights = [], []
    for m in experts:
        calibration = calibration_of.get(str(m.model)) or top.get("calibration")
        if not isinstance(calibration, str):
            where = calibration_config or config_path
            raise ValueError(f"diagnose: no calibration for {m.model} in {where}: give it a `calibration:` parameter "
                             "or pass --calibration-config with the output_qp config of the same experts")
        stats.append(expert_statistics(m.model, config.base_model, calibration, settings, torch.device(device)))
        weights.append(weight_of.get(str(m.model), 1.0))
    names = [str(m.model) for m in experts]
    result = linear_diagnostic(local_model_path(config.base_model), [local_model_path(m.model) for m in experts],
                               stats, merged_path, weights)
    records = [
        {"name": t["name"], "rho": t["rho"], "fallback": None,
         "rho_by_task": [qp.energy_captured(j, e) for j, e in zip(t["objective_per_task"], t["energy_per_task"])],
         "objective_by_task": t["objective_per_task"], "energy_by_task": t["energy_per_task"]}
        for t in result.tensors
    ]
    return report.build_report(records, names, {"merge_method": config.merge_method, "merged": merged_path,
                                                **{k: v for k, v in shared.items() if k != "cache_dir"}})
