"""The peak memory of a statistics pass, predicted from the model's config before anything is
loaded, and the refusal of a pass that cannot fit (no mergekit). The layer-streamed pass is
described at StreamedPassMemory; the whole-model pass, below.

The whole-model pass holds the expert in float32, a float64 Gram sum per distinct linear input (modules of
one parent with the same input width count once: q/k/v, gate/up), the float32 means it hands
on, and one batch of activations. The figure is a lower estimate (an attention output
projection shares its parent and width with q/k/v and is not counted): a refusal means the pass
certainly does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ..core.statistics import is_conv1d, is_linear

GB = 1e9


class InsufficientMemory(MemoryError):
    """A statistics pass predicted not to fit in the memory of its device."""


@dataclass(frozen=True)
class PassMemory:
    model_bytes: int  # the expert in float32
    statistics_bytes: int  # float64 Gram sums (and the largest float32 copy)
    activation_bytes: int  # one batch: hidden states and attention scores

    @property
    def total(self) -> int:
        return self.model_bytes + self.statistics_bytes + self.activation_bytes


def _meta_model(model_dir: str, trust_remote_code: bool):
    import transformers

    from .models import meta_model

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    return config, meta_model(config, trust_remote_code)


def _input_widths(model) -> List[int]:
    """The widths of the distinct linear inputs (modules of one parent and one input width count
    once: q/k/v, gate/up; o_proj shares q/k/v's, so the figure is a lower estimate)."""
    inputs: Dict[Tuple[str, int], int] = {}
    for name, module in model.named_modules():
        if is_linear(module):
            width = module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]
            inputs[(name.rpartition(".")[0], width)] = width
    return list(inputs.values())


def predict_pass_memory(model_dir: str, max_batch_tokens: int, seq_len: int,
                        trust_remote_code: bool = False) -> PassMemory:
    config, model = _meta_model(model_dir, trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    widths = _input_widths(model)
    statistics = sum(8 * d * d for d in widths) + 4 * max((d * d for d in widths), default=0)
    return PassMemory(4 * parameters, statistics, _activations(config, max_batch_tokens, seq_len))


@dataclass(frozen=True)
class StreamedPassMemory:
    """The layer-streamed pass: the weights outside the layers are held only before the first
    layer and after the last, so the peak is the larger of the two phases."""

    layer_bytes: int  # the largest layer's weights in float32
    statistics_bytes: int  # that layer's float64 Gram sums and the float32 means made from them
    outer_bytes: int  # embeddings, final norm and output head in float32
    hidden_bytes: int  # every calibration token's hidden state, a layer's inputs and outputs
    activation_bytes: int  # one batch inside a layer
    batch_hidden_bytes: int = 0  # one batch's hidden states, inputs and outputs (spilled: all that is held)

    @property
    def total(self) -> int:
        return self._with(self.hidden_bytes)

    @property
    def spilled_total(self) -> int:
        """With the hidden states spilled to disk, one batch's held at a time."""
        return self._with(self.batch_hidden_bytes)

    def _with(self, hidden: int) -> int:
        return max(self.layer_bytes + self.statistics_bytes, self.outer_bytes) + hidden + self.activation_bytes


def predict_streamed_memory(model_dir: str, tokens: int, max_batch_tokens: int, seq_len: int,
                            trust_remote_code: bool = False) -> StreamedPassMemory:
    """The peak of the layer-streamed pass over `tokens` calibration tokens (one expert)."""
    from .layers import Backbone

    config, model = _meta_model(model_dir, trust_remote_code)
    layers = Backbone(config, sequential=False).layers
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    outer = sum(p.numel() for p in model.parameters()) - sum(per_layer)
    grams = max((sum(12 * d * d for d in _input_widths(layer)) for layer in layers), default=0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return StreamedPassMemory(layer_bytes=4 * max(per_layer, default=0), statistics_bytes=grams,
                              outer_bytes=4 * outer, hidden_bytes=2 * 4 * tokens * hidden,
                              activation_bytes=_activations(config, max_batch_tokens, seq_len),
                              batch_hidden_bytes=2 * 4 * min(tokens, max_batch_tokens) * hidden)


def plan_streamed_pass(model_dir: str, device: torch.device, tokens: int, max_batch_tokens: int, seq_len: int,
                       trust_remote_code: bool = False) -> Tuple[StreamedPassMemory, bool]:
    """The layer-streamed pass's memory and whether its hidden states spill to disk: they do
    when, held in memory, they would take more than half of what the rest of the pass leaves
    free. Refused, before anything is loaded, when even spilled it cannot fit."""
    need = predict_streamed_memory(model_dir, tokens, max_batch_tokens, seq_len, trust_remote_code)
    free, _ = available_memory(device)
    spill = need.hidden_bytes > max(free - (need.total - need.hidden_bytes), 0) / 2
    _refuse_above_free(
        need.spilled_total if spill else need.total, device, f"the layer-by-layer statistics pass over {model_dir!r}",
        f"one layer in float32 {need.layer_bytes / GB:.1f} GB, its Gram sums {need.statistics_bytes / GB:.1f} GB, "
        f"weights outside the layers {need.outer_bytes / GB:.1f} GB, "
        + (f"one batch's hidden states {need.batch_hidden_bytes / GB:.1f} GB (the rest spilled to disk)" if spill
           else f"hidden states of {tokens} calibration tokens {need.hidden_bytes / GB:.1f} GB")
        + f", activations {need.activation_bytes / GB:.1f} GB",
        "run it on a machine or device with more memory (mergekit's --device)" if spill else "use fewer calibration tokens (calibration_samples, calibration_seq_len) or a device with more memory "
        "(mergekit's --device)")
    return need, spill


def _refuse_above_free(total: int, device: torch.device, what_runs: str, parts: str, way_out: str) -> None:
    free, what = available_memory(device)
    if total > free:
        raise InsufficientMemory(f"output_qp: {what_runs} needs at least {total / GB:.1f} GB ({parts}) but "
                                 f"{free / GB:.1f} GB is {what}: {way_out}")


def _activations(config, max_batch_tokens: int, seq_len: int) -> int:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    tokens = max_batch_tokens
    return 4 * tokens * (4 * hidden + 2 * inner) + 4 * tokens * min(seq_len, tokens) * heads


def available_memory(device: torch.device) -> Tuple[int, str]:
    """(bytes free for the pass, what that figure is) on the pass's device."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({total / GB:.1f} GB in all)"
    import psutil

    memory = psutil.virtual_memory()
    return memory.available, f"available RAM ({memory.total / GB:.1f} GB in all)"


def check_pass_fits(model_dir: str, device: torch.device, max_batch_tokens: int, seq_len: int,
                    trust_remote_code: bool = False) -> PassMemory:
    """Refuse, before loading anything, a pass whose predicted peak exceeds what is free."""
    need = predict_pass_memory(model_dir, max_batch_tokens, seq_len, trust_remote_code)
    _refuse_above_free(
        need.total, device, f"the statistics pass over {model_dir!r}",
        f"model in float32 {need.model_bytes / GB:.1f} GB, Gram sums {need.statistics_bytes / GB:.1f} GB, "
        f"activations {need.activation_bytes / GB:.1f} GB",
        "run it on a machine or device with more memory (mergekit's --device), or merge a smaller model")
    return need
