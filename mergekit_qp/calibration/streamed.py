"""The layer-streamed statistics pass: one expert's calibration statistics computed a layer at a
time, so that memory does not grow with depth (no mergekit).

The checkpoint's own model class runs the embeddings, with every layer replaced by a stand-in
that records what the model hands it (layers.py). Then, for each layer: only that layer's
tensors are read from the safetensors files, the layer runs on every calibration batch with the
hook collector attached (the same accumulator and the same shared-input rule as the whole-model
pass), its statistics are written as one shard, and its outputs become the next layer's inputs.
Last, the model's own code runs what follows the layers (final norm, output head's input) on
the last layer's outputs. Held at any time: one layer in float32, its float64 sums, and the
hidden states of the calibration tokens (or, spilled to disk, one batch's).

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
from .layers import ARCHITECTURES, STATISTICS_ONLY, Backbone, Batch, SequentialUnsupported, TailStub, \
    layer_local_name, recording_stubs
from .models import output_head
from .store import INDEX_FILE, StatisticsError, save_tensors, statistics_metadata, write_index, write_json

LOG = logging.getLogger("mergekit_qp")

OUTER_FILE = "outer.safetensors"
RESUME_FILE = "resume.safetensors"
SPILL_MARKER = "hidden.json"  # the finished generation of spilled hidden states


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def streams(config, model_dir: str) -> bool:
    """Whether the layer-streamed pass applies: a layer adapter for the architecture and a
    safetensors checkpoint (anything else takes the guarded whole-model pass)."""
    has_safetensors = any(os.path.exists(os.path.join(model_dir, f))
                          for f in ("model.safetensors", "model.safetensors.index.json"))
    return getattr(config, "model_type", None) in {**ARCHITECTURES, **STATISTICS_ONLY} and has_safetensors


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
                        after_layer: Optional[Callable[[int], None]] = None, spill: bool = False,
                        gram_dtype: torch.dtype = torch.float32) -> str:
    """Compute the statistics of `model_dir` on `batches` of (input_ids, mask) into `folder` (a
    shard folder, see store.py) and return it. `resume_every`: seconds between saves of the
    hidden states (None: never; 0: after every layer). `after_layer(index)` is called as each
    layer's shard is written. `spill`: keep the hidden states on disk beside the shards, one
    batch in memory at a time (for calibration sets whose hidden states do not fit).
    `gram_dtype`: the stored input Grams' dtype (statistics_dtype)."""
    partial = folder + ".partial"
    os.makedirs(partial, exist_ok=True)
    try:
        return _run(model_dir, config, batches, device, folder, partial, description, resume_every, after_layer,
                    spill, gram_dtype)
    except Exception:
        # An error (bad weights, a failed write) would recur on resuming: leave nothing behind.
        # A kill, or Ctrl-C, keeps the folder, to resume from.
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _run(model_dir, config, batches, device, folder: str, partial: str, description, resume_every,
         after_layer, spill: bool, gram_dtype: torch.dtype) -> str:
    from tqdm.auto import tqdm

    backbone = Backbone(config, sequential=False)
    weights = _Weights(model_dir)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    hidden = HiddenStates(partial, [tuple(mask.shape) + (width,) for _, mask in batches], spill)
    first = hidden.resume(backbone.num_layers)

    # Embeddings: the model's own code, with stand-ins recording each layer's arguments.
    sink: List = []
    model, layers_path = backbone.outer_model(weights.outer, device, recording_stubs(backbone.num_layers, sink))
    outer = StatisticsCollector(model, hook=lambda name: not name.startswith(layers_path + "."))
    states: List[Batch] = []
    for b, (input_ids, mask) in enumerate(batches):
        sink.clear()
        outer.observe(input_ids.to(device), mask.to(device))
        if len(sink) != backbone.num_layers:
            raise SequentialUnsupported(f"output_qp: {model_dir!r}: the model did not call each of its layers once")
        if first == 0:
            hidden.write(b, sink[0][0].float())
        states.append(Batch(hidden=None, mask=mask.bool().to(device),
                            layer_arguments=[arguments for _, arguments in sink]))
    sink.clear()
    if first == 0:
        hidden.advance(0)
    before = outer.tensors(gram_dtype)
    aliases, transposed = dict(outer.aliases), list(outer.transposed)
    seen = {key.split("/")[1] for key in before} | set(outer.aliases)
    outer.close()
    del model

    last_save = time.monotonic()
    bar = tqdm(total=backbone.num_layers, initial=first, unit="layer",
               desc=f"output_qp statistics {os.path.basename(model_dir.rstrip('/'))}")
    for index in range(first, backbone.num_layers):
        layer = backbone.layer(index, weights.layer(index), device)
        collector = StatisticsCollector(layer)
        for b, state in enumerate(states):
            x = hidden.read(b, device)
            out = collector.run(state.mask, lambda: state.call(layer, index, x))
            hidden.write(b, (out[0] if isinstance(out, (tuple, list)) else out).float())
            del x, out
        collector.close()
        named, layer_aliases, layer_transposed = _prefixed(collector, collector.tensors(gram_dtype),
                                                            f"{layers_path}.{index}.")
        _save(model_dir, partial, layer_file(index), named,
              {"aliases": json.dumps(layer_aliases), "transposed": json.dumps(layer_transposed)})
        del layer, collector, named
        hidden.advance(index + 1)  # spilled: a resume point after every layer
        if not spill and resume_every is not None and time.monotonic() - last_save >= resume_every:
            hidden.save_resume_point(index + 1)
            last_save = time.monotonic()
        bar.update(1)
        if after_layer is not None:
            after_layer(index)
    bar.close()

    # What follows the layers (final norm, the output head's input), by the model's own code. The
    # weights outside the layers are read again rather than held through the layers (memory.py).
    last: List[torch.Tensor] = []
    stubs = nn.ModuleList(TailStub(i == backbone.num_layers - 1, last) for i in range(backbone.num_layers))
    model, _ = backbone.outer_model(weights.outer, device, stubs)
    tail = StatisticsCollector(model, stop_after=output_head(model),
                               hook=lambda name: name not in seen and not name.startswith(layers_path + "."))
    for b, (input_ids, mask) in enumerate(batches):
        last[:] = [hidden.read(b, device)]
        tail.observe(input_ids.to(device), mask.to(device))
    last.clear()
    tail.close()
    after = tail.tensors(gram_dtype)
    aliases.update(tail.aliases)
    transposed += tail.transposed
    base_model_prefix = getattr(model, "base_model_prefix", "") or ""
    del model, states, hidden
    for key, value in {**before, **after}.items():
        if not torch.isfinite(value).all():
            raise StatisticsError(f"output_qp: model {model_dir!r}: non-finite calibration statistics for "
                                  f"{key.split('/')[1]} (the model's activations overflow or contain NaN)")
    _save(model_dir, partial, OUTER_FILE, {**before, **after})
    return _finish(partial, folder, backbone.num_layers, aliases, transposed, base_model_prefix,
                   tokens=sum(int(mask.sum()) for _, mask in batches), description=description)


