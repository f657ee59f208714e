"""`output_qp` as a mergekit merge method: a thin adapter from one tensor group to the problems
of core/problems.py. Statistics and the per-merge state arrive as the `merge_state` argument
(plugin/merge_state.py); anything without statistics falls back to a configured simple method,
visibly."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec, TensorGroup, \
    TensorEntry

from ..core import problems
from ..core.objective import layer_of
from ..core.problems import ProblemMismatch
from ..core.statistics import EmbeddingStats, LinearStats, NormStats
from ..reports.merge_report import fallback_record, tensor_record
from . import compat
from .merge_state import MergeState
from .parameters import MERGE_STATE, METHOD_NAME, PARAMETERS, PER_EXPERT, solve_settings, validate_values
from .svc_methods import spectral

LOG = logging.getLogger("mergekit_qp")
# One message (no tensor name) so that Python's warning filter shows it once per call site.
ISOTROPIC_WARNING = (
    "output_qp called through mergekit's Python API (merge_tensors / merge_state_dicts) without "
    "calibration data for any input: with no statistics every input Gram is taken as the identity, "
    "whose QP optimum is the weighted average of the inputs. For the calibrated solution pass "
    "parameters={'calibration': {input_id: data}} (or 'statistics': artifacts) with each input identified "
    "by its model folder, or "
    "merge through a configuration (mergekit-yaml, run_merge).")


class OutputQPMerge(GroupMergeMethod):
    """Merging as the convex QP of docs/method.md, one tensor group at a time."""

    def __init__(self):
        self.spec = MergeMethodSpec(
            name=METHOD_NAME,
            parameters=PARAMETERS,
            contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2, min_non_base=1),
            pretty_name="Output-space QP",
            reference_url="https://arxiv.org/abs/2605.29101",
        )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        # A merge planned by mergekit hands its state over; a direct call (mergekit's Python
        # API on one group) gets a state of its own, without a report.
        planned: Optional[MergeState] = params.pop(MERGE_STATE, None)
        state = planned or MergeState()
        name = group.metadata.name or ""
        validate_values({k: v for k, v in params.items() if k not in PER_EXPERT}, where=name)
        base, experts = group.base, group.non_base
        weights = [float(params["weight"][e.id]) for e in experts]
        for e, w in zip(experts, weights):
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"output_qp: weight of {e.id} must be finite and > 0 (tensor {name}); got {w}")
        if not base.tensor.is_floating_point():
            return base.tensor
        for entry in group.entries:
            if entry.tensor.is_floating_point() and not bool(torch.isfinite(entry.tensor).all()):
                raise ValueError(f"output_qp: tensor {name} of model {entry.id} contains NaN or Inf")
        state.saw([str(e.id) for e in experts])
        given = [(params.get(k) or {}).get(e.id) for k in ("calibration", "statistics") for e in experts]
        if planned is None and not any(given):
            # Only a direct call can get here without data (a configuration without it is refused
            # before any work): nothing distinguishes the inputs, so the isotropic solution.
            warnings.warn(ISOTROPIC_WARNING, UserWarning, stacklevel=2)
            return simple_merge(group, weights, params, "linear")

        module, _, leaf = name.rpartition(".")
        found = state.statistics_of(base, experts, params, module)
        kinds = {type(f) for f in found}
        if any(f is None for f in found) or len(kinds) != 1:
            return self._fallback(state, group, weights, params, "no calibration statistics")
        kind = kinds.pop()
        try:
            if kind is LinearStats and ((base.tensor.ndim == 2 and leaf == "weight")
                                        or (base.tensor.ndim == 1 and leaf == "bias")):
                return self._linear(state, group, found, weights, params, part=leaf)
            if kind is NormStats and base.tensor.ndim == 1 and leaf in ("weight", "bias"):
                return self._norm(group, found, weights, params, part=leaf)
            if kind is EmbeddingStats and base.tensor.ndim == 2:
                if state.vocabulary_permuted and group.metadata.vocabulary_axis is not None:
                    raise ProblemMismatch("embedding rows re-ordered by the tokenizer merge")
                if state.tied_head is not None and params["tied_head"]:
                    head = state.statistics_of(base, experts, params, state.tied_head)
                    if all(isinstance(h, LinearStats) for h in head):
                        return problems.solve_tied_embedding(base.tensor, [e.tensor for e in experts], found, head,
                                                             weights, float(params["ridge"]))
                    LOG.info("output_qp: %s is tied to the output head but the head has no statistics; "
                             "token frequencies only", name)
                return problems.solve_embedding(base.tensor, [e.tensor for e in experts], found, weights,
                                                float(params["ridge"]))
        except ProblemMismatch as reason:
            return self._fallback(state, group, weights, params, str(reason))
        return self._fallback(state, group, weights, params,
                              f"no QP form for a {leaf} of a {kind.__name__[:-5].lower()} module")

    def _linear(self, state: MergeState, group, found: Sequence[LinearStats], weights, params,
                part: str) -> torch.Tensor:
        """Weight and bias of a linear map are solved jointly: the first of the two to arrive
        solves and parks the other's result; both must have the same solve settings."""
        name = group.metadata.name
        module = name.rpartition(".")[0]
        settings = solve_settings(params)
        other = "bias" if part == "weight" else "weight"
        key = (module, tuple(str(e.id) for e in group.entries))
        parked = state.take((key, part))
        if parked is not None:
            parked_settings, parked_weights, tensor = parked
            if (parked_settings, tuple(parked_weights)) != (settings, tuple(weights)):
                raise ValueError(
                    f"output_qp: {module}.weight and {module}.bias are solved together but get different "
                    f"parameters ({_difference(parked_settings, parked_weights, settings, weights)}): give "
                    "both the same values (a `filter` that matches one but not the other splits them)")
            return tensor.to(device=group.base.tensor.device, dtype=group.base.tensor.dtype)

        partner = partner_tensors(group, f"{module}.{other}")  # None when the layer has no bias
        if part == "bias" and partner is None:
            raise ProblemMismatch(f"bias {name} without a weight")
        weight_group = group if part == "weight" else partner
        bias_group = partner if part == "weight" else group
        state.systems.enter(layer_of(module))
        solution = problems.solve_linear(
            weight_group.base.tensor, [e.tensor for e in weight_group.non_base], found, weights, settings,
            base_bias=None if bias_group is None else bias_group.base.tensor,
            expert_biases=None if bias_group is None else [e.tensor for e in bias_group.non_base],
            systems=state.systems)
        # One record per linear map (weight and bias solved together), under the weight's name.
        state.record(tensor_record(f"{module}.weight", solution.objective, weights,
                                   [str(e.id) for e in group.non_base]))
        if bias_group is None:
            return solution.weight
        mine, theirs = (solution.weight, solution.bias) if part == "weight" else (solution.bias, solution.weight)
        state.park((key, other), settings, weights, theirs)
        return mine

    def _norm(self, group, found: Sequence[NormStats], weights, params, part: str) -> torch.Tensor:
        module = group.metadata.name.rpartition(".")[0]
        other = "bias" if part == "weight" else "weight"
        partner = partner_tensors(group, f"{module}.{other}")
        scale_group = group if part == "weight" else partner
        bias_group = partner if part == "weight" else group
        if scale_group is None:
            raise ProblemMismatch(f"norm bias {group.metadata.name} without a scale")
        scale, bias = problems.solve_norm(
            scale_group.base.tensor, [e.tensor for e in scale_group.non_base], found, weights, float(params["ridge"]),
            base_bias=None if bias_group is None else bias_group.base.tensor,
            expert_biases=None if bias_group is None else [e.tensor for e in bias_group.non_base])
        return scale if part == "weight" else bias

    def _fallback(self, state: MergeState, group, weights, params, reason: str) -> torch.Tensor:
        name = group.metadata.name
        method = params["fallback"]
        state.record(fallback_record(name, f"{reason}; merged with {method}"))
        LOG.warning("output_qp: %s falls back to %s (%s)", name, method, reason)
        return simple_merge(group, weights, params, method)


