"""Running models on calibration data: load a checkpoint with transformers, gather its
statistics with `statistics.StatisticsCollector`, and cache them on disk.

The cache key covers everything the statistics depend on: the model's files, the data's
content, the tokenizer's files and the sampling settings, so a sweep over `basis` or `ridge`
re-solves without a single forward pass, while a changed model or data set is recomputed.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, List, Optional

import torch

from . import __version__
from .calibration import (
    CalibrationError,
    CalibrationSource,
    batches,
    calibration_fingerprint,
    load_records,
    tokenize_calibration,
)
from .statistics import FORMAT_VERSION as STATISTICS_FORMAT
from .statistics import (
    ModelStatistics,
    StatisticsCollector,
    StatisticsError,
    bytes_fingerprint,
    files_fingerprint,
    fingerprint,
    save_statistics,
)

LOG = logging.getLogger("mergekit_qp")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "special_tokens_map.json")
WEIGHT_FILES = (".safetensors", ".bin", ".json", ".pt", ".pth")


@dataclass(frozen=True)
class CalibrationSettings:
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    field: Optional[str] = None
    cache_dir: Optional[str] = None
    max_batch_tokens: int = 4096

    @staticmethod
    def from_params(params) -> "CalibrationSettings":
        return CalibrationSettings(
            samples=int(params["calibration_samples"]),
            seq_len=int(params["calibration_seq_len"]),
            seed=int(params["calibration_seed"]),
            field=params.get("calibration_field"),
            cache_dir=params.get("cache_dir"),
        )


def default_cache_dir() -> str:
    return os.environ.get("MERGEKIT_QP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mergekit_qp"
    )


def local_model_path(model) -> str:
    """A mergekit ModelReference (or a path) as a local folder, or a clear error."""
    if isinstance(model, str):
        return model
    if getattr(model, "lora", None) is not None:
        raise ValueError(
            f"output_qp: {model} is a LoRA reference; merge the adapter into a checkpoint first "
            "so that calibration runs the model that is merged"
        )
    path = model.model.path
    if os.path.isdir(path):
        return path
    try:
        return model.local_path()
    except Exception as error:
        raise ValueError(f"output_qp: model {path!r} is not a local folder and could not be fetched: {error}") from None


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    """The base model's tokenizer, or None when the folder has none."""
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)


def tokenizer_fingerprint(model_dir: str) -> str:
    files = [os.path.join(model_dir, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(model_dir, f))]
    return bytes_fingerprint(files) if files else "none"


