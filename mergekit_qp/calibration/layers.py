"""Running one transformer layer at a time, for sequential merging (no mergekit here).

The model is built as a transformers skeleton on the meta device, so no weights are
allocated. The embeddings are run by the model's own forward with every layer replaced by a
stub that records what the model hands it (hidden states, attention mask, rotary
embeddings, ...) and stops; a layer is then built alone from its weights and called with
exactly those arguments. Masks, position handling and attention kernels are therefore the
model's own, for every architecture whose layers are called this way.

Within a layer, the modules whose parameters are merged (linear maps, GPT-2's Conv1D, norms)
are grouped into *stages*: the modules that read the same tensor (q/k/v, gate/up) form one
stage, in the order the layer first calls them. The inputs of a stage depend only on the
stages before it, so they can be recomputed with those stages already merged.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.statistics import is_linear, is_norm, normalised_input
from .collector import EndOfPass

# model_type → attribute path of the layer list in the transformers backbone (AutoModel)
ARCHITECTURES = {
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "gpt2": "h",
    "bert": "encoder.layer",
}
# Architectures whose layers the layer-streamed statistics pass runs (statistics checked equal
# to the whole-model pass's), not yet sequential merging: Gemma's norms scale by (1 + w), which
# the expert-output target's norm problem does not model.
STATISTICS_ONLY = {"phi3": "layers", "gemma2": "layers", "gemma3_text": "layers"}
_LAYER_NAME = re.compile(r"^(?:.*\.)?(?:layers|h|layer)\.(\d+)\.(.+)$")


class SequentialUnsupported(ValueError):
    """An architecture (or layer layout) without sequential support."""


def layer_local_name(name: str) -> Optional[Tuple[int, str]]:
    """(layer index, name inside the layer) of a checkpoint tensor name, or None."""
    match = _LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class Batch:
    """One right-padded calibration batch of one stream: the layer's input hidden states,
    the token mask, and the other arguments the model passes to each of its layers."""

    hidden: torch.Tensor  # batch × tokens × features, float32
    mask: torch.Tensor  # batch × tokens, bool
    layer_arguments: List[Tuple[tuple, Dict]] = field(repr=False, default_factory=list)  # per layer index

    def call(self, layer: nn.Module, index: int, hidden: Optional[torch.Tensor] = None):
        """`layer` (model layer `index`) on these hidden states, as the model calls it."""
        args, kwargs = self.layer_arguments[index]
        return layer(self.hidden if hidden is None else hidden, *args, **kwargs)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The (tokens × features) rows of a module input at the real (unpadded) tokens."""
        if x.ndim < 3 or tuple(x.shape[:2]) != tuple(self.mask.shape):
            raise SequentialUnsupported(f"a module input of shape {tuple(x.shape)} does not follow the token layout")
        rows = x.reshape(self.mask.numel(), -1, x.shape[-1])[self.mask.reshape(-1)]
        return rows.reshape(-1, x.shape[-1])