def _difference(a, wa, b, wb) -> str:
    fields = [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in ("basis", "ridge", "nonneg", "sum_to_one",
                                                                        "svc", "svc_alpha", "svc_rule")
              if getattr(a, f) != getattr(b, f)]
    if tuple(wa) != tuple(wb):
        fields.append(f"weight: {list(wa)} vs {list(wb)}")
    return "; ".join(fields)


def simple_merge(group: TensorGroup, weights, params, method: str) -> torch.Tensor:
    """`method` (a FALLBACKS name) on the group, with singular value calibration where `svc` asks."""
    return problems.fallback_update(group.base.tensor, [e.tensor for e in group.non_base], weights, method,
                                    params["svc_alpha"], calibrate=bool(params["svc"]) and spectral(group),
                                    svc_rule=params["svc_rule"])


def partner_tensors(group: TensorGroup, name: str) -> Optional[TensorGroup]:
    """Another tensor of the same module (a linear layer's bias for its weight, and so on) from
    every model of the group, read through mergekit's own loaders; None if the base model has
    no such tensor."""
    entries = []
    # The base decides whether the module has this tensor at all, so look at it first.
    for entry in sorted(group.entries, key=lambda e: not e.is_base):
        names = compat.tensor_names(entry.id)
        # Checkpoints may carry a model prefix that the output name lacks (bert.…).
        key = name if name in names else next((k for k in sorted(names, key=len) if k.endswith("." + name)), None)
        if key is None:
            if entry.is_base:
                return None
            raise ProblemMismatch(f"{entry.id} has no {name} while the base model has one")
        # in the group's dtype (the config's `dtype`, else the promoted one), as mergekit hands the group itself
        tensor = compat.read_tensor(entry.id, key, device=str(group.base.tensor.device)).to(group.base.tensor.dtype)
        entries.append(TensorEntry(id=entry.id, tensor=tensor, is_base=entry.is_base))
    return TensorGroup(entries=tuple(entries))


METHOD = OutputQPMerge()
