"""Calibration statistics: what the QP needs to know about a model's inputs, gathered by hooks.

For every module whose parameters the QP merges, one forward pass over calibration tokens
accumulates the sufficient statistics of design §3 (pure torch; no mergekit, no transformers):

- linear maps ``y = W x (+ b)``: the input Gram ``G = Σ x xᵀ / n`` and mean ``μ = Σ x / n``
  (the mean lets a bias be solved jointly with its weight, in homogeneous coordinates);
- norm layers ``y = γ ⊙ x̃ (+ β)``: per-feature moments ``E[x̃²]`` and ``E[x̃]`` of the
  normalised input x̃;
- embeddings (one-hot inputs): the token frequency of each row.

Padding never enters: every hook keeps only the positions where the attention mask is true.
Projections that read the same tensor (q/k/v, gate/up) share one Gram, stored once.
Sums are kept in float64 whatever the model dtype, and stored as float32 means.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "mergekit_qp.statistics"
FORMAT_VERSION = "1"

LINEAR, NORM, EMBEDDING = "linear", "norm", "embedding"


class StatisticsError(RuntimeError):
    """A statistics file that cannot be used (foreign, truncated, or from other settings)."""


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    # RMSNorm classes of transformers models (LlamaRMSNorm, Qwen2RMSNorm, ...) and torch's own.
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return name.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.ndim == 1


def _normalised_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̃, the input after normalisation and before the learned scale (float32)."""
    x = x.float()
    if isinstance(module, nn.LayerNorm):
        return nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None) or 1e-6
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class _Moments:
    """Running float64 sums for one input stream."""

    count: int = 0
    sum: Optional[torch.Tensor] = None
    gram: Optional[torch.Tensor] = None  # linear: Σ x xᵀ ; norm: Σ x̃² per feature

    def add(self, rows: torch.Tensor, full_gram: bool) -> None:
        # One batch (a few thousand rows) is summed in float32, which is accurate enough there
        # and several times faster than float64 reductions; batches accumulate in float64.
        rows = rows.float()
        s = rows.sum(0).double()
        g = (rows.T @ rows).double() if full_gram else rows.pow(2).sum(0).double()
        if self.sum is None:
            self.sum, self.gram = s, g
        else:
            self.sum += s
            self.gram += g
        self.count += rows.shape[0]


class StatisticsCollector:
    """Attach hooks to a model, run calibration batches through it, return the statistics."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._mask: Optional[torch.Tensor] = None
        self._keep: Optional[torch.Tensor] = None  # flat indices of real tokens, None if no padding
        self._linear: Dict[str, _Moments] = {}
        self._norm: Dict[str, _Moments] = {}
        self._norm_has_bias: Dict[str, bool] = {}
        self._embedding_counts: Dict[str, torch.Tensor] = {}
        self._embedding_tokens: Dict[str, int] = {}
        # Projections reading the tensor that the previous projection read share its Gram.
        self.aliases: Dict[str, str] = {}
        self._last_input: Optional[torch.Tensor] = None
        self._last_key: Optional[str] = None
        self._skipped: Dict[str, str] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            elif _is_norm(module):
                self._norm_has_bias[name] = getattr(module, "bias", None) is not None
                self._handles.append(module.register_forward_pre_hook(self._norm_hook(name)))
            elif isinstance(module, nn.Embedding):
                self._handles.append(
                    module.register_forward_pre_hook(self._embedding_hook(name, module.num_embeddings))
                )

    def _rows(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The (tokens × features) rows of a hooked input at unmasked positions, or None."""
        mask = self._mask
        if x.ndim >= 3 and x.shape[:2] == mask.shape:
            rows = x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x.reshape(mask.numel(), -1, x.shape[-1])
            if self._keep is not None:  # padded batch: keep the real tokens only
                rows = rows.index_select(0, self._keep)
            return rows.reshape(-1, x.shape[-1])
        # A module that sees tokens in another layout (e.g. routed MoE experts) cannot be
        # told apart from padding: leave it without statistics, so it falls back visibly.
        self._skipped[name] = f"input shape {tuple(x.shape)} does not match the token mask"
        return None

    def _linear_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._last_input is x:
                self.aliases.setdefault(name, self._last_key)
                return
            rows = self._rows(name, x)
            if rows is None:
                return
            self._linear.setdefault(name, _Moments()).add(rows, full_gram=True)
            self._last_input, self._last_key = x, name

        return hook

    def _norm_hook(self, name: str):
        def hook(module, args):
            rows = self._rows(name, args[0])
            if rows is not None:
                self._norm.setdefault(name, _Moments()).add(
                    _normalised_input(module, rows), full_gram=False
                )

        return hook

    def _embedding_hook(self, name: str, num_embeddings: int):
        def hook(module, args):
            ids = args[0]
            try:
                ids = ids.expand(self._mask.shape)[self._mask]
            except RuntimeError:
                self._skipped[name] = f"ids of shape {tuple(ids.shape)} do not match the token mask"
                return
            counts = torch.bincount(ids.reshape(-1), minlength=num_embeddings).double()
            if name in self._embedding_counts:
                self._embedding_counts[name] += counts.to(self._embedding_counts[name].device)
            else:
                self._embedding_counts[name] = counts
            self._embedding_tokens[name] = self._embedding_tokens.get(name, 0) + ids.numel()

        return hook

    @torch.no_grad()
    def observe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run one right-padded batch; only positions where attention_mask is true count."""
        self._mask = attention_mask.bool()
        flat = self._mask.reshape(-1)
        self._keep = None if bool(flat.all()) else flat.nonzero().squeeze(1)
        self._last_input = self._last_key = None
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask.long())
        finally:
            self._last_input = self._last_key = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def skipped(self) -> Dict[str, str]:
        return dict(self._skipped)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Float32 means keyed ``<kind>/<module>/<statistic>``."""
        out: Dict[str, torch.Tensor] = {}
        for name, m in self._linear.items():
            out[f"{LINEAR}/{name}/gram"] = (m.gram / m.count).float().cpu()
            out[f"{LINEAR}/{name}/mean"] = (m.sum / m.count).float().cpu()
        for name, m in self._norm.items():
            out[f"{NORM}/{name}/m2"] = (m.gram / m.count).float().cpu()
            out[f"{NORM}/{name}/m1"] = (m.sum / m.count).float().cpu()
        for name, counts in self._embedding_counts.items():
            out[f"{EMBEDDING}/{name}/freq"] = (counts / max(self._embedding_tokens[name], 1)).float().cpu()
        for key, value in out.items():
            if not torch.isfinite(value).all():
                raise StatisticsError(
                    f"non-finite calibration statistics for {key.split('/')[1]} "
                    "(the model's activations overflow or contain NaN)"
                )
        return out

    def token_count(self) -> int:
        counts = [m.count for m in self._linear.values()] + list(self._embedding_tokens.values())
        return max(counts, default=0)


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