def load_model(model_dir: str, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The checkpoint as its own transformers class (so module names match tensor names)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    model_class = next(
        (getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    model = model_class.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    return model.to(device=device, dtype=torch.float32).eval()


_memory: Dict[str, ModelStatistics] = {}  # by cache key
_requests: Dict[tuple, ModelStatistics] = {}  # by (model, base, calibration, settings)
_lock = threading.Lock()


def forget_requests() -> None:
    """Make the next request re-check model and data fingerprints (each new merge calls this)."""
    with _lock:
        _requests.clear()


def expert_statistics(model, base_model, calibration: Optional[str], settings: CalibrationSettings,
                      device: torch.device, trust_remote_code: bool = False) -> ModelStatistics:
    """Statistics of one expert on its calibration data: from memory, the disk cache, or a
    forward pass (which then fills the cache)."""
    model_dir = local_model_path(model)
    base_dir = local_model_path(base_model)
    if not calibration:
        raise ValueError(
            f"output_qp: no calibration data for model {model_dir!r}: set `calibration:` in its "
            "parameters (or a default in the top-level parameters)"
        )
    # merge_group asks once per tensor: hashing the data and stat-ing the model folder each
    # time would cost more than the solve, so remember the answer for this process.
    request = (model_dir, base_dir, str(calibration), settings)
    if (known := _requests.get(request)) is not None:
        return known
    source = CalibrationSource(path=str(calibration), field=settings.field)
    key = fingerprint({
        "mergekit_qp": __version__,
        "statistics_format": STATISTICS_FORMAT,
        "model": files_fingerprint(model_dir, WEIGHT_FILES),
        "data": calibration_fingerprint(source),
        "tokenizer": tokenizer_fingerprint(base_dir),
        "samples": str(settings.samples),
        "seq_len": str(settings.seq_len),
        "seed": str(settings.seed),
    })
    with _lock:
        if key in _memory:
            _requests[request] = _memory[key]
            return _memory[key]
        cache_dir = settings.cache_dir or default_cache_dir()
        path = os.path.join(cache_dir, f"{key}.safetensors")
        if os.path.exists(path):
            try:
                stats = ModelStatistics(path)
                stored = stats.metadata.get("cache_key")
                if stored is not None and stored != key:  # files of older versions carry no key
                    raise StatisticsError(f"{path} holds statistics of another model, data set or settings")
                LOG.info("output_qp: statistics of %s from cache %s", model_dir, path)
                _memory[key] = _requests[request] = stats
                return stats
            except StatisticsError as error:
                LOG.warning("output_qp: ignoring unusable cache file (%s); recomputing", error)
        _compute(model_dir, base_dir, source, settings, device, path, trust_remote_code, key)
        stats = ModelStatistics(path)
        _memory[key] = _requests[request] = stats
        return stats


def _compute(model_dir, base_dir, source, settings, device, path, trust_remote_code, key) -> None:
    from tqdm.auto import tqdm

    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    records = load_records(source)
    if tokenizer is None and isinstance(records[0], str):
        raise CalibrationError(
            f"output_qp: the base model {base_dir!r} has no tokenizer to tokenise the text of calibration "
            f"data '{source.path}': add the tokenizer files to the base model or give pre-tokenised input_ids"
        )
    sequences = tokenize_calibration(
        records, tokenizer, samples=settings.samples, seq_len=settings.seq_len,
        seed=settings.seed, source_name=source.path,
    )
    total = sum(len(s) for s in sequences)
    if len(sequences) < settings.samples:
        LOG.warning("output_qp: calibration data '%s' gives %d sequences (%d tokens) for %s, fewer than "
                    "calibration_samples: %d; statistics use what there is", source.path, len(sequences), total,
                    model_dir, settings.samples)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    model = load_model(model_dir, device, trust_remote_code)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"output_qp: model {model_dir!r} has NaN or Inf in tensor {name}")
    positions = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(s) for s in sequences)
    if positions is not None and longest > positions:
        raise ValueError(
            f"output_qp: calibration_seq_len gives sequences of {longest} tokens but {model_dir!r} "
            f"takes at most {positions} positions: set calibration_seq_len ≤ {positions}"
        )
    vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else None
    if vocab is not None and max(int(s.max()) for s in sequences) >= vocab:
        raise ValueError(
            f"output_qp: calibration {source.path!r} has token ids ≥ {vocab}, the vocabulary size of {model_dir!r}"
        )
    collector = StatisticsCollector(model)
    try:
        with tqdm(total=total, unit="tok", desc=f"output_qp statistics {os.path.basename(model_dir.rstrip('/'))}") as bar:
            for input_ids, mask in batches(sequences, max_tokens=settings.max_batch_tokens, pad_id=pad_id):
                collector.observe(input_ids.to(device), mask.to(device))
                bar.update(int(mask.sum()))
        tensors = collector.tensors()
    except StatisticsError as error:
        raise StatisticsError(f"output_qp: model {model_dir!r} on calibration data '{source.path}': {error}") from None
    finally:
        collector.close()
    if collector.skipped:
        LOG.info("output_qp: no statistics for %s", ", ".join(sorted(collector.skipped)))
    try:
        save_statistics(
            path,
            tensors,
            aliases=collector.aliases,
            tokens=collector.token_count(),
            base_model_prefix=getattr(model, "base_model_prefix", "") or "",
            description={"model": model_dir, "calibration": source.path, "cache_key": key,
                         **{k: str(v) for k, v in asdict(settings).items()}},
        )
    except Exception as error:  # OSError, or safetensors' own error type for a failed write
        raise StatisticsError(
            f"output_qp: cannot write the statistics of {model_dir!r} to the cache file {path}: {error} "
            "(free space there, or set cache_dir / MERGEKIT_QP_CACHE to another folder)"
        ) from error
    del model


def statistics_for(base, experts, params, device) -> List[ModelStatistics]:
    """Statistics of every expert of a tensor group, in the group's order."""
    settings = CalibrationSettings.from_params(params)
    return [
        expert_statistics(e.id, base.id, params["calibration"][e.id], settings, device)
        for e in experts
    ]
