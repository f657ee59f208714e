"""What a merge method would write for one linear map, without running a merge: the tensors that
`mergekit-qp plan` scores (docs/plan.md). Built-in methods run through mergekit's public
`merge_tensors` with the parameters of their derived config; output_qp through the solve its
merge uses (core/problems.solve_linear). Inputs are cast to the config's `dtype` and the result to
its `out_dtype` as `mergekit-yaml` does, so a predicted ρ is the ρ `diagnose` measures on the
written model."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..core import problems
from ..core.statistics import LinearStats
from .config_api import method_ignores_base_model, method_parameter_specs
from .parameters import METHOD_NAME, PARAMETERS, PER_EXPERT, solve_settings, validate_values

__all__ = ["MethodPredictor"]


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name) if name else None


def _scalar(method: str, name: str, value: Any, where: str) -> Any:
    if isinstance(value, list):  # mergekit's [{filter: …, value: …}, …] or gradient lists
        raise ValueError(f"plan: {method} parameter {name!r}{where} is given per tensor ({value!r}); plan takes one "
                         "value per parameter")
    return value


class MethodPredictor:
    """One planned method: `merged(...)` gives the weight (and bias) of one linear map as the
    merge of `config` would write them. `config`: a derived mergekit config (plain `models:`)."""

    def __init__(self, label: str, config: Mapping[str, Any], expert_names: Sequence[str], base_name: str):
        self.label = label
        self.method = str(config["merge_method"])
        self.experts = list(expert_names)
        self.base_name = base_name
        self.dtype, self.out_dtype = _dtype(config.get("dtype")), _dtype(config.get("out_dtype"))
        entries = {str(m["model"]): dict(m.get("parameters") or {}) for m in config["models"]}
        shared = dict(config.get("parameters") or {})
        if self.method == METHOD_NAME:
            specs = {p.name: p for p in PARAMETERS if p.name not in PER_EXPERT}
            params = {name: spec.default for name, spec in specs.items()}
            params.update({k: specs[k].validate(_scalar(self.method, k, v, "")) for k, v in shared.items()
                           if k in specs})
            validate_values(params, where="plan")
            if params.get("sequential"):
                # Each layer's inputs would come from the merged layers before it: only a merge knows them.
                raise ValueError("plan: output_qp with `sequential: true` is not predicted (its calibration inputs come "
                                 "from the merged layers before each one); plan the one-shot merge (sequential: false)")
            self.settings = solve_settings(params)
            self.weights = [float(_scalar(self.method, "weight", entries.get(e, {}).get("weight", 1.0), f" of {e}"))
                            for e in self.experts]
            return
        self.ignores_base = method_ignores_base_model(self.method)
        self.parameters: Dict[str, Any] = {}
        ids = ([] if self.ignores_base else [base_name]) + self.experts
        for spec in method_parameter_specs(self.method):
            if spec.scope.value == "shared":
                if spec.name in shared:
                    self.parameters[spec.name] = _scalar(self.method, spec.name, shared[spec.name], "")
                continue
            per_input = {}
            for model in ids if spec.scope.value == "input" else self.experts:
                value = entries.get(model, {}).get(spec.name, None if spec.required else spec.default)
                per_input[model] = _scalar(self.method, spec.name, value, f" of {model}")
            self.parameters[spec.name] = per_input
        self.ids = ids

    def merged(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], stats: Sequence[LinearStats],
               base_bias: Optional[torch.Tensor] = None,
               expert_biases: Optional[Sequence[torch.Tensor]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The written weight and bias (None without one) of the linear map `name` (its weight's name)."""
        cast = (lambda t: t.to(self.dtype)) if self.dtype is not None else (lambda t: t)
        out = (lambda t: t.to(self.out_dtype)) if self.out_dtype is not None else (lambda t: t)
        base, experts = cast(base), [cast(e) for e in experts]
        if base_bias is not None:
            base_bias, expert_biases = cast(base_bias), [cast(b) for b in expert_biases]
        if self.method == METHOD_NAME:
            solution = problems.solve_linear(base, experts, stats, self.weights, self.settings, base_bias=base_bias,
                                             expert_biases=expert_biases)
            return out(solution.weight), None if solution.bias is None else out(solution.bias)
        weight = out(self._builtin(name, base, experts))
        bias = None if base_bias is None else out(self._builtin(name[:-len("weight")] + "bias", base_bias,
                                                                 expert_biases))
        return weight, bias

    def _builtin(self, name: str, base: torch.Tensor, experts: List[torch.Tensor]) -> torch.Tensor:
        from mergekit.merge_methods import merge_tensors

        tensors = list(experts) if self.ignores_base else [base, *experts]
        return merge_tensors(tensors, self.method, parameters=self.parameters, ids=self.ids,
                             base_index=None if self.ignores_base else 0, name=name)
