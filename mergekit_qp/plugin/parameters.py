"""output_qp's parameters: mergekit ParameterSpecs, value checks, and the solve settings they give."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from ..calibration.cache import GRAM_DTYPES
from ..core import svc
from ..core.problems import FALLBACKS, Basis, SolveSettings

METHOD_NAME = "output_qp"
TARGETS = ("merged_inputs", "expert_outputs")
# Settings of the forward passes: one value for the whole merge, so plain top-level scalars.
CALIBRATION_SETTINGS = ("calibration_field", "calibration_samples", "calibration_seq_len",
                        "calibration_packing", "calibration_seed", "cache_dir", "sequential", "target",
                        "statistics_dtype")
SVC_RULE_HELP = ("divisor of each singular value: " + " | ".join(svc.RULES)
                 + " (paper: mean_i max(α, s_ir), every direction; shared: max(α, mean_i s_ir) where all "
                 "experts share it; docs/svc.md)")
# The argument through which each planned output_qp task hands its merge's state to the method.
MERGE_STATE = "merge_state"


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
        per_expert("statistics", Optional[str], None,
                   "this expert's statistics artifact (`mergekit-qp statistics`: a folder or hub repository id), "
                   "instead of calibration data"),
        shared("calibration_field", Optional[str], None, "text (or input_ids) field; default text"),
        shared("calibration_samples", int, 128, "number of calibration sequences per expert"),
        shared("calibration_seq_len", int, 512, "maximum tokens per calibration sequence"),
        shared("calibration_packing", bool, False,
               "join the records (each followed by EOS) into full windows of calibration_seq_len tokens"),
        shared("calibration_seed", int, 0, "seed of the deterministic sample selection"),
        shared("basis", str, "full", "full | diagonal | task | rank-N"),
        shared("sequential", bool, False, "layer by layer: statistics on the inputs of the already-merged layers"),
        shared("target", str, "merged_inputs",
               "sequential: fit expert_outputs (the experts' own outputs) or merged_inputs (each expert on the merged inputs)"),
        shared("ridge", float, 1e-4, "Tikhonov weight relative to tr(G)/d, centred on the average update"),
        shared("nonneg", bool, False, "task basis: coefficients ≥ 0"),
        shared("sum_to_one", bool, False, "task basis: coefficients sum to one"),
        shared("tied_head", bool, True, "a tied input/output embedding is solved for both roles (token "
               "frequencies and the output head's input Gram); false: token frequencies only"),
        shared("fallback", str, "linear", "method for tensors without statistics: " + " | ".join(FALLBACKS)),
        shared("statistics_dtype", str, "float32",
               "dtype of the stored input Grams: float32 | bfloat16 (half the disk, lower ρ; docs/scale.md)"),
        shared("cache_dir", Optional[str], None, "statistics cache folder (default $MERGEKIT_QP_CACHE or ~/.cache/mergekit_qp)"),
        shared("svc", bool, False, "singular value calibration of each solved 2-D weight update (arXiv 2602.05536)"),
        shared("svc_alpha", Optional[float], None, "svc: floor α of the overlap divisor; default 1/K"),
        shared("svc_rule", str, svc.DEFAULT_RULE, SVC_RULE_HELP),
    )


PARAMETERS = _parameters()
PARAMETER_NAMES = tuple(p.name for p in PARAMETERS)
PER_EXPERT = {p.name for p in PARAMETERS if p.scope != ParameterScope.SHARED}


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
    if params.get("statistics_dtype", GRAM_DTYPES[0]) not in GRAM_DTYPES:
        value = params["statistics_dtype"]
        why = (" (float16 overflows: the squared activations of LLMs exceed its range of 65504)"
               if value == "float16" else "")
        raise ValueError(f"output_qp: invalid statistics_dtype {value!r}{at}; valid: {', '.join(GRAM_DTYPES)}{why}")
    if params.get("target", TARGETS[0]) not in TARGETS:
        raise ValueError(f"output_qp: invalid target {params['target']!r}{at}; valid: {', '.join(TARGETS)}")
    if basis.kind != "task" and (params.get("nonneg") or params.get("sum_to_one")):
        raise ValueError(f"output_qp: nonneg / sum_to_one apply to basis: task only{at}")
    if "weight" in params and not (math.isfinite(params["weight"]) and params["weight"] > 0):
        raise ValueError(f"output_qp: weight must be finite and > 0{at}; got {params['weight']}")
    check_svc_alpha(METHOD_NAME, params.get("svc_alpha"), at)
    check_svc_rule(METHOD_NAME, params.get("svc_rule", svc.DEFAULT_RULE), at)


def check_svc_alpha(method: str, alpha: Optional[float], at: str = "") -> None:
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{method}: svc_alpha must be finite and > 0{at}; got {alpha}")


def check_svc_rule(method: str, rule: Any, at: str = "") -> None:
    if rule not in svc.RULES:
        raise ValueError(f"{method}: invalid svc_rule {rule!r}{at}; valid: {', '.join(svc.RULES)} (docs/svc.md)")




def solve_settings(params: Dict[str, Any]) -> SolveSettings:
    """What a solve depends on, from a tensor's resolved parameters."""
    return SolveSettings(basis=Basis.parse(params["basis"]), ridge=float(params["ridge"]),
                         nonneg=bool(params["nonneg"]), sum_to_one=bool(params["sum_to_one"]),
                         svc=bool(params["svc"]), svc_alpha=params["svc_alpha"],
                         svc_rule=params["svc_rule"])
