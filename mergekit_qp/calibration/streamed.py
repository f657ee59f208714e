"""The layer-streamed statistics pass: one expert's calibration statistics computed a layer at a
time, so that memory does not grow with depth (no mergekit).

The checkpoint's own model class runs the embeddings, with every layer replaced by a stand-in
that records what the model hands it (layers.py). Then, for each layer: only that layer's
tensors are read from the safetensors files, the layer runs on every calibration batch with the
hook collector attached (the same accumulator and the same shared-input rule as the whole-model
pass), its statistics are written as one shard, and its outputs become the next layer's inputs.
Last, the model's own code runs what follows the layers (final norm, output head's input) on
the last layer's outputs. Held at any time: one layer in float32, its float64 sums, and the
hidden states of the calibration tokens.

Shards go into `<folder>.partial/`; the folder gets its final name when the index is written,
so a reader never sees a half-made folder. With `resume_every` seconds between them, the
hidden states are saved beside the shards, so a killed (or interrupted) pass starts again
after the last saved layer rather than at the first; a pass that fails with an error removes
its partial folder, since the error would recur.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import Checkpoint
from .collector import StatisticsCollector
from .layers import ARCHITECTURES, Backbone, Batch, SequentialUnsupported, TailStub, layer_local_name, \
    recording_stubs
from .models import output_head
from .store import StatisticsError, save_tensors, statistics_metadata, write_index

LOG = logging.getLogger("mergekit_qp")

OUTER_FILE = "outer.safetensors"
RESUME_FILE = "resume.safetensors"


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def streams(config, model_dir: str) -> bool:
    """Whether the layer-streamed pass applies: a layer adapter for the architecture and a
    safetensors checkpoint (anything else takes the guarded whole-model pass)."""
    has_safetensors = any(os.path.exists(os.path.join(model_dir, f))
                          for f in ("model.safetensors", "model.safetensors.index.json"))
    return getattr(config, "model_type", None) in ARCHITECTURES and has_safetensors


class _Weights:
    """A checkpoint's tensors by layer, read one layer at a time and checked to be finite."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.checkpoint = Checkpoint(model_dir)
        self.by_layer: Dict[int, Dict[str, str]] = {}
        for key in self.checkpoint.files:
            parsed = layer_local_name(key)
            if parsed is not None:
                self.by_layer.setdefault(parsed[0], {})[parsed[1]] = key

    def _checked(self, key: str) -> torch.Tensor:
        tensor = self.checkpoint.get(key, required=True)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"output_qp: model {self.model_dir!r} has NaN or Inf in tensor {key}")
        return tensor

    def outer(self, name: str) -> Optional[torch.Tensor]:
        key = self.checkpoint.name(name)
        return None if key is None else self._checked(key)

    def layer(self, index: int) -> Dict[str, torch.Tensor]:
        return {local: self._checked(key) for local, key in self.by_layer.get(index, {}).items()}


def _prefixed(collector: StatisticsCollector, tensors: Dict[str, torch.Tensor], prefix: str):
    """A layer collector's statistics under the full model's module names."""
    named = {}
    for key, value in tensors.items():
        kind, module, statistic = key.split("/")
        named[f"{kind}/{prefix}{module}/{statistic}"] = value
    aliases = {prefix + k: prefix + v for k, v in collector.aliases.items()}
    return named, aliases, [prefix + t for t in collector.transposed]