class Backbone:
    """The architecture of the base model, without weights."""

    def __init__(self, config, sequential: bool = True):
        """`sequential`: for sequential merging (else for the layer-streamed statistics pass,
        which runs more architectures)."""
        import transformers

        model_type = getattr(config, "model_type", None)
        known = ARCHITECTURES if sequential else {**ARCHITECTURES, **STATISTICS_ONLY}
        if model_type not in known:
            raise SequentialUnsupported(
                f"output_qp: sequential: true does not support the {model_type!r} architecture "
                f"({', '.join(getattr(config, 'architectures', None) or [])}); supported: "
                f"{', '.join(sorted(ARCHITECTURES))}. Set sequential: false (independent statistics work for any model)."
            )
        config = copy.deepcopy(config)
        config.use_cache = False
        with torch.device("meta"):
            self.model = transformers.AutoModel.from_config(config)
        self.model.eval()
        self.config = config
        self.layers_path = known[model_type]
        self.layers: nn.ModuleList = self.model.get_submodule(self.layers_path)
        self.num_layers = len(self.layers)

    # -- weights --------------------------------------------------------------------------
    def layer(self, index: int, weights: Dict[str, torch.Tensor], device) -> nn.Module:
        """Layer `index` with the given weights (names inside the layer), float32, eval mode."""
        module = copy.deepcopy(self.layers[index]).to_empty(device=device).eval()
        _load(module, weights, f"layer {index}", device)
        return module

    def driver(self, outer_weights: Dict[str, torch.Tensor], device, sink: List) -> nn.Module:
        """The backbone with real embeddings (and buffers) and every layer replaced by a stub
        that appends its arguments to `sink`; the last stub stops the forward pass."""
        driver = _with_stand_ins(copy.deepcopy(self.model), self.layers_path, recording_stubs(self.num_layers, sink),
                                 device)
        names = dict(driver.named_parameters())
        params = {}
        for name in names:
            match = _match_outer(name, outer_weights)
            if match is not None:
                params[name] = match
        _load(driver, params, "embeddings", device, require=_reachable_parameters(driver, self.layers_path))
        return driver.eval()

    def outer_model(self, tensor_of: Callable[[str], Optional[torch.Tensor]], device,
                    stubs: nn.ModuleList) -> Tuple[nn.Module, str]:
        """The checkpoint's own model class (its output head included) with the weights outside
        the layers, from `tensor_of(parameter name)`, and `stubs` in place of the layers; returns
        it with the path of the layer list in it."""
        from .models import meta_model

        model = meta_model(self.config)
        path = self.layers_path
        prefix = getattr(model, "base_model_prefix", "") or ""
        if prefix and hasattr(model, prefix) and _submodule(model, path) is None:
            path = f"{prefix}.{path}"
        model = _with_stand_ins(model, path, stubs, device)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        missing, weights = [], {}
        for name, parameter in model.named_parameters():
            tensor = tensor_of(name)
            if tensor is None:
                if head is not None and parameter is head.weight and getattr(self.config, "tie_word_embeddings", False):
                    continue  # a tied output head is stored once, as the input embedding
                missing.append(name)
            else:
                weights[name] = tensor
        if missing:
            raise SequentialUnsupported(f"no tensor for parameter(s) {', '.join(missing)} in the checkpoint")
        _load(model, weights, "the weights outside the layers", device, require=list(weights))
        if head is not None and not any(head.weight is p for n, p in model.named_parameters() if n in weights):
            head.weight = model.get_input_embeddings().weight
        return model.eval(), path


