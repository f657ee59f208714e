"""The hook collector: one forward pass of a whole model over calibration batches, with hooks
on every linear map (GPT-2's Conv1D included), norm and embedding, summed by the one
accumulator of core/statistics.py (no mergekit, no transformers).

Padding never enters: every hook keeps only the positions where the attention mask is true.
Projections that read the same tensor (q/k/v, gate/up) share one Gram, stored once.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..core.statistics import Accumulator, is_conv1d, is_linear, is_norm, normalised_input
from .store import EMBEDDING, LINEAR, NORM, StatisticsError


class EndOfPass(Exception):
    """Raised by a hook once the pass has what it needs (the output head's input, the last
    layer's arguments): ends the forward early."""


class StatisticsCollector:
    """Attach hooks to a model, run calibration batches through it, return the statistics."""

    def __init__(self, model: nn.Module, stop_after: Optional[str] = None,
                 hook: Callable[[str], bool] = lambda name: True):
        """`stop_after`: a module whose input is the last statistic the pass needs (the output
        head): the forward pass ends there, so logits (tokens × vocabulary) are never computed.
        `hook`: which modules (by name) get statistics; the layer-streamed pass hooks a layer
        at a time and the modules outside the layers separately."""
        self.model = model
        self._mask: Optional[torch.Tensor] = None
        self._keep: Optional[torch.Tensor] = None  # flat indices of real tokens, None if no padding
        self._linear: Dict[str, Accumulator] = {}
        self._norm: Dict[str, Accumulator] = {}
        self.transposed: List[str] = []  # GPT-2 Conv1D modules (weight stored in × out)
        self._embedding_counts: Dict[str, torch.Tensor] = {}
        self._embedding_tokens: Dict[str, int] = {}
        # Projections reading the tensor that the previous projection read share its Gram.
        self.aliases: Dict[str, str] = {}
        self._last_input: Optional[torch.Tensor] = None
        self._last_key: Optional[str] = None
        self._skipped: Dict[str, str] = {}
        self._tokens: Optional[int] = None  # set when tensors() releases the float64 sums
        self._handles = []
        for name, module in model.named_modules():
            if not hook(name):
                continue
            if is_linear(module):
                if is_conv1d(module):
                    self.transposed.append(name)
                self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            elif is_norm(module):
                self._handles.append(module.register_forward_pre_hook(self._norm_hook(name)))
            elif isinstance(module, nn.Embedding):
                self._handles.append(
                    module.register_forward_pre_hook(self._embedding_hook(name, module.num_embeddings))
                )
        if stop_after is not None:  # registered after its statistics hook, so that one runs first
            self._handles.append(model.get_submodule(stop_after).register_forward_pre_hook(self._stop_hook))

    def _stop_hook(self, module, args):
        raise EndOfPass

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
            self._linear.setdefault(name, Accumulator("full")).add(rows)
            self._last_input, self._last_key = x, name

        return hook

    def _norm_hook(self, name: str):
        def hook(module, args):
            rows = self._rows(name, args[0])
            if rows is not None:
                self._norm.setdefault(name, Accumulator("diagonal")).add(normalised_input(module, rows))

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
        self.run(attention_mask, lambda: self.model(input_ids=input_ids, attention_mask=attention_mask.long()))

    @torch.no_grad()
    def run(self, attention_mask: torch.Tensor, forward: Callable[[], object]):
        """`forward()` (any call that runs the hooked modules on one batch of token layout
        `attention_mask`) with statistics taken; its result, or None when a hook ended it."""
        self._mask = attention_mask.bool()
        flat = self._mask.reshape(-1)
        self._keep = None if bool(flat.all()) else flat.nonzero().squeeze(1)
        self._last_input = self._last_key = None
        try:
            return forward()
        except EndOfPass:
            return None
        finally:
            self._last_input = self._last_key = None

    def all_reduce(self, group=None) -> None:
        """Sum every statistic over the processes of a torch.distributed group, each having
        observed its share of the calibration batches (docs/scale.md, "Past one machine"). Every
        process must have hooked the same modules and seen every one of them."""
        import torch.distributed as dist

        for name in sorted(self._linear):
            self._linear[name].all_reduce(group)
        for name in sorted(self._norm):
            self._norm[name].all_reduce(group)
        for name in sorted(self._embedding_counts):
            dist.all_reduce(self._embedding_counts[name], op=dist.ReduceOp.SUM, group=group)
            tokens = torch.tensor([float(self._embedding_tokens[name])], dtype=torch.float64)
            dist.all_reduce(tokens, op=dist.ReduceOp.SUM, group=group)
            self._embedding_tokens[name] = int(tokens.item())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def skipped(self) -> Dict[str, str]:
        return dict(self._skipped)

    def tensors(self, gram_dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """Float32 means keyed ``<kind>/<module>/<statistic>``, the input Grams in `gram_dtype`
        (rounded once from the float64 sums). Each module's float64 sums are released as its
        means are made, so the pass never holds both for the whole model."""
        self._tokens = self.token_count()
        out: Dict[str, torch.Tensor] = {}
        for name, m in self._linear.items():
            out[f"{LINEAR}/{name}/gram"] = m.second_moment().to(gram_dtype).cpu()
            out[f"{LINEAR}/{name}/mean"] = m.mean().float().cpu()
            m.release()
        for name, m in self._norm.items():
            out[f"{NORM}/{name}/m2"] = m.second_moment().float().cpu()
            out[f"{NORM}/{name}/m1"] = m.mean().float().cpu()
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
        if self._tokens is not None:
            return self._tokens
        counts = [m.count for m in self._linear.values()] + list(self._embedding_tokens.values())
        return max(counts, default=0)
