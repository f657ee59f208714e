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
import os
import re
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mergekit.graph import Task
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import ConfigDict

from . import qp, report, svc
from .diagnostic import augmented_gram
from .statistics import EmbeddingStats, LinearStats, NormStats

LOG = logging.getLogger("mergekit_qp")

METHOD_NAME = "output_qp"
# (expert, module) → statistics of one layer in sequential mode, set by the layer's graph task
# around the merge calls it makes; unset (None) in independent mode.
LAYER_STATISTICS: ContextVar[Optional[Dict[Tuple[str, str], Any]]] = ContextVar("output_qp_layer_statistics",
                                                                                 default=None)
FALLBACKS = ("linear", "task_arithmetic", "base")
TARGETS = ("merged_inputs", "expert_outputs")
# Settings of the forward passes: one value for the whole merge, so plain top-level scalars.
CALIBRATION_SETTINGS = ("calibration_field", "calibration_samples", "calibration_seq_len",
                        "calibration_seed", "cache_dir", "sequential", "target")


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
        shared("sequential", bool, False, "layer by layer: statistics on the inputs of the already-merged layers"),
        shared("target", str, "merged_inputs",
               "sequential: fit expert_outputs (the experts' own outputs) or merged_inputs (each expert on the merged inputs)"),
        shared("ridge", float, 1e-4, "Tikhonov weight relative to tr(G)/d, centred on the average update"),
        shared("nonneg", bool, False, "task basis: coefficients ≥ 0"),
        shared("sum_to_one", bool, False, "task basis: coefficients sum to one"),
        shared("fallback", str, "linear", "method for tensors without statistics: " + " | ".join(FALLBACKS)),
        shared("cache_dir", Optional[str], None, "statistics cache folder (default $MERGEKIT_QP_CACHE or ~/.cache/mergekit_qp)"),
        shared("svc", bool, False, "singular value calibration of each solved 2-D weight update (arXiv 2602.05536)"),
        shared("svc_alpha", Optional[float], None, "svc: floor α of the overlap divisor; default 1/K"),
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
    if params.get("target", TARGETS[0]) not in TARGETS:
        raise ValueError(f"output_qp: invalid target {params['target']!r}{at}; valid: {', '.join(TARGETS)}")
    if basis.kind != "task" and (params.get("nonneg") or params.get("sum_to_one")):
        raise ValueError(f"output_qp: nonneg / sum_to_one apply to basis: task only{at}")
    if "weight" in params and not (math.isfinite(params["weight"]) and params["weight"] > 0):
        raise ValueError(f"output_qp: weight must be finite and > 0{at}; got {params['weight']}")
    check_svc_alpha(METHOD_NAME, params.get("svc_alpha"), at)


def check_svc_alpha(method: str, alpha: Optional[float], at: str = "") -> None:
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{method}: svc_alpha must be finite and > 0{at}; got {alpha}")


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
        for entry in group.entries:
            if entry.tensor.is_floating_point() and not bool(torch.isfinite(entry.tensor).all()):
                raise ValueError(f"output_qp: tensor {name} of model {entry.id} contains NaN or Inf")
        self.tasks = [str(e.id) for e in experts]

        module, _, leaf = name.rpartition(".")
        layer_statistics = LAYER_STATISTICS.get()
        if layer_statistics is not None:
            # Sequential merging: the statistics of this layer on the merged model's inputs,
            # handed over by the graph task that merges the layer.
            found = [layer_statistics.get((str(e.id), module)) for e in experts]
        else:
            stats = statistics_for(base, experts, params, device=base.tensor.device)
            found = [s.lookup(module) for s in stats]
        kinds = {type(f) for f in found}
        if any(f is None for f in found) or len(kinds) != 1:
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

        # GPT-2's Conv1D stores W as in × out: solve on the transpose, return the stored layout.
        transposed = found[0].transposed
        stored = weight_group.base.tensor
        w0 = stored.double().T if transposed else stored.double()
        experts_w = [e.tensor.double().T if transposed else e.tensor.double() for e in weight_group.non_base]
        deltas = [w - w0 for w in experts_w]
        weight_deltas = deltas  # the experts' own updates of W (SVC measures overlap against them)
        device = stored.device
        grams = [s.gram.to(device, torch.float64) for s in found]
        d = w0.shape[1]
        if any(g.shape != (d, d) for g in grams):
            raise _ShapeMismatch(f"statistics of width {grams[0].shape[0]} for a weight of width {d}")
        if bias_group is not None:
            # Homogeneous coordinates: x → [x, 1] so the bias is solved jointly with W.
            b0 = bias_group.base.tensor.double()
            w0 = torch.cat([w0, b0[:, None]], 1)
            experts_w = [torch.cat([w, e.tensor.double()[:, None]], 1) for w, e in zip(experts_w, bias_group.non_base)]
            deltas = [w - w0 for w in experts_w]
            grams = [augmented_gram(g, s.mean.to(device, torch.float64)) for g, s in zip(grams, found)]

        unreachable = None
        if found[0].cross is not None:
            # Sequential merging, expert-output target: fit the experts' own outputs from the
            # merged model's inputs (design §3.1), through equivalent task vectors.
            deltas, unreachable = _expert_output_problem(w0, experts_w, deltas, grams, found, bias_group is not None)

        update = self._solve(deltas, grams, weights, params)
        if params["svc"]:
            update = update.clone()
            update[:, :d] = calibrated(update[:, :d], weight_deltas, params["svc_alpha"], stored.dtype)
        # One record per linear map (weight and bias solved together), under the weight's name.
        self._record(f"{module}.weight", update, deltas, grams, weights, unreachable)
        new_w = w0[:, :d] + update[:, :d]
        new_w = (new_w.T if transposed else new_w).to(stored.dtype)
        if bias_group is None:
            return new_w
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
        m2 = [s.m2.to(dev, torch.float64) for s in found]
        m1 = [s.m1.to(dev, torch.float64) for s in found]
        if found[0].cross is not None:
            scale_deltas, bias_deltas = _expert_output_norm(scale_group, bias_group, scale_deltas, bias_deltas,
                                                            found, m2, m1)
        scale, bias = qp.featurewise_affine_update(
            scale_deltas, bias_deltas, m2, m1, weights, float(params["ridge"]))
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
        if params["svc"] and spectral(group):
            total = calibrated(total, deltas, params["svc_alpha"], base.dtype)
        return (base.double() + total).to(base.dtype)

    def _record(self, name, update, deltas, grams, weights, unreachable=None) -> None:
        objective = qp.objective(update, deltas, grams, weights)
        if unreachable is not None:
            # Energy no weight of this layer can reach (drift of the inputs): counted in both
            # J and E, so that ρ is the share of the experts' true output change kept.
            per = tuple(j + u for j, u in zip(objective.per_task, unreachable))
            energy = tuple(e + u for e, u in zip(objective.energy_per_task, unreachable))
            objective = qp.Objective(per, energy, sum(w * j for w, j in zip(weights, per)),
                                     sum(w * e for w, e in zip(weights, energy)))
        record = report.tensor_record(name, objective, weights)
        with self._lock:
            self.records.append(record)

    def write_report(self, out_path: str) -> None:
        """merge_report.json / .md of the merge that just finished, into its output folder."""
        with self._lock:
            settings, self.report_settings = self.report_settings, None
            records, tasks = list(self.records), list(self.tasks)
        if settings is not None:
            report.write_report(out_path, report.build_report(records, tasks, settings))


