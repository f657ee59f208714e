"""Self-contained demo assets: tiny models built locally, merged with `mergekit-yaml`, compared.

`build_demo(workdir)` builds, with no download of any kind:

* three text domains taken from the Python installation itself (present on every CPython):
  ``code``  -- source of top-level standard-library modules (``*.py`` next to ``os.py``,
  filtered by ``sys.stdlib_module_names``, so nothing from site-packages);
  ``prose`` -- the English help topics of ``pydoc_data.topics``;
  ``table`` -- a ``UnicodeData.txt``-like table generated from ``unicodedata``;
  each split deterministically (hash of the chunk's key) into train and held-out (10 %);
* a byte-level BPE tokenizer trained on the train split of the mixture;
* a tiny ``LlamaForCausalLM`` base trained briefly on the mixture, and one expert per domain
  continuing from the base on that domain only;
* per-domain calibration JSONL (train split only) and held-out JSONL files.

`run_comparison` writes a mergekit YAML per method, runs the stock ``mergekit-yaml`` CLI in a
subprocess and evaluates the held-out loss of every merged model per domain; `format_table`
renders the result.  This module never imports mergekit.

Command line: ``python -m mergekit_qp.demo [--workdir DIR] [--quick] [--methods a,b,c]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DOMAINS",
    "DEFAULT_METHODS",
    "DEFAULT_METHOD_PARAMETERS",
    "DemoSettings",
    "DemoAssets",
    "Document",
    "FULL_SETTINGS",
    "QUICK_SETTINGS",
    "build_demo",
    "domain_documents",
    "heldout_loss",
    "merge_config_dict",
    "write_merge_config",
    "run_merge",
    "run_comparison",
    "format_table",
    "find_mergekit_yaml",
    "main",
]

DOMAINS: Tuple[str, ...] = ("code", "prose", "table")
FORMAT_VERSION = 2
MARKER_NAME = "demo_assets.json"

# Built-in methods compared by default and their per-model parameters.  ties/dare_ties: every
# expert at weight 1 keeping half of its task vector (mergekit normalises the weights of
# ties-style merges by default, so the weight only matters relative to the others).
# task_arithmetic: base + (1/3) * sum of the three task vectors, i.e. the average update --
# on the demo models the best of the scalings 1/3, 0.5 and 1.0 (1.0, the plain sum, is much
# worse); it equals a uniform `linear` merge here.
DEFAULT_METHODS: Tuple[str, ...] = ("output_qp", "task_arithmetic", "ties", "dare_ties")
DEFAULT_METHOD_PARAMETERS: Dict[str, Dict[str, Any]] = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1 / 3},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    # each expert calibrated on the train split of its own domain
    "output_qp": {"calibration": "{calibration}"},
    "dare_linear": {"weight": 1 / 3, "density": 0.5},
    "breadcrumbs": {"weight": 1 / 3, "density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
}
# Methods whose config takes no base_model.
_NO_BASE_METHODS = {"linear"}
# Reserved keys of an `extra_parameters` dict (everything else is a per-model parameter).
_RESERVED = ("parameters", "per_model", "config", "merge_method")


# --------------------------------------------------------------------------------------
# settings and assets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the built assets (its hash names a build)."""

    chars_per_domain: int = 300_000
    chunk_chars: int = 600
    file_chars: int = 3_000  # per stdlib source file
    topic_chars: int = 12_000  # per pydoc help topic
    heldout_mod: int = 10  # 1 in heldout_mod chunks is held out
    calibration_samples: int = 64
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 176
    context: int = 128
    base_steps: int = 500
    base_lr: float = 3e-3
    base_warmup: int = 30
    expert_steps: int = 80
    expert_lr: float = 5e-4
    expert_warmup: int = 5
    batch_size: int = 16
    seed: int = 0
    threads: int = 0  # torch threads while building; 0: min(cpu count, 4)

    def digest(self) -> str:
        payload = {
            "settings": dataclasses.asdict(self),
            "format": FORMAT_VERSION,
            # the data come from the running Python's stdlib / Unicode database
            "python": "%d.%d.%d" % sys.version_info[:3],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


FULL_SETTINGS = DemoSettings()
QUICK_SETTINGS = DemoSettings(
    chars_per_domain=40_000,
    chunk_chars=400,
    file_chars=2_000,
    topic_chars=2_000,
    calibration_samples=16,
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=88,
    context=64,
    base_steps=60,
    base_lr=5e-3,
    base_warmup=5,
    expert_steps=30,
    expert_lr=3e-3,
    expert_warmup=2,
    batch_size=12,
    threads=1,
)


@dataclass
class DemoAssets:
    """Paths of a built demo (all absolute)."""

    workdir: Path
    base: Path
    experts: Dict[str, Path]
    calibration: Dict[str, Path]
    heldout: Dict[str, Path]
    tokenizer: Path
    settings: DemoSettings = FULL_SETTINGS
    digest: str = ""
    build_seconds: Optional[float] = None

    @property
    def domains(self) -> List[str]:
        return list(self.experts)

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "digest": self.digest,
            "settings": dataclasses.asdict(self.settings),
            "build_seconds": self.build_seconds,
            "base": str(self.base),
            "tokenizer": str(self.tokenizer),
            "experts": {k: str(v) for k, v in self.experts.items()},
            "calibration": {k: str(v) for k, v in self.calibration.items()},
            "heldout": {k: str(v) for k, v in self.heldout.items()},
        }