class HiddenStates:
    """The calibration hidden states between layers, per batch: in memory, or spilled to the
    partial folder, one file per batch, in two generations (a layer reads one and writes the
    other; a marker naming the finished one is a resume point, after every layer)."""

    def __init__(self, partial: str, shapes: List[tuple], spill: bool):
        self.partial, self.shapes, self.spill = partial, shapes, spill
        self.current: List[Optional[torch.Tensor]] = [None] * len(shapes)
        self.next: List[Optional[torch.Tensor]] = [None] * len(shapes)
        self.generation = 0

    def _path(self, generation: int, b: int) -> str:
        return os.path.join(self.partial, f"hidden-{generation}", f"{b:05d}.safetensors")

    def read(self, b: int, device) -> torch.Tensor:
        if not self.spill:
            return self.current[b]
        with safe_open(self._path(self.generation, b), framework="pt") as f:
            return f.get_tensor("hidden").to(device)

    def write(self, b: int, tensor: torch.Tensor) -> None:
        """Batch b's input to the next layer."""
        if not self.spill:
            self.next[b] = tensor
            return
        try:
            save_tensors(self._path(1 - self.generation, b), {"hidden": tensor.cpu()})
        except Exception as error:
            raise StatisticsError(f"output_qp: cannot spill hidden states to {self.partial}: {error} (free space "
                                  "there, or set cache_dir / MERGEKIT_QP_CACHE to another folder)") from error

    def advance(self, next_layer: int) -> None:
        """Every batch written: the outputs become the inputs."""
        if not self.spill:
            self.current, self.next = self.next, [None] * len(self.shapes)
            return
        self.generation = 1 - self.generation
        if next_layer > 0:
            write_json(os.path.join(self.partial, SPILL_MARKER), {"next_layer": next_layer,
                                                                   "generation": self.generation})

    def save_resume_point(self, next_layer: int) -> None:
        """In memory: the hidden states beside the shards, for a killed pass to resume from."""
        save_tensors(os.path.join(self.partial, RESUME_FILE),
                     {f"hidden/{b}": t for b, t in enumerate(self.current)}, {"next_layer": str(next_layer)})

    def resume(self, num_layers: int) -> int:
        """The first layer still to run: after the last resume point of a killed pass, if it fits
        these batches and every shard before it is there; else 0."""
        try:
            first, hidden = self._saved()
        except Exception as error:  # unreadable, or from other batches: start again
            LOG.warning("output_qp: not resuming the statistics pass in %s (%s)", self.partial, error)
            return 0
        if first == 0:  # nothing saved: a fresh pass
            return 0
        shards = all(os.path.exists(os.path.join(self.partial, layer_file(i))) for i in range(first))
        if not (shards and first <= num_layers):
            LOG.warning("output_qp: not resuming the statistics pass in %s (its shards are not all there)", self.partial)
            return 0
        if hidden is not None:
            self.current = hidden
        LOG.info("output_qp: resuming the statistics pass at layer %d from %s", first, self.partial)
        return first

    def _saved(self):
        if self.spill:
            marker = os.path.join(self.partial, SPILL_MARKER)
            if not os.path.exists(marker):
                return 0, None
            with open(marker) as fp:
                saved = json.load(fp)
            self.generation = int(saved["generation"])
            for b, shape in enumerate(self.shapes):
                with safe_open(self._path(self.generation, b), framework="pt") as f:
                    if tuple(f.get_slice("hidden").get_shape()) != shape:
                        raise ValueError(f"batch {b} has another shape")
            return int(saved["next_layer"]), None
        path = os.path.join(self.partial, RESUME_FILE)
        if not os.path.exists(path):
            return 0, None
        with safe_open(path, framework="pt") as saved:
            if set(saved.keys()) != {f"hidden/{b}" for b in range(len(self.shapes))}:
                raise ValueError("another number of batches")
            hidden = [saved.get_tensor(f"hidden/{b}") for b in range(len(self.shapes))]
            if any(tuple(h.shape) != shape for h, shape in zip(hidden, self.shapes)):
                raise ValueError("batches of other shapes")
            return int((saved.metadata() or {})["next_layer"]), hidden


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
    for leftover in (RESUME_FILE, SPILL_MARKER, "hidden-0", "hidden-1"):  # resume points
        path = os.path.join(partial, leftover)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    metadata = statistics_metadata(aliases=aliases, transposed=transposed, tokens=tokens,
                                   base_model_prefix=base_model_prefix, description=description)
    write_index(partial, metadata, files)
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished the same statistics first: theirs are equal
        if not os.path.exists(os.path.join(folder, INDEX_FILE)):
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return folder