def calibrated(update: torch.Tensor, deltas, alpha, model_dtype: torch.dtype) -> torch.Tensor:
    """`svc.calibrate` of a float64 output_qp update, worked in float32 (float64 for float64
    models) as `<method>_svc` does on the same model: the rule's presence floor is relative to
    the working precision, so the precision is part of the rule."""
    work = torch.float64 if model_dtype == torch.float64 else torch.float32
    return svc.calibrate(update.to(work), [d.to(work) for d in deltas], alpha).update.double()


def spectral(group: TensorGroup) -> bool:
    """Tensors singular value calibration applies to: floating 2-D weights that are not
    embeddings (mergekit marks token embeddings and output heads with a vocabulary axis)."""
    base = group.base.tensor if group.base is not None else group.entries[0].tensor
    return base.ndim == 2 and base.is_floating_point() and group.metadata.vocabulary_axis is None


# mergekit's task-vector methods that get a `<name>_svc` twin.
SVC_INNER = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
             "della", "della_linear")
SVC_ALPHA = ParameterSpec("svc_alpha", Optional[float], ParameterScope.SHARED, None,
                          "floor α of the overlap divisor; default 1/K (K experts)")


class SVCMerge(GroupMergeMethod):
    """`<inner>_svc`: mergekit's own method, then singular value calibration of its update.

    Accepts exactly the inner method's parameters (the same ParameterSpec objects, so mergekit
    validates them as it does the inner method's) plus `svc_alpha`."""

    def __init__(self, inner: GroupMergeMethod):
        self.inner = inner
        spec = inner.spec
        self.spec = MergeMethodSpec(
            name=f"{spec.name}_svc",
            parameters=(*spec.parameters, SVC_ALPHA),
            contract=spec.contract,
            pretty_name=f"{spec.pretty_name or spec.name} + singular value calibration",
            reference_url="https://arxiv.org/abs/2602.05536",
            optional_tensor_policy=spec.optional_tensor_policy,
            uses_accelerator=spec.uses_accelerator,
        )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        alpha = params.pop("svc_alpha")
        check_svc_alpha(self.spec.name, alpha, f" (tensor {group.metadata.name})")
        merged = self.inner.merge_group(group, **params)
        if group.base is None or not group.non_base or not spectral(group):
            return merged
        base = group.base.tensor
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        deltas = [e.tensor.to(work) - base.to(work) for e in group.non_base]
        try:
            update = svc.calibrate(merged.to(work) - base.to(work), deltas, alpha).update
        except ValueError as error:
            raise ValueError(f"{self.spec.name}: tensor {group.metadata.name}: {error}") from None
        return (base.to(work) + update).to(base.dtype)