def _layout(workdir: Path, settings: DemoSettings, digest: str) -> DemoAssets:
    workdir = Path(workdir).resolve()
    return DemoAssets(
        workdir=workdir,
        base=workdir / "models" / "base",
        experts={d: workdir / "models" / f"expert_{d}" for d in DOMAINS},
        calibration={d: workdir / "data" / f"calibration_{d}.jsonl" for d in DOMAINS},
        heldout={d: workdir / "data" / f"heldout_{d}.jsonl" for d in DOMAINS},
        tokenizer=workdir / "tokenizer",
        settings=settings,
        digest=digest,
    )


def _assets_complete(assets: DemoAssets) -> bool:
    model_dirs = [assets.base, *assets.experts.values()]
    files = [*assets.calibration.values(), *assets.heldout.values()]
    return all((d / "config.json").is_file() and (d / "model.safetensors").is_file()
               and (d / "tokenizer.json").is_file() for d in model_dirs) and all(
        f.is_file() for f in files)


# --------------------------------------------------------------------------------------
# text domains
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    domain: str
    key: str
    text: str


def _is_heldout(domain: str, key: str, mod: int) -> bool:
    h = hashlib.sha1(f"{domain}/{key}".encode()).hexdigest()
    return int(h[:8], 16) % mod == 0


