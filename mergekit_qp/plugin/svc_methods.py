"""`<method>_svc`: mergekit's own task-vector methods followed by singular value calibration
(core/svc.py) of their update, with the inner method's parameters plus `svc_alpha`."""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, ParameterScope, ParameterSpec, TensorGroup

from ..core import svc
from .parameters import SVC_RULE_HELP, check_svc_alpha, check_svc_rule


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
SVC_RULE = ParameterSpec("svc_rule", str, ParameterScope.SHARED, svc.DEFAULT_RULE, SVC_RULE_HELP)


class SVCMerge(GroupMergeMethod):
    """`<inner>_svc`: mergekit's own method, then singular value calibration of its update.

    Accepts exactly the inner method's parameters (the same ParameterSpec objects, so mergekit
    validates them as it does the inner method's) plus `svc_alpha` and `svc_rule`."""

    def __init__(self, inner: GroupMergeMethod):
        self.inner = inner
        spec = inner.spec
        self.spec = MergeMethodSpec(
            name=f"{spec.name}_svc",
            parameters=(*spec.parameters, SVC_ALPHA, SVC_RULE),
            contract=spec.contract,
            pretty_name=f"{spec.pretty_name or spec.name} + singular value calibration",
            reference_url="https://arxiv.org/abs/2602.05536",
            optional_tensor_policy=spec.optional_tensor_policy,
            uses_accelerator=spec.uses_accelerator,
        )

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        alpha, rule = params.pop("svc_alpha"), params.pop("svc_rule")
        check_svc_alpha(self.spec.name, alpha, f" (tensor {group.metadata.name})")
        check_svc_rule(self.spec.name, rule, f" (tensor {group.metadata.name})")
        merged = self.inner.merge_group(group, **params)
        if group.base is None or not group.non_base or not spectral(group):
            return merged
        base = group.base.tensor
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        deltas = [e.tensor.to(work) - base.to(work) for e in group.non_base]
        try:
            update = svc.calibrate(merged.to(work) - base.to(work), deltas, alpha, rule).update
        except ValueError as error:
            raise ValueError(f"{self.spec.name}: tensor {group.metadata.name}: {error}") from None
        return (base.to(work) + update).to(base.dtype)


def svc_methods() -> List[SVCMerge]:
    from mergekit.merge_methods import registry

    return [SVCMerge(registry.get(name)) for name in SVC_INNER]