@torch.no_grad()
def streamed_statistics(model_dir: str, config, batches: Sequence, device: torch.device, folder: str, *,
                        description: Dict[str, str], resume_every: Optional[float] = 120.0,
                        after_layer: Optional[Callable[[int], None]] = None) -> str:
    """Compute the statistics of `model_dir` on `batches` of (input_ids, mask) into `folder` (a
    shard folder, see store.py) and return it. `resume_every`: seconds between saves of the
    hidden states (None: never; 0: after every layer). `after_layer(index)` is called as each
    layer's shard is written."""
    partial = folder + ".partial"
    os.makedirs(partial, exist_ok=True)
    try:
        return _run(model_dir, config, batches, device, folder, partial, description, resume_every, after_layer)
    except Exception:
        # An error (bad weights, a failed write) would recur on resuming: leave nothing behind.
        # A kill, or Ctrl-C, keeps the folder, to resume from.
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _run(model_dir, config, batches, device, folder: str, partial: str, description, resume_every,
         after_layer) -> str:
    from tqdm.auto import tqdm

    backbone = Backbone(config)
    weights = _Weights(model_dir)

    # Embeddings: the model's own code, with stand-ins recording each layer's arguments.
    sink: List = []
    model, layers_path = backbone.outer_model(weights.outer, device, recording_stubs(backbone.num_layers, sink))
    outer = StatisticsCollector(model, hook=lambda name: not name.startswith(layers_path + "."))
    states: List[Batch] = []
    for input_ids, mask in batches:
        sink.clear()
        outer.observe(input_ids.to(device), mask.to(device))
        if len(sink) != backbone.num_layers:
            raise SequentialUnsupported(f"output_qp: {model_dir!r}: the model did not call each of its layers once")
        states.append(Batch(hidden=sink[0][0].float(), mask=mask.bool().to(device),
                            layer_arguments=[arguments for _, arguments in sink]))
    sink.clear()
    before = outer.tensors()
    aliases, transposed = dict(outer.aliases), list(outer.transposed)
    seen = {key.split("/")[1] for key in before} | set(outer.aliases)
    outer.close()
    del model

    first = _resume(partial, states, backbone.num_layers)
    last_save = time.monotonic()
    bar = tqdm(total=backbone.num_layers, initial=first, unit="layer",
               desc=f"output_qp statistics {os.path.basename(model_dir.rstrip('/'))}")
    for index in range(first, backbone.num_layers):
        layer = backbone.layer(index, weights.layer(index), device)
        collector = StatisticsCollector(layer)
        outputs = []
        for state in states:
            out = collector.run(state.mask, lambda: state.call(layer, index))
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out).float())
        collector.close()
        named, layer_aliases, layer_transposed = _prefixed(collector, collector.tensors(), f"{layers_path}.{index}.")
        _save(model_dir, partial, layer_file(index), named,
              {"aliases": json.dumps(layer_aliases), "transposed": json.dumps(layer_transposed)})
        del layer, collector, named
        for state, out in zip(states, outputs):
            state.hidden = out
        del outputs
        if resume_every is not None and time.monotonic() - last_save >= resume_every:
            _save(model_dir, partial, RESUME_FILE, {f"hidden/{b}": s.hidden for b, s in enumerate(states)},
                  {"next_layer": str(index + 1)})
            last_save = time.monotonic()
        bar.update(1)
        if after_layer is not None:
            after_layer(index)
    bar.close()

    # What follows the layers (final norm, the output head's input), by the model's own code.
    last: List[torch.Tensor] = []
    stubs = nn.ModuleList(TailStub(i == backbone.num_layers - 1, last) for i in range(backbone.num_layers))
    model, _ = backbone.outer_model(weights.outer, device, stubs)
    tail = StatisticsCollector(model, stop_after=output_head(model),
                               hook=lambda name: name not in seen and not name.startswith(layers_path + "."))
    for (input_ids, mask), state in zip(batches, states):
        last[:] = [state.hidden]
        tail.observe(input_ids.to(device), mask.to(device))
    tail.close()
    after = tail.tensors()
    aliases.update(tail.aliases)
    transposed += tail.transposed
    base_model_prefix = getattr(model, "base_model_prefix", "") or ""
    del model, states
    for key, value in {**before, **after}.items():
        if not torch.isfinite(value).all():
            raise StatisticsError(f"output_qp: model {model_dir!r}: non-finite calibration statistics for "
                                  f"{key.split('/')[1]} (the model's activations overflow or contain NaN)")
    _save(model_dir, partial, OUTER_FILE, {**before, **after})
    return _finish(partial, folder, backbone.num_layers, aliases, transposed, base_model_prefix,
                   tokens=sum(int(mask.sum()) for _, mask in batches), description=description)


def _save(model_dir: str, partial: str, name: str, tensors: Dict[str, torch.Tensor],
          metadata: Optional[Dict[str, str]] = None) -> None:
    """One file of the folder, written atomically; a failed write (a full disk) says where and
    what to do."""
    try:
        save_tensors(os.path.join(partial, name), tensors, metadata)
    except Exception as error:  # OSError, or safetensors' own error type for a failed write
        raise StatisticsError(
            f"output_qp: cannot write the statistics of {model_dir!r} to the cache folder {partial}: {error} "
            "(free space there, or set cache_dir / MERGEKIT_QP_CACHE to another folder)") from error


def _finish(partial: str, folder: str, num_layers: int, aliases: Dict[str, str], transposed: List[str],
            base_model_prefix: str, tokens: int, description: Dict[str, str]) -> str:
    files = [OUTER_FILE] + [layer_file(i) for i in range(num_layers)]
    for name in files[1:]:
        with safe_open(os.path.join(partial, name), framework="pt") as shard:
            meta = shard.metadata() or {}
        aliases.update(json.loads(meta.get("aliases", "{}")))
        transposed += json.loads(meta.get("transposed", "[]"))
    if os.path.exists(os.path.join(partial, RESUME_FILE)):
        os.remove(os.path.join(partial, RESUME_FILE))
    metadata = statistics_metadata(aliases=aliases, transposed=transposed, tokens=tokens,
                                   base_model_prefix=base_model_prefix, description=description)
    write_index(partial, metadata, files)
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished the same statistics first: theirs are equal
        if not os.path.exists(os.path.join(folder, "statistics.json")):
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _resume(partial: str, states: List[Batch], num_layers: int) -> int:
    """The first layer still to run: after the saved hidden states of a killed pass, if they fit
    these batches and every shard before them is there; else 0."""
    path = os.path.join(partial, RESUME_FILE)
    if not os.path.exists(path):
        return 0
    try:
        with safe_open(path, framework="pt") as saved:
            first = int((saved.metadata() or {})["next_layer"])
            hidden = [saved.get_tensor(f"hidden/{b}") for b in range(len(states))]
            if set(saved.keys()) != {f"hidden/{b}" for b in range(len(states))}:
                raise ValueError("another number of batches")
    except Exception as error:  # unreadable, or from other batches: start again
        LOG.warning("output_qp: not resuming from %s (%s)", path, error)
        return 0
    shapes_fit = all(h.shape == s.hidden.shape for h, s in zip(hidden, states))
    shards = all(os.path.exists(os.path.join(partial, layer_file(i))) for i in range(first))
    if not (shapes_fit and shards and 0 < first <= num_layers):
        LOG.warning("output_qp: not resuming from %s (it does not fit the shards or batches there)", path)
        return 0
    for state, h in zip(states, hidden):
        state.hidden = h.to(state.hidden.device)
    LOG.info("output_qp: resuming the statistics pass at layer %d from %s", first, path)
    return first