@dataclass(frozen=True)
class NormStats:
    m2: torch.Tensor  # d, E[x̃²]
    m1: torch.Tensor  # d, E[x̃]
    cross: Optional[torch.Tensor] = None  # d, E[x̃_e x̃] (expert-output target, as above)
    expert_m1: Optional[torch.Tensor] = None  # d, E[x̃_e]


@dataclass(frozen=True)
class EmbeddingStats:
    freq: torch.Tensor  # rows, token frequency


class ModelStatistics:
    """Read access to one model's stored statistics, keyed by checkpoint tensor name."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
            meta = self._file.metadata() or {}
        except Exception as error:  # safetensors raises several types for a broken file
            raise StatisticsError(f"cannot read statistics file {path}: {error}") from error
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise StatisticsError(f"{path} is not a mergekit-qp statistics file of version {FORMAT_VERSION}")
        self.metadata = meta
        self.aliases: Dict[str, str] = json.loads(meta["aliases"])
        self.prefix: str = meta.get("base_model_prefix", "")
        self.tokens = int(meta["tokens"])
        self._keys = set(self._file.keys())

    def _module(self, kind: str, module: str) -> Optional[str]:
        """The stored module name for a checkpoint module name (prefix-insensitive)."""
        candidates = [module]
        if self.prefix:
            if module.startswith(self.prefix + "."):
                candidates.append(module[len(self.prefix) + 1 :])
            else:
                candidates.append(f"{self.prefix}.{module}")
        for candidate in candidates:
            candidate = self.aliases.get(candidate, candidate) if kind == LINEAR else candidate
            probe = {LINEAR: "gram", NORM: "m2", EMBEDDING: "freq"}[kind]
            if f"{kind}/{candidate}/{probe}" in self._keys:
                return candidate
        return None

    def linear_modules(self) -> List[str]:
        """Every linear module with statistics, shared-input projections included."""
        stored = {k.split("/")[1] for k in self._keys if k.startswith(LINEAR + "/")}
        return sorted(stored | set(self.aliases))

    def _get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def lookup(self, module: str):
        """Statistics for a module name, as LinearStats / NormStats / EmbeddingStats, or None."""
        if (name := self._module(LINEAR, module)) is not None:
            return LinearStats(self._get(f"{LINEAR}/{name}/gram"), self._get(f"{LINEAR}/{name}/mean"))
        if (name := self._module(NORM, module)) is not None:
            return NormStats(self._get(f"{NORM}/{name}/m2"), self._get(f"{NORM}/{name}/m1"))
        if (name := self._module(EMBEDDING, module)) is not None:
            return EmbeddingStats(self._get(f"{EMBEDDING}/{name}/freq"))
        return None


def save_statistics(
    path: str,
    tensors: Dict[str, torch.Tensor],
    *,
    aliases: Dict[str, str],
    tokens: int,
    base_model_prefix: str,
    description: Dict[str, str],
) -> None:
    """Write atomically: a reader never sees a half-written file under the final name."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aliases": json.dumps(aliases, sort_keys=True),
        "tokens": str(tokens),
        "base_model_prefix": base_model_prefix,
        **{k: str(v) for k, v in description.items()},
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fingerprint(parts: Dict[str, str]) -> str:
    """A short stable hash of a settings dictionary (the cache key)."""
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def files_fingerprint(directory: str, patterns: Iterable[str] = ()) -> str:
    """Cheap identity of a model folder: names, sizes and modification times of its files.

    Hashing the bytes of multi-GB weights would cost more than the merge; a changed file
    changes its size or mtime, which is what a stale cache entry needs to notice.
    """
    h = hashlib.sha256()
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file() and (not patterns or any(entry.name.endswith(p) for p in patterns)):
            st = entry.stat()
            h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def bytes_fingerprint(paths: Iterable[str]) -> str:
    """Content hash of small files (tokenizer files)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as fp:
            h.update(fp.read())
    return h.hexdigest()[:32]