def svc_methods() -> List[SVCMerge]:
    from mergekit.merge_methods import registry

    return [SVCMerge(registry.get(name)) for name in SVC_INNER]


def _expert_output_problem(w0, experts_w, deltas, grams, found, with_bias: bool):
    """Equivalent task vectors for the expert-output target (qp.drift_corrected_task_vector)
    and, per task, the output energy that no update of this weight can reach."""
    device = w0.device
    new_deltas, unreachable = [], []
    for wk, dk, gk, s in zip(experts_w, deltas, grams, found):
        ck = s.cross.to(device, torch.float64)
        ek = s.expert_gram.to(device, torch.float64)
        if with_bias:
            mean, expert_mean = s.mean.to(device, torch.float64), s.expert_mean.to(device, torch.float64)
            ck = torch.cat([torch.cat([ck, expert_mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]], 0)
            ek = augmented_gram(ek, expert_mean)
        if ck.shape != gk.shape:
            raise _ShapeMismatch(f"cross statistics of shape {tuple(ck.shape)} for a Gram of shape {tuple(gk.shape)}")
        corrected = qp.drift_corrected_task_vector(dk, wk, ck, gk)
        # ‖Xk Wkᵀ − X̂ W0ᵀ‖²/n, and the part of it the equivalent problem sees.
        true_energy = float(((wk @ ek) * wk).sum() - 2 * ((wk @ ck) * w0).sum() + ((w0 @ gk) * w0).sum())
        seen = float(((corrected @ gk) * corrected).sum())
        new_deltas.append(corrected)
        unreachable.append(max(0.0, true_energy - seen))
    return new_deltas, unreachable


def _expert_output_norm(scale_group, bias_group, scale_deltas, bias_deltas, found, m2, m1):
    """The expert-output target for a norm layer: per feature, the same correction as for a
    linear map on [x̃, 1] (a 1×1 or 2×2 system per feature)."""
    out_scale, out_bias = [], []
    for k, (e, s) in enumerate(zip(scale_group.non_base, found)):
        dev = m2[k].device
        cross = s.cross.to(dev, torch.float64)
        gamma = e.tensor.double()
        if bias_group is None:
            v = scale_deltas[k][:, None, None]
            w = gamma[:, None, None]
            c = cross[:, None, None]
            g = m2[k][:, None, None]
        else:
            beta = bias_group.non_base[k].tensor.double()
            expert_m1 = s.expert_m1.to(dev, torch.float64)
            one = torch.ones_like(gamma)
            v = torch.stack([scale_deltas[k], bias_deltas[k]], -1)[:, None, :]
            w = torch.stack([gamma, beta], -1)[:, None, :]
            c = torch.stack([torch.stack([cross, expert_m1], -1), torch.stack([m1[k], one], -1)], -2)
            g = torch.stack([torch.stack([m2[k], m1[k]], -1), torch.stack([m1[k], one], -1)], -2)
        corrected = qp.drift_corrected_task_vector(v, w, c, g)[:, 0, :]
        out_scale.append(corrected[:, 0])
        if bias_group is not None:
            out_bias.append(corrected[:, 1])
    return out_scale, (out_bias if bias_group is not None else None)


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


def _parameter_places(config) -> Tuple[List[Tuple[str, Optional[Dict[str, Any]]]], List[Tuple[str, Optional[Dict[str, Any]]]]]:
    """Every place of a config that holds method parameters: (shared places, per-model places)."""
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
    return shared_places, expert_places


def _check_names(method: str, specs: Sequence[ParameterSpec], where: str, settings, per_model_place: bool) -> None:
    names = [p.name for p in specs]
    per_model = {p.name for p in specs if p.scope != ParameterScope.SHARED}
    for key in settings or {}:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{method}: unknown parameter {key!r} in {where}{hint} Valid parameters: {', '.join(names)}")
        if per_model_place and key not in per_model:
            raise ValueError(
                f"{method}: {key!r} in {where} is a shared parameter, which mergekit would ignore "
                f"there: set it in the top-level parameters. Per-model parameters: {', '.join(sorted(per_model))}"
            )


def check_svc_config(config) -> None:
    """`<method>_svc`: the inner method's parameter names plus svc_alpha, nothing else."""
    if not config.merge_method.endswith("_svc") or config.merge_method[:-4] not in SVC_INNER:
        return
    from mergekit.merge_methods import registry

    specs = registry.get(config.merge_method).spec.parameters
    shared_places, expert_places = _parameter_places(config)
    for where, settings in shared_places + expert_places:
        _check_names(config.merge_method, specs, where, settings, (where, settings) in expert_places)
        alpha = (settings or {}).get("svc_alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            check_svc_alpha(config.merge_method, float(alpha), f" ({where})")
        elif alpha is not None and "svc_alpha" in (settings or {}) and not isinstance(alpha, (dict, list)):
            raise ValueError(f"{config.merge_method}: svc_alpha in {where} must be a number; got {alpha!r}")


def check_config(config) -> None:
    """Reject unknown parameter names and bad values of our methods before any work is done.

    mergekit silently ignores parameters a method does not declare (and shared parameters
    written under a model), so a misspelt or misplaced `ridge` would merge with the default:
    for our methods that is an error naming the place.
    """
    check_svc_config(config)
    if config.merge_method != METHOD_NAME:
        return
    shared_places, expert_places = _parameter_places(config)
    for where, settings in shared_places + expert_places:
        per_expert_place = (where, settings) in expert_places
        _check_names(METHOD_NAME, PARAMETERS, where, settings, per_expert_place)
        for key, value in (settings or {}).items():
            plain = isinstance(value, (bool, int, float, str)) or value is None
            if key in CALIBRATION_SETTINGS and (where != "parameters" or not plain):
                raise ValueError(
                    f"output_qp: {key!r} in {where} must be a plain value in the top-level parameters "
                    "(one forward pass per expert serves the whole merge)"
                )
            if key == "target" and not (settings or {}).get("sequential"):
                raise ValueError(f"output_qp: target in {where} applies to sequential: true only "
                                 "(in independent mode each expert's own inputs are the merged model's)")
            if key == "svc_alpha" and not (settings or {}).get("svc"):
                raise ValueError(f"output_qp: svc_alpha in {where} applies to svc: true only")
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


def is_sequential(config) -> bool:
    return config.merge_method == METHOD_NAME and bool((config.parameters or {}).get("sequential"))


def check_sequential(planner) -> None:
    """Refuse what sequential merging cannot do before any forward pass is run."""
    if not is_sequential(planner.config):
        return
    from .layers import Backbone

    config = planner.config
    if config.tokenizer is not None or config.tokenizer_source is not None:
        raise ValueError("output_qp: sequential: true cannot be combined with a tokenizer merge "
                         "(tokenizer / tokenizer_source): calibration runs on the base model's token ids")
    if len(config.modules) != 1:
        raise ValueError(f"output_qp: sequential: true needs a single-module model; this one has modules "
                         f"{', '.join(config.modules)}")
    base = config.base_model
    Backbone(base.config(trust_remote_code=planner.options.trust_remote_code))  # raises for other architectures


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
    check_shapes(planner)
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


# Config fields that decide tensor shapes; an expert must agree with its base on every one.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "n_embd", "n_inner", "n_head", "vocab_size")
# Depth is not a shape: `slices:` may take layers from experts of other depths; only the layers
# a slice asks for must exist.
DEPTH_FIELDS = ("num_hidden_layers", "n_layer")


def check_depths(config, trust_remote_code: bool) -> None:
    """A `models:` config of output_qp takes every layer of every expert: one with another depth
    than the base is an error naming it (mergekit's own says only that the slice's inputs
    differ). `slices:` configs name their layer ranges; check_shapes checks those."""
    if config.merge_method != METHOD_NAME or not config.models or config.base_model is None:
        return

    def depth(model):
        found = model.config(trust_remote_code=trust_remote_code).to_dict()
        return next((found[f] for f in DEPTH_FIELDS if isinstance(found.get(f), int)), None)

    base_depth = depth(config.base_model)
    for m in config.models:
        if m.model != config.base_model and base_depth is not None and depth(m.model) not in (None, base_depth):
            raise ValueError(f"output_qp: model {m.model} has {depth(m.model)} layers but the base model "
                             f"{config.base_model} has {base_depth}: experts must be fine-tunes of the base")


def check_shapes(planner) -> None:
    """Every expert has the base model's shapes (and vocabulary, unless a tokenizer merge
    aligns it), checked from the configs before any forward pass: otherwise the statistics
    pass would run and mergekit would stop at the first mismatched tensor, mid-merge."""
    config = planner.config
    remote = planner.options.trust_remote_code
    tokenizer_merge = config.tokenizer is not None or config.tokenizer_source is not None
    for module in config.modules.values():
        for out_slice in module.slices:
            base = out_slice.base_model or config.base_model
            base_config = base.config(trust_remote_code=remote).to_dict()
            for source in out_slice.sources:
                if source.model == base:
                    continue
                expert_config = source.model.config(trust_remote_code=remote).to_dict()
                depth = next((expert_config[f] for f in DEPTH_FIELDS if isinstance(expert_config.get(f), int)), None)
                if depth is not None and source.layer_range is not None and source.layer_range[1] > depth:
                    raise ValueError(f"output_qp: the config takes layers {source.layer_range[0]}–"
                                     f"{source.layer_range[1] - 1} from model {source.model}, which has {depth} layers")
                for field in SHAPE_FIELDS:
                    if field == "vocab_size" and tokenizer_merge:
                        continue
                    if field in base_config and base_config.get(field) != expert_config.get(field):
                        raise ValueError(
                            f"output_qp: model {source.model} has {field} = {expert_config.get(field)!r} but the "
                            f"base model {base} has {base_config[field]!r}: experts must be fine-tunes of the base "
                            "with the same shapes" + ("" if field != "vocab_size" else
                                                     " (or set tokenizer_source / tokenizer to align vocabularies)")
                        )


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
        original_plan_layer = MergePlanner.plan_layer
        original_plan = MergePlanner._plan

        def normalize_config(self):
            check_config(self.config)
            check_depths(self.config, self.options.trust_remote_code)
            original_normalize(self)
            check_slices(self.config)
            check_sequential(self)
            precompute_statistics(self)

        def plan_layer(self, sources, layer_offset, t, cfg_reader, module_name):
            # Remember which planned tensors make up each output layer (sequential merging).
            before = len(self._tensors)
            original_plan_layer(self, sources, layer_offset, t, cfg_reader, module_name)
            self.__dict__.setdefault("_output_qp_layers", []).append(list(range(before, len(self._tensors))))

        def _plan(self):
            self._output_qp_layers = []
            original_plan(self)
            if is_sequential(self.config):
                plan_sequential(self, self._output_qp_layers)

        def plan_tensor(self, weight, weights_in, models, cfg_reader):
            # mergekit 0.1.5 computes `[w.name] + (w.aliases or [])` for optional weights, and
            # aliases is a tuple: every BERT-family merge crashes on embeddings.position_ids.
            weights_in = [_concat_safe(w) for w in weights_in]
            return original_plan_tensor(self, weight, weights_in, models, cfg_reader)

        MergePlanner.normalize_config = normalize_config
        MergePlanner.plan_tensor = plan_tensor
        MergePlanner.plan_layer = plan_layer
        MergePlanner._plan = _plan
        _patch_outputs()
        _patched = True


def _patch_outputs() -> None:
    """The report is written when mergekit finalises the output (the last task of the graph),
    and the model card points to it."""
    import mergekit.merge
    from mergekit.io.tasks import FinalizeModel, SaveTensor, TensorWriterTask

    original_finalize = FinalizeModel.execute
    original_open_writer = TensorWriterTask.execute
    original_save = SaveTensor.execute
    original_card = mergekit.merge.generate_card

    def execute(self, writer, **kwargs):
        with _naming_output_folder(self.writer_task.out_path):
            result = original_finalize(self, writer, **kwargs)
            METHOD.write_report(self.writer_task.out_path)
        return result

    def save(self, writer, tensor):
        # A full shard is written here: name the folder when that fails (a full disk).
        with _naming_output_folder(self.writer_task.out_path):
            return original_save(self, writer, tensor)

    def generate_card(config, config_yaml, name=None):
        card = original_card(config, config_yaml, name)
        if config.merge_method == METHOD_NAME:
            card += (
                "\n\n## Residual energy captured\n\nThis model was merged with output_qp (mergekit-qp). "
                "`merge_report.md` (and `merge_report.json`) list, per layer, task and tensor, the share of "
                "the experts' output change on the calibration data that the merge keeps.\n"
            )
        return card

    def open_writer(self, **_kwargs):
        # A merge into a folder that holds an earlier model overwrites its shards one by one; if
        # it then fails, the old config.json would make the mix load as a model. The merge graph
        # opens its writer here, once planning is done (so a config error leaves the old model
        # whole): drop the marker, which mergekit writes again once every tensor is saved.
        stale = os.path.join(self.out_path, "config.json")
        if os.path.isfile(stale):
            LOG.warning("mergekit-qp: %s held a model; its config.json is removed while the new merge writes "
                        "there and written again when the merge completes", self.out_path)
            os.remove(stale)
        return original_open_writer(self, **_kwargs)

    FinalizeModel.execute = execute
    SaveTensor.execute = save
    TensorWriterTask.execute = open_writer
    mergekit.merge.generate_card = generate_card


class OutputWriteError(RuntimeError):
    """Writing the merged model failed (disk full, file size limit, ...)."""


@contextmanager
def _naming_output_folder(out_path: str):
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        raise OutputWriteError(
            f"writing the merged model into {out_path} failed: {error}. The folder is incomplete (mergekit writes "
            "config.json only after every tensor): free space or choose another output folder and merge again"
        ) from error


def check_planner_api(planner_class) -> None:
    """The private planner API the patches rely on, as in mergekit 0.1.5."""
    import mergekit

    import mergekit.merge
    from mergekit.io.tasks import FinalizeModel, SaveTensor, TensorWriterTask

    expected = {
        (planner_class, "normalize_config"): ["self"],
        (planner_class, "plan_tensor"): ["self", "weight", "weights_in", "models", "cfg_reader"],
        (planner_class, "plan_layer"): ["self", "sources", "layer_offset", "t", "cfg_reader", "module_name"],
        (planner_class, "_plan"): ["self"],
        (FinalizeModel, "execute"): ["self", "writer", "kwargs"],
        (SaveTensor, "execute"): ["self", "writer", "tensor"],
        (TensorWriterTask, "execute"): ["self", "_kwargs"],
        (mergekit.merge, "generate_card"): ["config", "config_yaml", "name"],
    }
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    # Sequential merging reads these fields of mergekit's per-tensor merge task and calls it.
    needed = {"gather_tensors", "model_order", "base_model", "output_weight", "parameters", "input_parameters"}
    missing = needed - set(getattr(ExecuteMergeMethodTask, "model_fields", {}))
    # The output-folder guard reads the writer task's folder.
    missing |= {"TensorWriterTask.out_path"} - {f"TensorWriterTask.{f}" for f in getattr(TensorWriterTask, "model_fields", {})}
    if missing:
        raise RuntimeError(
            f"mergekit {getattr(mergekit, '__version__', None) or _distribution_version()}: ExecuteMergeMethodTask "
            f"or TensorWriterTask lacks {', '.join(sorted(missing))}, which mergekit-qp {_package_version()} expects (written for "
            "mergekit 0.1.5); output_qp is disabled. Upgrade mergekit-qp.")
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
    """Add `output_qp` and the `<method>_svc` twins to mergekit's registry (idempotent)."""
    global _registered
    from mergekit.merge_methods import registry

    with _patch_lock:
        if not _registered:
            present = {m.spec.name for m in registry.registered_methods()}
            for method in (METHOD, *svc_methods()):
                if method.spec.name not in present:
                    registry.register(method)
        _registered = True


def unregister_method() -> None:
    """Take our methods out again (when mergekit's planner cannot be patched safely)."""
    global _registered
    from mergekit.merge_methods import registry

    with _patch_lock:
        for name in (METHOD_NAME, *(f"{inner}_svc" for inner in SVC_INNER)):
            registry._METHODS.pop(name, None)  # mergekit has no public unregister
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


@dataclass
class CalibrationProblem:
    """What every diagnostic of one set of experts shares: their folders, statistics and task
    weights, and the output_qp settings they were taken from."""

    base_dir: str
    expert_dirs: List[str]
    names: List[str]
    statistics: List[Any]
    weights: List[float]
    settings: Dict[str, Any]  # output_qp's calibration settings (and ridge) of the source config


def calibration_problem(config_path: str, calibration_config: Optional[str] = None,
                        device: str = "cpu") -> CalibrationProblem:
    """The experts of a `models:` config with their calibration statistics (cached): calibration
    data and settings from the config's own `calibration` parameters or from an output_qp config
    of the same experts."""
    import yaml
    from mergekit.config import MergeConfiguration

    from .calibrate import CalibrationSettings, expert_statistics, local_model_path

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
    # The ridge of the spectrum: output_qp's own when the source is an output_qp config.
    ridge_spec = next(p for p in PARAMETERS if p.name == "ridge")
    ridge = ridge_spec.validate(top.get("ridge", ridge_spec.default)) if source.merge_method == METHOD_NAME \
        else ridge_spec.default
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
    return CalibrationProblem(
        base_dir=local_model_path(config.base_model),
        expert_dirs=[local_model_path(m.model) for m in experts],
        names=[str(m.model) for m in experts],
        statistics=stats,
        weights=weights,
        settings={"merge_method": config.merge_method, **{k: v for k, v in shared.items() if k != "cache_dir"},
                  "ridge": ridge},
    )


def diagnose(config_path: str, merged_path: str, calibration_config: Optional[str] = None,
             device: str = "cpu", problem: Optional[CalibrationProblem] = None) -> Dict[str, Any]:
    """The merge report (ρ per tensor, layer, task) of any merged checkpoint of a `models:`
    config, whatever its method: calibration data and settings come from the config's own
    `calibration` parameters or from an output_qp config of the same experts (or from
    `problem`, when the caller has them already)."""
    from .diagnostic import linear_diagnostic

    problem = problem or calibration_problem(config_path, calibration_config, device)
    result = linear_diagnostic(problem.base_dir, problem.expert_dirs, problem.statistics, merged_path,
                               problem.weights)
    records = [
        {"name": t["name"], "rho": t["rho"], "fallback": None,
         "rho_by_task": [qp.energy_captured(j, e) for j, e in zip(t["objective_per_task"], t["energy_per_task"])],
         "objective_by_task": t["objective_per_task"], "energy_by_task": t["energy_per_task"]}
        for t in result.tensors
    ]
    settings = {k: v for k, v in problem.settings.items() if k != "ridge"}
    return report.build_report(records, problem.names, {**settings, "merged": merged_path})


def spectrum(problem: CalibrationProblem, ridge: Optional[float] = None) -> Dict[str, Any]:
    """Energy captured against rank (spectrum.build_spectrum) of the experts of `problem`, with
    output_qp's ridge of the source config unless `ridge` is given."""
    from . import spectrum as spectrum_module
    from .diagnostic import linear_spectra

    ridge = problem.settings["ridge"] if ridge is None else float(ridge)
    tensors = linear_spectra(problem.base_dir, problem.expert_dirs, problem.statistics, problem.weights, ridge)
    return spectrum_module.build_spectrum(tensors, problem.names, {"ridge": ridge, "basis": "rank-N of the full basis"})


# -- sequential merging: the calibration chain inside mergekit's task graph ---------------------
# Per layer L, one `SequentialStep` task takes the chain state (the calibration hidden states
# of every task, on the merged model and, for the expert-output target, on each expert),
# gathers the layer's raw tensors, computes statistics stage by stage (q/k/v, then o_proj
# with q/k/v merged, ...), calls the layer's own mergekit merge tasks with those statistics
# in a context variable, and runs the merged layer to produce the next state. A
# `SequentialTensor` per weight hands the merged tensor to mergekit's writer.
# Chain tasks hash and compare by key: by value, every hash would walk the whole chain.
# Labels sort as seq.<layer>.<phase>, so the scheduler (which orders ready tasks by label)
# saves layer L, then loads layer L+1, then merges it; loads are gated behind the previous
# step, so raw tensors of later layers are not read early and memory stays at about a layer.

@dataclass
class SequentialSetup:
    """What every step of one sequential merge shares (not part of any hash)."""

    backbone: Any  # layers.Backbone of the base model
    base: Any  # ModelReference
    experts: Tuple[Any, ...]  # ModelReference, in the merge tasks' order
    calibration: Tuple[str, ...]
    settings: Any  # calibrate.CalibrationSettings
    target: str
    device: str
    trust_remote_code: bool
    layer_names: Dict[int, Dict[str, str]]  # layer → {canonical tensor name: name inside the layer}


@dataclass
class ChainState:
    merged: List[List[Any]]  # per task: layers.Batch list, the merged model's hidden states
    expert: Optional[List[List[Any]]]  # per task: the expert's own (expert-output target only)


@dataclass
class StepResult:
    tensors: Dict[str, Optional[torch.Tensor]]
    state: ChainState


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
        return {k: GatedLoad(load=v, gate=self.gate, label=self.label) for k, v in self.inner.arguments().items()}

    def execute(self, **kwargs):
        return self.inner.execute(**kwargs)

    def group_label(self) -> Optional[str]:
        return self.label


class SequentialStart(_KeyedTask):
    """The first layer's inputs: the calibration tokens through the merged embeddings (and,
    for the expert-output target, through each expert's own)."""

    setup: Any  # SequentialSetup (compared by the task's key, never validated or hashed)
    merged: Tuple[Task, ...]  # merge tasks of the tensors before the first layer
    names: Tuple[str, ...]

    def arguments(self):
        args = {f"m{i}": t for i, t in enumerate(self.merged)}
        if self.setup.target == "expert_outputs":
            args.update({f"r{i}": t.gather_tensors for i, t in enumerate(self.merged)})
        return args

    def group_label(self) -> Optional[str]:
        return _label(0, 0)

    def execute(self, **kwargs) -> StepResult:
        from . import layers

        setup = self.setup
        device = torch.device(setup.device)
        tokens = _calibration_batches(setup)
        merged_weights = {n: kwargs[f"m{i}"] for i, n in enumerate(self.names) if kwargs[f"m{i}"] is not None}
        merged = [layers.embed(setup.backbone, merged_weights, batches, device) for batches in tokens]
        expert = None
        if setup.target == "expert_outputs":
            expert = []
            for k, batches in enumerate(tokens):
                own = {n: kwargs[f"r{i}"][setup.experts[k]] for i, n in enumerate(self.names)
                       if setup.experts[k] in (kwargs[f"r{i}"] or {})}
                expert.append(layers.embed(setup.backbone, own, batches, device))
        return StepResult(tensors={}, state=ChainState(merged=merged, expert=expert))


def _calibration_batches(setup: SequentialSetup):
    """Per expert, its calibration sequences as right-padded (input_ids, mask) batches: the
    same tokens the independent statistics use."""
    from .calibrate import load_tokenizer, local_model_path
    from .calibration import CalibrationSource, batches, load_records, tokenize_calibration

    base_dir = local_model_path(setup.base)
    tokenizer = load_tokenizer(base_dir, setup.trust_remote_code)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    out = []
    for path in setup.calibration:
        source = CalibrationSource(path=str(path), field=setup.settings.field)
        sequences = tokenize_calibration(load_records(source), tokenizer, samples=setup.settings.samples,
                                         seq_len=setup.settings.seq_len, seed=setup.settings.seed,
                                         source_name=source.path)
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
        args.update({f"g{i}": GatedGather(inner=t.gather_tensors, gate=self.previous, label=label)
                     for i, t in enumerate(self.merges)})
        return args

    def group_label(self) -> Optional[str]:
        return _label(self.index, 2)

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, previous: StepResult, **gathered) -> StepResult:
        from . import layers

        setup, index = self.setup, self.index
        device = torch.device(setup.device)
        local = setup.layer_names[index]
        raw = {t.output_weight.name: gathered[f"g{i}"] for i, t in enumerate(self.merges)}
        base_weights = {local[n]: v[setup.base] for n, v in raw.items() if setup.base in v}
        state = previous.state
        structure = setup.backbone.layer(index, base_weights, device)
        stage_list = layers.stages(structure, index, state.merged[0][0])
        del structure

        expert_rows = None
        next_expert = None
        if state.expert is not None:
            expert_rows, next_expert = [], []
            for k, expert in enumerate(setup.experts):
                own = setup.backbone.layer(index, {local[n]: v[expert] for n, v in raw.items() if expert in v}, device)
                rows, outputs = layers.all_module_inputs(own, index, state.expert[k], [s[0] for s in stage_list])
                expert_rows.append((own, rows))
                next_expert.append(outputs)

        prefix = _layer_prefix(local)
        by_module: Dict[str, List[Task]] = {}
        for t in self.merges:
            by_module.setdefault(local[t.output_weight.name].rpartition(".")[0], []).append(t)
        merged_local: Dict[str, torch.Tensor] = {}
        merged: Dict[str, Optional[torch.Tensor]] = {}
        for stage in stage_list:
            layer = setup.backbone.layer(index, {**base_weights, **merged_local}, device)
            found = {}
            for k, expert in enumerate(setup.experts):
                rows = layers.stage_inputs(layer, index, stage[0], state.merged[k])
                other = None if expert_rows is None else expert_rows[k]
                stats = _stage_statistics(layer, stage[0], rows, other)
                for module in stage:
                    found[(str(expert), prefix + module)] = stats
            del layer
            token = LAYER_STATISTICS.set(found)
            try:
                for module in stage:
                    for t in by_module.pop(module, []):
                        result = t.execute(tensors=raw[t.output_weight.name])
                        merged[t.output_weight.name] = result
                        if result is not None:
                            merged_local[local[t.output_weight.name]] = result
            finally:
                LAYER_STATISTICS.reset(token)
        token = LAYER_STATISTICS.set({})  # tensors of no hooked module: the configured fallback
        try:
            for tasks in by_module.values():
                for t in tasks:
                    merged[t.output_weight.name] = t.execute(tensors=raw[t.output_weight.name])
                    if merged[t.output_weight.name] is not None:
                        merged_local[local[t.output_weight.name]] = merged[t.output_weight.name]
        finally:
            LAYER_STATISTICS.reset(token)
        layer = setup.backbone.layer(index, {**base_weights, **merged_local}, device)
        next_merged = [layers.run_layer(layer, index, batches) for batches in state.merged]
        return StepResult(tensors=merged, state=ChainState(merged=next_merged, expert=next_expert))


def _layer_prefix(local: Dict[str, str]) -> str:
    name, inside = next(iter(local.items()))
    return name[: len(name) - len(inside)]


def _moments(rows_list, other_list=None):
    """Σ aᵀb / n over batches (a = other rows if given, b = rows). Products in float64: the
    expert-output target inverts per-task Grams, whose near-null directions float32 sums
    fill with noise."""
    total, count = None, 0
    for i, rows in enumerate(rows_list):
        left = rows if other_list is None else other_list[i]
        g = left.double().T @ rows.double()
        total = g if total is None else total + g
        count += rows.shape[0]
    return total / max(count, 1)


def _mean(rows_list):
    return sum(r.double().sum(0) for r in rows_list) / max(sum(r.shape[0] for r in rows_list), 1)


def _stage_statistics(layer, module_name: str, rows, expert):
    """Statistics of one stage's shared input for one task (merged-model rows; the expert's
    own rows at the same tokens for the expert-output target)."""
    from . import layers

    module = layer.get_submodule(module_name)
    expert_rows = None
    if expert is not None:
        own_layer, own_rows = expert
        expert_rows = own_rows[module_name]
    if layers.is_linear(module):
        transposed = layers.is_conv1d(module)
        if expert_rows is None:
            return LinearStats(gram=_moments(rows), mean=_mean(rows), transposed=transposed)
        return LinearStats(gram=_moments(rows), mean=_mean(rows), cross=_moments(rows, expert_rows),
                           expert_mean=_mean(expert_rows), expert_gram=_moments(expert_rows), transposed=transposed)
    normed = [layers.normalised(layer, module_name, r) for r in rows]
    m2 = _mean([r * r for r in normed])
    m1 = _mean(normed)
    if expert_rows is None:
        return NormStats(m2=m2, m1=m1)
    own = [layers.normalised(own_layer, module_name, r) for r in expert_rows]
    return NormStats(m2=m2, m1=m1, cross=_mean([a * b for a, b in zip(own, normed)]), expert_m1=_mean(own))


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


def plan_sequential(planner, layer_entries: List[List[int]]) -> None:
    """Rewrite the planned tensors of an output_qp merge with `sequential: true` into the
    chain above (called after mergekit has planned every tensor)."""
    import uuid

    from .calibrate import CalibrationSettings
    from .layers import Backbone, layer_local_name

    config = planner.config
    if len(config.modules) != 1:
        raise ValueError("output_qp: sequential: true needs a single-module model (this one has "
                         f"modules {', '.join(config.modules)})")
    tensors = planner._tensors
    in_layers = {i for entries in layer_entries for i in entries}
    first_layer = min(in_layers) if in_layers else len(tensors)
    pre = [i for i in range(first_layer) if i not in in_layers]
    merge0 = tensors[layer_entries[0][0]][1] if layer_entries and layer_entries[0] else None
    if merge0 is None:
        raise ValueError("output_qp: sequential: true found no layers to merge")
    base = merge0.base_model
    experts = tuple(m for m in merge0.model_order if m != base)
    params = dict(merge0.parameters.items())
    calibration = []
    for m in experts:
        value = merge0.input_parameters[m]["calibration"]
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
        layer_names=layer_names)
    run = uuid.uuid4().hex
    previous: Task = SequentialStart(key=f"{run}/start", setup=setup,
                                     merged=tuple(tensors[i][1] for i in pre),
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
    planner._tensors = [replaced.get(i, entry) for i, entry in enumerate(tensors)]
