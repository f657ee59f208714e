"""What the QP knows about a model's inputs: statistic types, the one float64 accumulator, and
which modules have statistics (pure torch; no mergekit, no transformers).

- linear maps ``y = W x (+ b)`` (``nn.Linear``, and GPT-2's ``Conv1D`` which stores W as in × out):
  the input Gram ``G = Σ x xᵀ / n`` and mean ``μ = Σ x / n`` (the mean lets a bias be solved
  jointly with its weight, in homogeneous coordinates);
- norm layers ``y = γ ⊙ x̃ (+ β)``: per-feature moments ``E[x̃²]`` and ``E[x̃]`` of the normalised
  input x̃;
- embeddings (one-hot inputs): the token frequency of each row.

Every statistic of the package, independent or sequential, is summed by `Accumulator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["Accumulator", "EmbeddingStats", "LinearStats", "NormStats", "is_conv1d", "is_linear", "is_norm",
           "normalised_input"]


# -- which modules have statistics --------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: y = x W + b with W stored (in × out), the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and module.weight.ndim == 2


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    # RMSNorm classes of transformers models (LlamaRMSNorm, Qwen2RMSNorm, ...) and torch's own.
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.ndim == 1


def normalised_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̃, a norm's input after normalisation and before the learned scale (float32)."""
    x = x.float()
    if isinstance(module, nn.LayerNorm):
        return nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None) or 1e-6
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# -- the accumulator -------------------------------------------------------------------------------
class Accumulator:
    """Running float64 sums of one stream of (tokens × features) rows: the count, Σ x, and the
    second moment Σ aᵀx (``full``: a d × d matrix) or Σ a ⊙ x (``diagonal``: per feature), where
    a is the row itself or, for cross moments, the matching row of another stream.

    Each added chunk is multiplied in `product_dtype` and summed into float64. float32 products
    are accurate enough per chunk and several times faster; the expert-output target uses
    float64 products because it inverts per-task Grams whose near-null directions float32
    rounding fills with noise."""

    def __init__(self, second: str = "full", product_dtype: torch.dtype = torch.float32):
        if second not in ("full", "diagonal"):
            raise ValueError(f"Accumulator: second must be 'full' or 'diagonal', not {second!r}")
        self.second_kind = second
        self.product_dtype = product_dtype
        self.count = 0
        self.sum: Optional[torch.Tensor] = None
        self.second: Optional[torch.Tensor] = None

    def add(self, rows: torch.Tensor, other: Optional[torch.Tensor] = None) -> None:
        x = rows.to(self.product_dtype)
        a = x if other is None else other.to(self.product_dtype)
        s = x.sum(0).double()
        p = (a.T @ x).double() if self.second_kind == "full" else (a * x).sum(0).double()
        if self.sum is None:
            self.sum, self.second = s, p
        else:
            self.sum += s
            self.second += p
        self.count += rows.shape[0]

    def all_reduce(self, group=None) -> None:
        """Sum the count and the sums over the processes of a torch.distributed group (each
        process having added its share of the tokens): afterwards every process holds the sums
        of all tokens, equal to one process adding them all up to the order of additions."""
        import torch.distributed as dist

        if self.sum is None:
            raise ValueError("Accumulator.all_reduce: this process added no rows")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for tensor in (count, self.sum, self.second):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.count = int(count.item())

    def release(self) -> None:
        """Drop the sums (the count stays): their means have been taken."""
        self.sum = self.second = None

    def mean(self) -> torch.Tensor:
        """Σ x / n (float64)."""
        return self._divide(self.sum)

    def second_moment(self) -> torch.Tensor:
        """Σ aᵀx / n or Σ a ⊙ x / n (float64)."""
        return self._divide(self.second)

    def _divide(self, total: Optional[torch.Tensor]) -> torch.Tensor:
        if total is None:
            raise ValueError("Accumulator: no rows were added")
        return total / max(self.count, 1)


# -- statistic types -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearStats:
    gram: torch.Tensor  # d × d, E[x xᵀ]
    mean: torch.Tensor  # d, E[x]
    # Sequential merging with the expert-output target: x is the merged model's input and
    # x_e the expert's own input at the same token; cross = E[x_e xᵀ], expert_gram = E[x_e x_eᵀ].
    cross: Optional[torch.Tensor] = None
    expert_mean: Optional[torch.Tensor] = None
    expert_gram: Optional[torch.Tensor] = None
    transposed: bool = False  # GPT-2 Conv1D: the weight is stored in × out
    # Where several projections read this Gram (q/k/v, gate/up): an identity of it, so their
    # full-basis solves share one factorisation (core/problems.py, SharedSystems); else None.
    shared_input: Optional[tuple] = None


@dataclass(frozen=True)
class NormStats:
    m2: torch.Tensor  # d, E[x̃²]
    m1: torch.Tensor  # d, E[x̃]
    cross: Optional[torch.Tensor] = None  # d, E[x̃_e x̃] (expert-output target, as above)
    expert_m1: Optional[torch.Tensor] = None  # d, E[x̃_e]


@dataclass(frozen=True)
class EmbeddingStats:
    freq: torch.Tensor  # rows, token frequency