def _chunks(text: str, size: int) -> Iterable[str]:
    """Split at line boundaries into pieces of at most `size` characters (long lines are cut)."""
    buf: List[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            if buf:
                yield "".join(buf)
                buf, n = [], 0
            yield line[:size]
            line = line[size:]
        if n + len(line) > size and buf:
            yield "".join(buf)
            buf, n = [], 0
        buf.append(line)
        n += len(line)
    if buf:
        yield "".join(buf)


def _stdlib_sources() -> List[Tuple[str, str]]:
    """(module name, source) of top-level stdlib modules, in a fixed hash order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = getattr(sys, "stdlib_module_names", None)
    out = []
    for path in stdlib.glob("*.py"):
        if names is not None and path.stem not in names:
            continue  # e.g. _sysconfigdata_* (machine specific), __hello__
        try:
            out.append((path.stem, path.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    if not out:
        raise RuntimeError(f"no standard-library sources found in {stdlib}")
    out.sort(key=lambda item: hashlib.sha1(item[0].encode()).hexdigest())
    return out


def _code_texts(settings: DemoSettings) -> Iterable[Tuple[str, str]]:
    for name, source in _stdlib_sources():
        lines = source.splitlines(keepends=True)
        # start at the first top-level definition: more code, less licence/module docstring
        start = next((i for i, l in enumerate(lines) if l.startswith(("def ", "class "))), 0)
        yield name, "".join(lines[start:])[: settings.file_chars]


def _prose_texts(settings: DemoSettings) -> Iterable[Tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics, key=lambda k: hashlib.sha1(k.encode()).hexdigest()):
        yield name, topics[name][: settings.topic_chars]


_ALGORITHMIC_NAMES = ("CJK UNIFIED IDEOGRAPH-", "CJK COMPATIBILITY IDEOGRAPH-", "TANGUT IDEOGRAPH-",
                      "KHITAN SMALL SCRIPT CHARACTER-", "NUSHU CHARACTER-", "HANGUL SYLLABLE ",
                      "TANGUT COMPONENT-", "CUNEIFORM ", "EGYPTIAN HIEROGLYPH ")


def _table_texts(settings: DemoSettings) -> Iterable[Tuple[str, str]]:
    """Blocks of 8 rows of a UnicodeData.txt-like table, spread over all scripts."""
    import unicodedata

    rows = []
    for cp in range(0x20, 0x30000):
        ch = chr(cp)
        name = unicodedata.name(ch, None)
        if name is None or name.startswith(_ALGORITHMIC_NAMES):
            continue
        upper = ch.upper()
        lower = ch.lower()
        rows.append(";".join([
            f"{cp:04X}", name, unicodedata.category(ch), str(unicodedata.combining(ch)),
            unicodedata.bidirectional(ch), unicodedata.decomposition(ch),
            str(unicodedata.decimal(ch, "")), str(unicodedata.digit(ch, "")),
            str(unicodedata.numeric(ch, "")), "Y" if unicodedata.mirrored(ch) else "N",
            f"{ord(upper):04X}" if len(upper) == 1 and upper != ch else "",
            f"{ord(lower):04X}" if len(lower) == 1 and lower != ch else "",
        ]) + "\n")
    block = 8
    blocks = [rows[i:i + block] for i in range(0, len(rows), block)]
    total = sum(len(r) for r in rows)
    stride = max(1, round(total / max(1, settings.chars_per_domain)))
    for i in range(0, len(blocks), stride):
        yield f"{blocks[i][0][:6].rstrip(';')}", "".join(blocks[i])


_SOURCES = {"code": _code_texts, "prose": _prose_texts, "table": _table_texts}


def domain_documents(domain: str, settings: DemoSettings = FULL_SETTINGS) -> Tuple[List[Document], List[Document]]:
    """(train, heldout) documents of a domain; deterministic for a given Python version."""
    train: List[Document] = []
    heldout: List[Document] = []
    total = 0
    for name, text in _SOURCES[domain](settings):
        for i, chunk in enumerate(_chunks(text, settings.chunk_chars)):
            if not chunk.strip():
                continue
            doc = Document(domain, f"{name}#{i}", chunk)
            (heldout if _is_heldout(domain, doc.key, settings.heldout_mod) else train).append(doc)
            total += len(chunk)
            if total >= settings.chars_per_domain:
                return train, heldout
    return train, heldout


# --------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------


def _write_jsonl(path: Path, texts: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl_texts(path: Path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _train_tokenizer(texts: List[str], settings: DemoSettings, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=settings.context)
    fast.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir)
    return fast


def _portable_tokenizer_config(model_dir: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", unknown to transformers 4;
    "PreTrainedTokenizerFast" loads as the same class in both."""
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _encode_stream(tokenizer, texts: Sequence[str]):
    """Concatenate documents as <s> text </s> into one 1-D id tensor."""
    import torch

    ids: List[int] = []
    enc = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    for e in enc:
        ids.append(tokenizer.bos_token_id)
        ids.extend(e)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _train(model, streams: List[Any], steps: int, lr: float, warmup: int, settings: DemoSettings,
           seed: int, cosine: bool) -> List[float]:
    """AdamW on random windows; batch rows cycle over `streams` (balanced mixture)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if not cosine:
            return lr
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    n = settings.context
    model.train()
    losses = []
    for step in range(steps):
        rows = []
        for r in range(settings.batch_size):
            s = streams[(step * settings.batch_size + r) % len(streams)]
            start = int(torch.randint(0, len(s) - n + 1, (1,), generator=gen))
            rows.append(s[start:start + n])
        batch = torch.stack(rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch)  # HF shifts labels: next-token prediction
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach().item())
    model.eval()
    return losses


def _save_model(model, tokenizer, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir)


def build_demo(workdir: Path, *, quick: bool = False, settings: Optional[DemoSettings] = None,
               force: bool = False, verbose: bool = False) -> DemoAssets:
    """Build (or reuse) tokenizer, base, experts, calibration and held-out files under `workdir`.

    Idempotent: a marker JSON records the settings hash; a complete build with the same hash
    is returned as is.  `quick=True` uses the small `QUICK_SETTINGS` (seconds, for tests).
    """
    settings = settings or (QUICK_SETTINGS if quick else FULL_SETTINGS)
    digest = settings.digest()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    assets = _layout(workdir, settings, digest)
    marker = assets.workdir / MARKER_NAME
    if not force and marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("digest") == digest and _assets_complete(assets):
            assets.build_seconds = info.get("build_seconds")
            return assets
    if marker.exists():
        marker.unlink()

    def log(msg: str) -> None:
        if verbose:
            print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or max(1, min(4, os.cpu_count() or 1)))
    try:
        for d in (assets.workdir / "models", assets.workdir / "data", assets.tokenizer):
            if d.exists():
                shutil.rmtree(d)

        # data
        splits = {d: domain_documents(d, settings) for d in DOMAINS}
        for d, (train, held) in splits.items():
            _write_jsonl(assets.heldout[d], (doc.text for doc in held))
            rng = random.Random(f"{settings.seed}/{d}/calibration")
            picks = rng.sample(range(len(train)), min(settings.calibration_samples, len(train)))
            _write_jsonl(assets.calibration[d], (train[i].text for i in sorted(picks)))
        log("data: " + ", ".join(f"{d} {len(tr)} train / {len(he)} held-out chunks"
                                 for d, (tr, he) in splits.items()))

        # tokenizer
        mixture = [doc.text for d in DOMAINS for doc in splits[d][0]]
        tokenizer = _train_tokenizer(mixture, settings, assets.tokenizer)
        streams = {d: _encode_stream(tokenizer, [doc.text for doc in splits[d][0]]) for d in DOMAINS}
        log("tokenizer: " + ", ".join(f"{d} {len(s)} tokens" for d, s in streams.items()))

        # base
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=settings.hidden_size,
            intermediate_size=settings.intermediate_size,
            num_hidden_layers=settings.num_layers,
            num_attention_heads=settings.num_heads,
            num_key_value_heads=settings.num_heads,
            max_position_embeddings=settings.context,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dtype="float32",
        )
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(config).float()
        losses = _train(model, [streams[d] for d in DOMAINS], settings.base_steps, settings.base_lr,
                        settings.base_warmup, settings, seed=settings.seed, cosine=True)
        _save_model(model, tokenizer, assets.base)
        log(f"base: {settings.base_steps} steps, train loss {losses[0]:.2f} -> "
            f"{sum(losses[-10:]) / len(losses[-10:]):.2f}")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}

        # experts
        for i, d in enumerate(DOMAINS):
            model.load_state_dict(base_state)
            torch.manual_seed(settings.seed + 1 + i)
            losses = _train(model, [streams[d]], settings.expert_steps, settings.expert_lr,
                            settings.expert_warmup, settings, seed=settings.seed + 1 + i, cosine=False)
            _save_model(model, tokenizer, assets.experts[d])
            log(f"expert {d}: {settings.expert_steps} steps, train loss {losses[0]:.2f} -> "
                f"{sum(losses[-10:]) / len(losses[-10:]):.2f}")
    finally:
        torch.set_num_threads(old_threads)

    assets.build_seconds = round(time.perf_counter() - t0, 2)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(assets.to_json(), indent=2))
    os.replace(tmp, marker)
    return assets


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------


def heldout_loss(model_dir: Path, heldout_file: Path, *, max_tokens: int = 32_768,
                 batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of a saved model on a JSONL of texts.

    Each text is encoded as ``<s> text`` and cut into windows of the model's context length;
    padding is excluded.  At most `max_tokens` target tokens are scored (texts in file order).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    ctx = int(getattr(model.config, "max_position_embeddings", 128) or 128)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    windows: List[List[int]] = []
    budget = max_tokens
    for text in _read_jsonl_texts(Path(heldout_file)):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        for s in range(0, len(ids), ctx):
            w = ids[s:s + ctx]
            if len(w) < 2 or budget <= 0:
                continue
            windows.append(w)
            budget -= len(w) - 1
        if budget <= 0:
            break
    if not windows:
        raise ValueError(f"no evaluable text in {heldout_file}")

    total = 0.0
    count = 0
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, w in enumerate(chunk):
                ids[r, :len(w)] = torch.tensor(w)
                mask[r, :len(w)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
    return total / count


# --------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------


def _fill(value: Any, fields: Mapping[str, str]) -> Any:
    if isinstance(value, str) and "{" in value:
        try:
            return value.format(**fields)
        except (KeyError, IndexError, ValueError):
            return value
    return value


def merge_config_dict(assets: DemoAssets, method: str,
                      extra_parameters: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The mergekit config (as a dict) that `write_merge_config` writes.

    `extra_parameters` (all optional):

    * ``parameters``: top-level ``parameters:`` of the config;
    * ``per_model``: ``{domain: {name: value}}`` for one expert only;
    * ``config``: other top-level keys (e.g. ``tokenizer_source``);
    * ``merge_method``: the mergekit method to use when `method` is only a label;
    * any other key: a parameter of every expert, overriding the method's defaults in
      `DEFAULT_METHOD_PARAMETERS`.

    String values may use ``{domain}``, ``{calibration}``, ``{heldout}``, ``{model}`` and
    ``{base}``; they are filled per expert, e.g. ``{"calibration": "{calibration}"}`` gives
    every expert its own calibration file.
    """
    extra = dict(extra_parameters or {})
    merge_method = str(extra.get("merge_method") or method)
    shared = {k: v for k, v in extra.items() if k not in _RESERVED}
    per_model = extra.get("per_model") or {}
    models = []
    for domain, path in assets.experts.items():
        fields = {"domain": domain, "calibration": str(assets.calibration[domain]),
                  "heldout": str(assets.heldout[domain]), "model": str(path), "base": str(assets.base)}
        params = dict(DEFAULT_METHOD_PARAMETERS.get(merge_method, {}))
        params.update(shared)
        params.update(per_model.get(domain, {}))
        params = {k: _fill(v, fields) for k, v in params.items()}
        entry: Dict[str, Any] = {"model": str(path)}
        if params:
            entry["parameters"] = params
        models.append(entry)
    config: Dict[str, Any] = {"merge_method": merge_method}
    if merge_method not in _NO_BASE_METHODS:
        config["base_model"] = str(assets.base)
    config["models"] = models
    top = extra.get("parameters") or {}
    base_fields = {"base": str(assets.base)}
    if top:
        config["parameters"] = {k: _fill(v, base_fields) for k, v in top.items()}
    config["dtype"] = "float32"
    config.update(extra.get("config") or {})
    return config


def write_merge_config(path: Path, assets: DemoAssets, method: str,
                       extra_parameters: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the mergekit YAML for merging the demo experts into the base with `method`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = merge_config_dict(assets, method, extra_parameters)
    import yaml

    path.write_text(f"# mergekit_qp demo: {method}\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def find_mergekit_yaml() -> List[str]:
    """Command prefix for the stock mergekit-yaml CLI of the running interpreter's environment."""
    exe_dir = Path(sys.executable).parent
    for name in ("mergekit-yaml", "mergekit-yaml.exe"):
        candidate = exe_dir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    found = shutil.which("mergekit-yaml")
    if found:
        return [found]
    return [sys.executable, "-m", "mergekit.scripts.run_yaml"]


def run_merge(config_path: Path, out_dir: Path, *, extra_args: Sequence[str] = (),
              timeout: Optional[float] = 600) -> float:
    """Run ``mergekit-yaml CONFIG OUT --copy-tokenizer`` in a subprocess; returns wall seconds."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = [*find_mergekit_yaml(), str(config_path), str(out_dir), "--copy-tokenizer",
           "--random-seed", "0", "--quiet", *extra_args]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not (out_dir / "config.json").is_file():
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"mergekit-yaml failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall


def _ensure_tokenizer(model_dir: Path, tokenizer_dir: Path) -> None:
    """mergekit's --copy-tokenizer logs and continues on failure: make sure one is there."""
    if not (model_dir / "tokenizer.json").is_file():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, model_dir / f.name)


def _row(method: str, kind: str, model_dir: Path, assets: DemoAssets, wall: Optional[float],
         max_tokens: int, rho) -> Dict[str, Any]:
    losses = {d: heldout_loss(model_dir, assets.heldout[d], max_tokens=max_tokens) for d in assets.domains}
    return {"method": method, "kind": kind, "losses": losses,
            "mean": sum(losses.values()) / len(losses), "wall_s": wall, "model_dir": str(model_dir),
            "rho": rho(model_dir)}


def _calibration_parameters(assets: DemoAssets, workdir: Path) -> Dict[str, Any]:
    """output_qp's shared settings in the demo: every calibration text, the models' context."""
    return {"calibration_samples": assets.settings.calibration_samples,
            "calibration_seq_len": assets.settings.context,
            "cache_dir": str(workdir / "statistics")}


def _rho_function(assets: DemoAssets, workdir: Path):
    """ρ (residual energy captured on the calibration data, design §3.3) of any model folder,
    on the same statistics output_qp uses (computed once, then read from the cache)."""
    import torch

    from .calibrate import CalibrationSettings, expert_statistics
    from .diagnostic import linear_diagnostic

    params = _calibration_parameters(assets, workdir)
    settings = CalibrationSettings(samples=params["calibration_samples"], seq_len=params["calibration_seq_len"],
                                   cache_dir=params["cache_dir"])
    experts = [str(assets.experts[d]) for d in assets.domains]
    stats = [expert_statistics(str(assets.experts[d]), str(assets.base), str(assets.calibration[d]), settings,
                               torch.device("cpu")) for d in assets.domains]
    return lambda model_dir: linear_diagnostic(str(assets.base), experts, stats, str(model_dir),
                                               [1.0] * len(experts)).rho


def run_comparison(workdir: Path, methods: Sequence[str],
                   method_parameters: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
                   quick: bool = False, assets: Optional[DemoAssets] = None,
                   max_tokens: int = 32_768, include_references: bool = True,
                   verbose: bool = False) -> List[Dict[str, Any]]:
    """Build (or reuse) the demo, merge with each method via mergekit-yaml, evaluate.

    Returns rows ``{"method", "kind" ("reference" | "merge"), "losses" {domain: nats/token},
    "mean", "wall_s" (merge subprocess wall time; None for references), "model_dir"}``:
    first ``base`` and ``expert:<domain>``, then one per method, in order.
    """
    workdir = Path(workdir)
    assets = assets or build_demo(workdir, quick=quick, verbose=verbose)
    method_parameters = method_parameters or {}
    rows: List[Dict[str, Any]] = []
    rho = _rho_function(assets, workdir)
    if include_references:
        rows.append(_row("base", "reference", assets.base, assets, None, max_tokens, rho))
        for d, path in assets.experts.items():
            rows.append(_row(f"expert:{d}", "reference", path, assets, None, max_tokens, rho))
    for method in methods:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
        extra = dict(method_parameters.get(method) or {})
        if (extra.get("merge_method") or method) == "output_qp":
            extra["parameters"] = {**_calibration_parameters(assets, workdir), **(extra.get("parameters") or {})}
        config = write_merge_config(workdir / "configs" / f"{safe}.yaml", assets, method, extra)
        out = workdir / "merges" / safe
        if verbose:
            print(f"[demo] mergekit-yaml {config} ...", file=sys.stderr, flush=True)
        wall = run_merge(config, out)
        _ensure_tokenizer(out, assets.tokenizer)
        rows.append(_row(method, "merge", out, assets, round(wall, 2), max_tokens, rho))
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: method | loss per domain | mean | merge wall time."""
    domains: List[str] = []
    for r in rows:
        for d in r["losses"]:
            if d not in domains:
                domains.append(d)
    header = ["method", *domains, "mean", "rho", "wall s"]
    body = []
    for r in rows:
        cells = [str(r["method"])]
        cells += [f"{r['losses'][d]:.4f}" if d in r["losses"] else "-" for d in domains]
        cells.append(f"{r['mean']:.4f}")
        cells.append("-" if r.get("rho") is None else f"{r['rho']:.3f}")
        cells.append("-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}")
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(c) for c in body]
    lines.append("(held-out cross-entropy, nats/token, lower is better; rho = share of the experts' output "
                 "change on calibration data that the model keeps, linear layers, higher is better; "
                 "wall s = mergekit-yaml run)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mergekit-qp demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="demo_workdir", help="where models, data and merges go")
    p.add_argument("--quick", action="store_true", help="tiny fast variant (for smoke tests)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated merge methods (default: %(default)s)")
    p.add_argument("--method-parameters", default=None,
                   help='JSON {method: extra_parameters}, e.g. \'{"output_qp": {"calibration": "{calibration}"}}\'')
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    assets = build_demo(Path(args.workdir), quick=args.quick, verbose=True)
    print(f"demo models ready in {time.perf_counter() - t0:.1f}s under {assets.workdir}", flush=True)
    if args.build_only:
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    params = json.loads(args.method_parameters) if args.method_parameters else {}
    rows = run_comparison(Path(args.workdir), methods, params, assets=assets, verbose=True)
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