def _with_stand_ins(model: nn.Module, layers_path: str, stubs: nn.ModuleList, device) -> nn.Module:
    """A meta-device model with `stubs` in place of its layer list, materialised on `device`
    (weights still to load)."""
    parent, _, attr = layers_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, stubs)
    model.to_empty(device=device)
    for module in model.modules():  # buffers (rotary frequencies, position ids) are computed, not loaded
        model._init_weights(module)
    return model


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _match_outer(name: str, weights: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The merge tensor for a backbone parameter name (checkpoint names may carry a prefix)."""
    if name in weights:
        return weights[name]
    return next((t for key, t in weights.items() if key.endswith("." + name)), None)


def _reachable_parameters(driver: nn.Module, layers_path: str) -> List[str]:
    """Parameters used before the first layer: everything but the final norm / pooler."""
    late = ("norm.", "ln_f.", "pooler.", "final_layernorm.")
    return [n for n, _ in driver.named_parameters() if not n.startswith(late)]


def _load(module: nn.Module, weights: Dict[str, torch.Tensor], what: str, device, require=None) -> None:
    state = dict(module.named_parameters())
    needed = set(require if require is not None else state)
    missing = sorted(needed - set(weights))
    if missing:
        raise SequentialUnsupported(f"output_qp: no tensor for {what} parameter(s) {', '.join(missing)}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in state:
                continue
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise SequentialUnsupported(
                    f"output_qp: {what} parameter {name} has shape {tuple(tensor.shape)}, "
                    f"the architecture expects {tuple(state[name].shape)}"
                )
            state[name].copy_(tensor.to(device=device, dtype=torch.float32))
    module.float()


class _Stub(nn.Module):
    def __init__(self, index: int, sink: List, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, (args, kwargs)))
        if self.last:
            raise EndOfPass
        return hidden_states


class TailStub(nn.Module):
    """A layer stand-in that passes hidden states on; the last hands over the real last
    layer's output (`output[0]`, set per batch), so the model's own code runs what follows."""

    def __init__(self, last: bool, output: List):
        super().__init__()
        self.last, self.output = last, output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output[0] if self.last else hidden_states


def recording_stubs(num_layers: int, sink: List) -> nn.ModuleList:
    """Stand-ins that record each layer's arguments; the last ends the forward pass."""
    return nn.ModuleList(_Stub(i, sink, last=i == num_layers - 1) for i in range(num_layers))


@torch.no_grad()
def embed(backbone: Backbone, outer_weights: Dict[str, torch.Tensor], batches, device) -> List[Batch]:
    """The first layer's inputs (and every layer's other arguments) for calibration batches
    of (input_ids, mask), through the model's own embedding code."""
    sink: List = []
    driver = backbone.driver(outer_weights, device, sink)
    out = []
    for input_ids, mask in batches:
        sink.clear()
        try:
            driver(input_ids=input_ids.to(device), attention_mask=mask.long().to(device))
        except EndOfPass:
            pass
        if len(sink) != backbone.num_layers or any(h.shape != sink[0][0].shape for h, _ in sink):
            raise SequentialUnsupported(
                "output_qp sequential: the model did not pass each layer's hidden states on unchanged "
                "(this transformers version calls its layers differently)"
            )
        out.append(Batch(hidden=sink[0][0].float(), mask=mask.bool().to(device),
                         layer_arguments=[arguments for _, arguments in sink]))
    return out


def run_layer(layer: nn.Module, index: int, batches: Sequence[Batch]) -> List[Batch]:
    """The layer's outputs, as the next layer's input batches."""
    with torch.no_grad():
        return [Batch(hidden=_first_tensor(b.call(layer, index)).float(), mask=b.mask,
                      layer_arguments=b.layer_arguments) for b in batches]


def hooked_modules(layer: nn.Module) -> Dict[str, nn.Module]:
    """The modules of a layer whose parameters have statistics: linear maps and norms."""
    return {name: m for name, m in layer.named_modules() if name and (is_linear(m) or is_norm(m))}


@torch.no_grad()
def stages(layer: nn.Module, index: int, batch: Batch) -> List[List[str]]:
    """The layer's modules in stages (see the module docstring), from one forward pass."""
    modules = hooked_modules(layer)
    seen: List[Tuple[str, torch.Tensor]] = []  # keeps every input alive, so identities stay unique
    handles = [m.register_forward_pre_hook(_recorder(name, seen)) for name, m in modules.items()]
    try:
        batch.call(layer, index)
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    by_input: Dict[int, List[str]] = {}
    for name, x in seen:
        if name in {n for g in groups for n in g}:
            continue  # a module called twice keeps its first stage
        if is_norm(modules[name]) or id(x) not in by_input:
            groups.append([name])
            if not is_norm(modules[name]):
                by_input[id(x)] = groups[-1]
        else:
            by_input[id(x)].append(name)
    return groups


def _recorder(name, seen):
    def hook(module, args):
        seen.append((name, args[0]))
    return hook


@torch.no_grad()
def stage_inputs(layer: nn.Module, index: int, module_name: str, batches: Sequence[Batch]) -> List[torch.Tensor]:
    """The real-token rows that `module_name` reads, per batch (the forward stops there)."""
    module = layer.get_submodule(module_name)
    captured: List[torch.Tensor] = []

    def hook(mod, args):
        captured.append(args[0])
        raise EndOfPass

    handle = module.register_forward_pre_hook(hook)
    rows = []
    try:
        for b in batches:
            captured.clear()
            try:
                b.call(layer, index)
            except EndOfPass:
                pass
            if not captured:
                raise SequentialUnsupported(f"output_qp sequential: {module_name} was not called in layer {index}")
            rows.append(b.rows(captured[0]).float())
    finally:
        handle.remove()
    return rows


@torch.no_grad()
def all_module_inputs(layer: nn.Module, index: int, batches: Sequence[Batch],
                      names: Sequence[str]) -> Tuple[Dict[str, List[torch.Tensor]], List[Batch]]:
    """One full forward: the real-token input rows of each named module, per batch, and the
    layer's outputs (the next layer's inputs)."""
    modules = {n: layer.get_submodule(n) for n in names}
    rows: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    current: List[Batch] = []

    def make(name):
        def hook(mod, args):
            rows[name].append(current[0].rows(args[0]).float())
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    outputs = []
    try:
        for b in batches:
            current[:] = [b]
            out = _first_tensor(b.call(layer, index)).float()
            outputs.append(Batch(hidden=out, mask=b.mask, layer_arguments=b.layer_arguments))
    finally:
        for h in handles:
            h.remove()
    return rows, outputs


def normalised(layer: nn.Module, module_name: str, rows: torch.Tensor) -> torch.Tensor:
    """A norm's input rows after normalisation, before its learned scale (x̃)."""
    return normalised_input(layer.get_submodule(module_name), rows)

