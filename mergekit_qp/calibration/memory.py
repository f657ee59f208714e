"""The peak memory of a whole-model statistics pass, predicted from the model's config before
anything is loaded, and the refusal of a pass that cannot fit (no mergekit).

The pass holds the expert in float32, a float64 Gram sum per distinct linear input (modules of
one parent with the same input width count once: q/k/v, gate/up), the float32 means it hands
on, and one batch of activations. The figure is a lower estimate (an attention output
projection shares its parent and width with q/k/v and is not counted): a refusal means the pass
certainly does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

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

    from .models import model_class_for

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    model_class = model_class_for(config)
    with torch.device("meta"):
        if model_class is transformers.AutoModel:
            return config, transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return config, model_class(config)


def predict_pass_memory(model_dir: str, max_batch_tokens: int, seq_len: int,
                        trust_remote_code: bool = False) -> PassMemory:
    config, model = _meta_model(model_dir, trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    inputs: Dict[Tuple[str, int], int] = {}
    for name, module in model.named_modules():
        if is_linear(module):
            width = module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]
            inputs[(name.rpartition(".")[0], width)] = width
    widths = list(inputs.values())
    statistics = sum(8 * d * d for d in widths) + 4 * max((d * d for d in widths), default=0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    tokens = max_batch_tokens
    activations = 4 * tokens * (4 * hidden + 2 * inner) + 4 * tokens * min(seq_len, tokens) * heads
    return PassMemory(4 * parameters, statistics, activations)


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
    free, what = available_memory(device)
    if need.total > free:
        raise InsufficientMemory(
            f"output_qp: the statistics pass over {model_dir!r} needs at least {need.total / GB:.1f} GB "
            f"(model in float32 {need.model_bytes / GB:.1f} GB, Gram sums {need.statistics_bytes / GB:.1f} GB, "
            f"activations {need.activation_bytes / GB:.1f} GB) but {free / GB:.1f} GB is {what}: run it on a "
            "machine or device with more memory (mergekit's --device), or merge a smaller model")
    return need
