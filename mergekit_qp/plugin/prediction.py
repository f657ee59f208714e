"""What a merge method would write for one linear map, without running a merge: the tensors that
`mergekit-qp plan` scores (docs/plan.md). Built-in methods run through mergekit's public method
call on a TensorGroup carrying the weight's metadata (its vocabulary axis: `<method>_svc` leaves
output heads alone, as in a merge), with the parameters of their derived config; output_qp through
the solve its merge uses (core/problems.solve_linear). Inputs are promoted or cast to the config's
`dtype` and the result cast to the weight's `force_dtype` or the config's `out_dtype` as
`mergekit-yaml` does, so a predicted ρ is the ρ `diagnose` measures on the written model."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..core import problems
from ..core.statistics import LinearStats
from .config_api import method_ignores_base_model, method_parameter_specs, registered_method
from .parameters import CALIBRATION_SETTINGS, METHOD_NAME, PARAMETERS, PER_EXPERT, solve_settings, validate_values

__all__ = ["MethodPredictor", "PlanError", "planned_calibration_overrides", "weight_infos"]


class PlanError(ValueError):
    """A planned method that cannot be predicted, or whose parameters are wrong."""


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name) if name else None


def _scalar(method: str, name: str, value: Any, where: str) -> Any:
    if isinstance(value, list):  # mergekit's [{filter: …, value: …}, …] or gradient lists
        raise PlanError(f"plan: {method} parameter {name!r}{where} is given per tensor ({value!r}); plan takes one "
                        "value per parameter")
    return value


def weight_infos(base_dir: str) -> Dict[str, Any]:
    """mergekit's WeightInfo of every weight of the base's architecture, by name and alias (the
    vocabulary axis and forced dtype of a tensor come from there); empty for an unknown one."""
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    try:
        arch = arch_info_for_config(config)
    except RuntimeError:
        arch = None
    found: Dict[str, Any] = {}
    for weight in arch.all_weights(config) if arch is not None else []:
        for name in (weight.name, *(weight.aliases or ())):
            found.setdefault(name, weight)
    return found


def planned_calibration_overrides(given: Mapping[str, Any]) -> List[str]:
    """The names among an output_qp override that would change the calibration statistics (which
    plan computes once, from CONFIG)."""
    return sorted(set(given) & (set(CALIBRATION_SETTINGS) | {"calibration", "statistics"}))


class MethodPredictor:
    """One planned method: `merged(...)` gives the weight (and bias) of one linear map as the
    merge of `config` would write them. `config`: a derived mergekit config (plain `models:`)."""

    def __init__(self, label: str, config: Mapping[str, Any], expert_names: Sequence[str], base_name: str):
        self.label = label
        self.method = str(config["merge_method"])
        self.experts = list(expert_names)
        self.dtype, self.out_dtype = _dtype(config.get("dtype")), _dtype(config.get("out_dtype"))
        entries = {str(m["model"]): dict(m.get("parameters") or {}) for m in config["models"]}
        shared = dict(config.get("parameters") or {})

        def per_model(model: str, name: str, default: Any) -> Any:
            # mergekit's order: the model's own value, then the top-level one, then the default
            own = entries.get(model, {})
            return _scalar(self.method, name, own.get(name, shared.get(name, default)), f" of {model}")

        if self.method == METHOD_NAME:
            specs = {p.name: p for p in PARAMETERS if p.name not in PER_EXPERT}
            params = {name: spec.default for name, spec in specs.items()}
            params.update({k: specs[k].validate(_scalar(self.method, k, v, "")) for k, v in shared.items() if k in specs})
            try:
                validate_values(params, where="plan")
            except ValueError as error:
                raise PlanError(str(error)) from None
            if params.get("sequential"):
                # Each layer's inputs would come from the merged layers before it: only a merge knows them.
                raise PlanError("plan: output_qp with `sequential: true` is not predicted (its calibration inputs "
                                "come from the merged layers before each one); plan the one-shot merge "
                                "(sequential: false)")
            self.settings = solve_settings(params)
            self.weights = [float(per_model(e, "weight", 1.0)) for e in self.experts]
            return
        self.ignores_base = method_ignores_base_model(self.method)
        self.ids = ([] if self.ignores_base else [base_name]) + self.experts
        self.parameters: Dict[str, Any] = {}
        for spec in method_parameter_specs(self.method):
            if spec.scope.value == "shared":
                if spec.name in shared:
                    self.parameters[spec.name] = _scalar(self.method, spec.name, shared[spec.name], "")
                continue
            default = None if spec.required else spec.default
            models = self.ids if spec.scope.value == "input" else self.experts
            self.parameters[spec.name] = {model: per_model(model, spec.name, default) for model in models}
        # Input counts and every parameter checked now, on 1 × 1 stand-ins, not at the first tensor.
        try:
            self._builtin("plan check", torch.zeros(1, 1), [torch.zeros(1, 1)] * len(self.experts), None)
        except (ValueError, TypeError, RuntimeError) as error:
            raise PlanError(f"plan: {label}: {error}") from None

    def merged(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], stats: Sequence[LinearStats],
               base_bias: Optional[torch.Tensor] = None, expert_biases: Optional[Sequence[torch.Tensor]] = None,
               infos: Optional[Mapping[str, Any]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The written weight and bias (None without one) of the linear map whose weight is `name`;
        `infos`: weight_infos of the base (vocabulary axis, forced dtype)."""
        infos = infos or {}
        bias_name = name[:-len("weight")] + "bias"

        def written(tensor: torch.Tensor, tensor_name: str) -> torch.Tensor:
            info = infos.get(tensor_name)
            forced = _dtype(info.force_dtype) if info is not None else None
            dtype = forced or self.out_dtype
            return tensor.to(dtype) if dtype is not None else tensor

        if self.method == METHOD_NAME:
            # mergekit aligns each tensor group to `dtype`, else to the promoted dtype of its inputs
            work = self.dtype or _promoted([base, *experts])
            cast = [t.to(work) for t in (base, *experts)]
            bias = None if base_bias is None else [t.to(work) for t in (base_bias, *expert_biases)]
            solution = problems.solve_linear(cast[0], cast[1:], stats, self.weights, self.settings,
                                             base_bias=None if bias is None else bias[0],
                                             expert_biases=None if bias is None else bias[1:])
            return (written(solution.weight, name),
                    None if solution.bias is None else written(solution.bias, bias_name))
        weight = written(self._builtin(name, base, experts, infos.get(name)), name)
        bias = None if base_bias is None else written(
            self._builtin(bias_name, base_bias, expert_biases, infos.get(bias_name)), bias_name)
        return weight, bias

    def _builtin(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], info: Any) -> torch.Tensor:
        from mergekit.merge_methods import TensorGroup

        tensors = list(experts) if self.ignores_base else [base, *experts]
        group = TensorGroup.from_tensors(tensors, ids=self.ids, base_index=None if self.ignores_base else 0, name=name,
                                         vocabulary_axis=None if info is None else info.vocabulary_axis)
        (result,) = registered_method(self.method)((group,), parameters=self.parameters, dtype=self.dtype)
        return result


def _promoted(tensors: List[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype
