"""The demo's assets, built locally with no download of any kind (`build_demo(workdir)`):

* the three text domains of demo_texts.py, each split into train and held-out;
* a byte-level BPE tokenizer trained on the train split of the mixture;
* a tiny ``LlamaForCausalLM`` base trained briefly on the mixture, and one expert per domain
  continuing from the base on that domain only;
* per-domain calibration JSONL (train split only) and held-out JSONL files.

A build is named by the hash of its `DemoSettings`; a complete build with the same hash is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .demo_texts import DOMAINS, domain_documents

FORMAT_VERSION = 2
MARKER_NAME = "demo_assets.json"


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


def _write_jsonl(path: Path, texts: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl_texts(path: Path) -> List[str]:
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
