"""The per-expert parameters of built-in mergekit methods when `mergekit-qp compare`, the demo or
the benchmarks merge K experts with them: one table for all three.

Sign-consensus methods (the ties family, which normalise or rescale their kept task vectors) take
every expert at weight 1 keeping half of its task vector; plain sums (task_arithmetic,
dare_linear, …) take weight 1/K, the average task vector (the full sum of K task vectors usually
overshoots; on the demo models 1/K is the best of 1/3, 0.5 and 1.0). A `_svc` method uses its
inner method's defaults.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

AVERAGE = "1/K"
PER_EXPERT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "della": {"weight": 1.0, "density": 0.5},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    "task_arithmetic": {"weight": AVERAGE},
    "dare_linear": {"weight": AVERAGE, "density": 0.5},
    "della_linear": {"weight": AVERAGE, "density": 0.5},
    "breadcrumbs": {"weight": AVERAGE, "density": 0.9, "gamma": 0.01},
    "linear": {"weight": 1.0},
}


def per_expert_defaults(method: str, experts: int, parameters: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """The parameters every one of `experts` experts gets with `method` (1/K filled in).

    `parameters`: the method's parameter specs (name, required), when known: only names the
    method has are kept, and a required `weight` that the table lacks is 1.0."""
    inner = method[:-4] if method.endswith("_svc") else method
    chosen = dict(PER_EXPERT_DEFAULTS.get(inner, {}))
    if parameters is not None:
        names = {p.name for p in parameters}
        if "weight" not in chosen and any(p.name == "weight" and p.required for p in parameters):
            chosen["weight"] = 1.0
        chosen = {k: v for k, v in chosen.items() if k in names}
    return {k: (1.0 / experts if v == AVERAGE else v) for k, v in chosen.items()}
