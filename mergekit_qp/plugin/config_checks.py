"""Checks of a merge configuration that mergekit does not make, run before any forward pass:
parameter names and places, values, `slices:` that line up, depths and shapes of the experts,
and what sequential merging cannot do."""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from .parameters import CALIBRATION_SETTINGS, METHOD_NAME, PARAMETERS, check_svc_alpha, check_svc_rule, validate_values
from .svc_methods import SVC_INNER


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
    """`<method>_svc`: the inner method's parameter names plus svc_alpha and svc_rule, nothing else."""
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
        if "svc_rule" in (settings or {}) and not isinstance(settings["svc_rule"], (dict, list)):
            check_svc_rule(config.merge_method, settings["svc_rule"], f" ({where})")  # filtered: per tensor


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
            if key in ("svc_alpha", "svc_rule") and not (settings or {}).get("svc"):
                raise ValueError(f"output_qp: {key} in {where} applies to svc: true only")
            if key == "calibration" and not plain:
                raise ValueError(f"output_qp: calibration in {where} must be a path or dataset name, not {value!r}")
            if key == "statistics":
                check_statistics_place(where, settings, per_expert_place, value)
        scalars = {}
        for spec in PARAMETERS:
            value = (settings or {}).get(spec.name)
            if isinstance(value, (bool, int, float, str)) or (value is None and spec.name in (settings or {})):
                try:
                    scalars[spec.name] = spec.validate(value)
                except Exception as error:
                    raise ValueError(f"output_qp: bad value for {spec.name!r} in {where}: {error}") from None
        validate_values(scalars, where)


def check_statistics_place(where: str, settings: Dict[str, Any], per_expert_place: bool, value: Any) -> None:
    """`statistics:` names one expert's artifact: under that model only, a plain folder or repository
    id, and not beside `calibration:` there (one or the other source of the expert's statistics)."""
    if not per_expert_place:
        raise ValueError(f"output_qp: statistics in {where}: an artifact describes one model, so give it under "
                         "that model's parameters")
    if not isinstance(value, str) or not value:
        raise ValueError(f"output_qp: statistics in {where} must be a folder or hub repository id, not {value!r}")
    if settings.get("calibration") is not None:
        raise ValueError(f"output_qp: {where} gives both calibration and statistics: give one (statistics are "
                         "what calibration data would compute)")


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
    from ..calibration.layers import Backbone

    config = planner.config
    if config.tokenizer is not None or config.tokenizer_source is not None:
        raise ValueError("output_qp: sequential: true cannot be combined with a tokenizer merge "
                         "(tokenizer / tokenizer_source): calibration runs on the base model's token ids")
    if len(config.modules) != 1:
        raise ValueError(f"output_qp: sequential: true needs a single-module model; this one has modules "
                         f"{', '.join(config.modules)}")
    base = config.base_model
    Backbone(base.config(trust_remote_code=planner.options.trust_remote_code))  # raises for other architectures


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
