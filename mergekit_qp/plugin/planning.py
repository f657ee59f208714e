"""The planner patches, as named functions (installed through compat.install): output_qp's
checks and statistics pre-pass before planning, its per-merge state handed to every planned
output_qp task, the layer grouping of sequential merging, and mergekit 0.1.5's BERT fix."""

from __future__ import annotations

import threading
from typing import Optional

import torch

from . import compat, config_checks, output
from .merge_state import MergeState
from .parameters import MERGE_STATE, METHOD_NAME, PARAMETERS

_lock = threading.Lock()
_patched = False


def precompute_statistics(planner) -> MergeState:
    """The state of the output_qp merge being planned, with every expert's statistics gathered
    before any tensor is merged, so that bad calibration input fails at once."""
    from ..calibration.cache import STATISTICS, CalibrationSettings

    config = planner.config
    STATISTICS.forget_requests()  # models or data may have changed since an earlier merge in this process
    top = config.parameters or {}
    shared = {}
    for spec in PARAMETERS:
        value = top.get(spec.name, spec.default)
        plain = isinstance(value, (bool, int, float, str)) or value is None
        shared[spec.name] = spec.validate(value) if plain else spec.default
    state = MergeState(STATISTICS, device=str(planner.options.device or "cpu"),
                       trust_remote_code=bool(planner.options.trust_remote_code),
                       vocabulary_permuted=config.tokenizer is not None or config.tokenizer_source is not None,
                       tied_head=tied_output_head(config.base_model, planner.options.trust_remote_code),
                       report_settings={k: v for k, v in shared.items() if k != "cache_dir"})
    settings = CalibrationSettings.from_params(shared)
    device = torch.device(planner.options.device or "cpu")
    config_checks.check_shapes(planner)
    for module in config.modules.values():
        for out_slice in module.slices:
            base = out_slice.base_model or config.base_model
            for source in out_slice.sources:
                if source.model == base:
                    continue
                scopes = (source.parameters, out_slice.parameters, module.parameters, config.parameters)
                calibration = next((s["calibration"] for s in scopes if s and "calibration" in s), None)
                artifact = (source.parameters or {}).get("statistics")
                if calibration is None or isinstance(calibration, str):
                    stats = STATISTICS.expert_statistics(source.model, base, calibration, settings, device,
                                                         trust_remote_code=planner.options.trust_remote_code,
                                                         artifact=artifact)
                    # the report states the tokens each expert's statistics rest on
                    state.report_settings.setdefault("calibration_tokens", {})[str(source.model)] = stats.tokens
    return state


def tied_output_head(base, trust_remote_code: bool) -> Optional[str]:
    """The output head's module name when the base model ties it to the input embedding."""
    if base is None:
        return None
    from transformers import AutoConfig

    from ..calibration.models import local_model_path, meta_model, output_head

    config = AutoConfig.from_pretrained(local_model_path(base), local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    return output_head(meta_model(config, trust_remote_code))


def checked_normalize_config(original):
    def normalize_config(self):
        config_checks.check_config(self.config)
        config_checks.check_depths(self.config, self.options.trust_remote_code)
        original(self)
        config_checks.check_slices(self.config)
        config_checks.check_sequential(self)
        self.__dict__["_output_qp_state"] = (precompute_statistics(self) if self.config.merge_method == METHOD_NAME
                                             else None)
    return normalize_config


def grouped_plan_layer(original):
    def plan_layer(self, sources, layer_offset, t, cfg_reader, module_name):
        # Remember which planned tensors make up each output layer (sequential merging).
        before = len(compat.planned_tensors(self))
        original(self, sources, layer_offset, t, cfg_reader, module_name)
        self.__dict__.setdefault("_output_qp_layers", []).append(
            list(range(before, len(compat.planned_tensors(self)))))
    return plan_layer


def plan_with_state(original):
    def plan(self):
        self.__dict__["_output_qp_layers"] = []
        original(self)
        state = self.__dict__.get("_output_qp_state")
        if state is None:
            return
        task_type = compat.merge_task_type()
        compat.set_planned_tensors(self, [
            (weight, compat.with_merge_parameters(task, {MERGE_STATE: state}) if isinstance(task, task_type) else task)
            for weight, task in compat.planned_tensors(self)])
        if config_checks.is_sequential(self.config):
            from .sequential import plan_sequential

            plan_sequential(self, self.__dict__["_output_qp_layers"], state)
    return plan


def bert_safe_plan_tensor(original):
    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        return original(self, weight, [compat.concat_safe_weight(w) for w in weights_in], models, cfg_reader)
    return plan_tensor


def patch_mergekit() -> None:
    """Install the patches (idempotent), after checking every private symbol they rely on."""
    global _patched
    with _lock:
        if _patched:
            return
        compat.check_mergekit()
        compat.install({
            "MergePlanner.normalize_config": checked_normalize_config,
            "MergePlanner.plan_tensor": bert_safe_plan_tensor,
            "MergePlanner.plan_layer": grouped_plan_layer,
            "MergePlanner._plan": plan_with_state,
            **output.PATCHES,
        })
        _patched = True
