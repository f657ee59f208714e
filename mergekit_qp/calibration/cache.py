"""The statistics of an expert on its calibration data: one whole-model forward pass with the
hook collector, kept in memory for the process and on disk across processes.

The disk key covers everything the statistics depend on: the model's files, the data's content,
the tokenizer's files and the sampling settings, so a sweep over `basis` or `ridge` re-solves
without a single forward pass, while a changed model or data set is recomputed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

from .. import __version__
from .artifact import open_artifact
from .collector import StatisticsCollector
from .data import CalibrationError, CalibrationSource, batches, calibration_fingerprint, load_records, \
    tokenize_calibration
from .layers import SequentialUnsupported
from .memory import check_pass_fits, plan_streamed_pass
from .models import load_model, load_tokenizer, local_model_path, output_head, tokenizer_fingerprint
from .store import FORMAT_VERSION as STATISTICS_FORMAT
from .store import INDEX_FILE, ModelStatistics, StatisticsError, files_fingerprint, fingerprint, save_statistics, \
    statistics_metadata
from .streamed import streamed_statistics, streams

LOG = logging.getLogger("mergekit_qp")

WEIGHT_FILES = (".safetensors", ".bin", ".json", ".pt", ".pth")
# The dtypes the input Grams may be stored in (statistics_dtype); float16's range (65504) is
# below the squared activations of LLMs.
GRAM_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class CalibrationSettings:
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    field: Optional[str] = None
    cache_dir: Optional[str] = None
    max_batch_tokens: int = 4096
    gram_dtype: str = "float32"  # the stored input Grams' dtype (statistics_dtype)
    packing: bool = False  # join short records into full windows (calibration_packing)

    @staticmethod
    def from_params(params) -> "CalibrationSettings":
        return CalibrationSettings(
            samples=int(params["calibration_samples"]),
            seq_len=int(params["calibration_seq_len"]),
            seed=int(params["calibration_seed"]),
            field=params.get("calibration_field"),
            cache_dir=params.get("cache_dir"),
            gram_dtype=params.get("statistics_dtype") or "float32",
            packing=bool(params.get("calibration_packing", False)),
        )


def default_cache_dir() -> str:
    return os.environ.get("MERGEKIT_QP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mergekit_qp")


class StatisticsCache:
    """Expert statistics by cache key (memory, then disk, then a forward pass).

    `forget_requests()` makes the next request re-check model and data fingerprints (each new
    merge calls it); `clear()` forgets everything held in memory."""

    def __init__(self):
        self._by_key: Dict[str, ModelStatistics] = {}
        self._by_request: Dict[tuple, ModelStatistics] = {}  # (model, base, calibration, settings)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()
            self._by_request.clear()

    def forget_requests(self) -> None:
        with self._lock:
            self._by_request.clear()

    def expert_statistics(self, model, base_model, calibration: Optional[str], settings: CalibrationSettings,
                          device: torch.device, trust_remote_code: bool = False,
                          artifact: Optional[str] = None) -> ModelStatistics:
        """Statistics of one expert on its calibration data, or from its statistics artifact."""
        model_dir = local_model_path(model)
        base_dir = local_model_path(base_model)
        if artifact:
            request = (model_dir, base_dir, "artifact", str(artifact))
            if (known := self._by_request.get(request)) is not None:
                return known
            stats = open_artifact(str(artifact), model_dir, base_dir, settings.cache_dir or default_cache_dir())
            LOG.info("output_qp: statistics of %s from the artifact %s (%d tokens)", model_dir, artifact, stats.tokens)
            with self._lock:
                self._by_request[request] = stats
            return stats
        if not calibration:
            raise ValueError(
                f"output_qp: no calibration data for model {model_dir!r}: set `calibration:` (or `statistics:`, a "
                "statistics artifact) in its parameters (or a default in the top-level parameters)"
            )
        # The method asks once per tensor: hashing the data and stat-ing the model folder each
        # time would cost more than the solve, so remember the answer until forget_requests().
        request = (model_dir, base_dir, str(calibration), settings)
        if (known := self._by_request.get(request)) is not None:
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
            # float32 caches keep the key they had before the option existed
            **({"gram_dtype": settings.gram_dtype} if settings.gram_dtype != "float32" else {}),
            **({"packing": "1"} if settings.packing else {}),
        })
        with self._lock:
            if key in self._by_key:
                self._by_request[request] = self._by_key[key]
                return self._by_key[key]
            folder = os.path.join(settings.cache_dir or default_cache_dir(), key)
            with _locked(folder + ".lock"):  # another process computing the same statistics: wait for it
                stats = _read_cached(folder, key, model_dir) or _read_cached(folder + ".safetensors", key, model_dir)
                if stats is None:
                    if os.path.isdir(folder):  # an unusable folder (warned about above) gives way
                        shutil.rmtree(folder)
                    stats = compute_statistics(model_dir, base_dir, source, settings, device, trust_remote_code,
                                               description={"cache_key": key}, folder=folder)
                    if stats.path is None:  # the whole-model pass: one file
                        _write_cached(folder + ".safetensors", stats, model_dir)
            self._by_key[key] = self._by_request[request] = stats
            return stats


@contextmanager
def _locked(path: str):
    """An exclusive lock on `path` across processes (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent passes write identical files atomically
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_cached(path: str, key: str, model_dir: str) -> Optional[ModelStatistics]:
    if not os.path.exists(path) or (os.path.isdir(path) and not os.path.exists(os.path.join(path, INDEX_FILE))):
        return None
    try:
        stats = ModelStatistics.open(path)
        stored = stats.metadata.get("cache_key")
        if stored is not None and stored != key:  # files of older versions carry no key
            raise StatisticsError(f"{path} holds statistics of another model, data set or settings")
        LOG.info("output_qp: statistics of %s from cache %s", model_dir, path)
        return stats
    except StatisticsError as error:
        LOG.warning("output_qp: ignoring unusable cache file (%s); recomputing", error)
        return None


def _write_cached(path: str, stats: ModelStatistics, model_dir: str) -> None:
    try:
        save_statistics(path, stats)
    except Exception as error:  # OSError, or safetensors' own error type for a failed write
        raise StatisticsError(
            f"output_qp: cannot write the statistics of {model_dir!r} to the cache file {path}: {error} "
            "(free space there, or set cache_dir / MERGEKIT_QP_CACHE to another folder)"
        ) from error


def compute_statistics(model_dir: str, base_dir: str, source: CalibrationSource, settings: CalibrationSettings,
                       device: torch.device, trust_remote_code: bool = False,
                       description: Optional[Dict[str, str]] = None, folder: Optional[str] = None,
                       resume_every: Optional[float] = 120.0,
                       after_layer: Optional[Callable[[int], None]] = None,
                       spill: Optional[bool] = None) -> ModelStatistics:
    """The expert's statistics on its calibration data: layer by layer into the shard folder
    `folder` where the architecture has a layer adapter (calibration/streamed.py), else one
    whole-model forward pass with the hook collector, refused first if it cannot fit. `spill`:
    keep the layer-streamed pass's hidden states on disk (None: when memory asks for it)."""
    import transformers

    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    records = load_records(source)
    if tokenizer is None and isinstance(records[0], str):
        raise CalibrationError(
            f"output_qp: the base model {base_dir!r} has no tokenizer to tokenise the text of calibration "
            f"data '{source.path}': add the tokenizer files to the base model or give pre-tokenised input_ids"
        )
    sequences = tokenize_calibration(records, tokenizer, samples=settings.samples, seq_len=settings.seq_len,
                                     seed=settings.seed, source_name=source.path, pack=settings.packing)
    total = sum(len(s) for s in sequences)
    report_budget(source.path, model_dir, len(sequences), total, settings)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    _check_tokens(config, sequences, model_dir, source)
    description = {"model": model_dir, "calibration": source.path, **(description or {}),
                   **{k: str(v) for k, v in asdict(settings).items()}, "sequences": str(len(sequences))}
    batch_list = list(batches(sequences, max_tokens=settings.max_batch_tokens, pad_id=pad_id))
    if folder is not None and streams(config, model_dir):
        _, needs_spill = plan_streamed_pass(model_dir, device, total, settings.max_batch_tokens, settings.seq_len,
                                            trust_remote_code)
        spill = needs_spill if spill is None else spill
        if spill:
            LOG.info("output_qp: the hidden states of %d calibration tokens are kept on disk in %s.partial", total,
                     folder)
        try:
            streamed_statistics(model_dir, config, batch_list, device, folder, description=description,
                                resume_every=resume_every, after_layer=after_layer, spill=spill,
                                gram_dtype=gram_dtype(settings))
            return ModelStatistics.open(folder)
        except StatisticsError as error:
            raise StatisticsError(f"{error} (calibration data '{source.path}')") from None
        except SequentialUnsupported as error:  # this transformers version runs its layers otherwise
            LOG.warning("output_qp: %s; computing the statistics with a whole-model pass instead", error)
    return _whole_model_statistics(model_dir, batch_list, total, settings, device, trust_remote_code, description)


def report_budget(path: str, model_dir: str, count: int, tokens: int, settings: CalibrationSettings) -> None:
    """Log the tokens a calibration set gives; warn where it gives well under the budget
    calibration_samples x calibration_seq_len, and say why (too little data, or short records)."""
    budget = settings.samples * settings.seq_len
    LOG.info("output_qp: calibration '%s' for %s: %d sequences, %d tokens (budget %d x %d = %d)", path, model_dir,
             count, tokens, settings.samples, settings.seq_len, budget)
    if count < settings.samples:
        LOG.warning("output_qp: calibration data '%s' gives %d sequences (%d tokens) for %s, fewer than "
                    "calibration_samples: %d; statistics use what there is", path, count, tokens, model_dir,
                    settings.samples)
    elif tokens < budget / 2:
        LOG.warning("output_qp: calibration data '%s' gives %d tokens for %s, %.0f%% of the budget %d x %d: its "
                    "records are shorter than calibration_seq_len; set calibration_packing: true to join them "
                    "into full windows", path, tokens, model_dir, 100 * tokens / budget, settings.samples,
                    settings.seq_len)


def gram_dtype(settings: CalibrationSettings) -> torch.dtype:
    if settings.gram_dtype not in GRAM_DTYPES:
        raise ValueError(f"output_qp: invalid statistics_dtype {settings.gram_dtype!r}; valid: {', '.join(GRAM_DTYPES)}")
    return getattr(torch, settings.gram_dtype)


def _check_tokens(config, sequences, model_dir: str, source: CalibrationSource) -> None:
    positions = getattr(config, "max_position_embeddings", None)
    longest = max(len(s) for s in sequences)
    if positions is not None and longest > positions:
        raise ValueError(
            f"output_qp: calibration_seq_len gives sequences of {longest} tokens but {model_dir!r} "
            f"takes at most {positions} positions: set calibration_seq_len ≤ {positions}"
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and max(int(s.max()) for s in sequences) >= vocab:
        raise ValueError(
            f"output_qp: calibration {source.path!r} has token ids ≥ {vocab}, the vocabulary size of {model_dir!r}"
        )


def _whole_model_statistics(model_dir: str, batch_list, total: int, settings: CalibrationSettings,
                            device: torch.device, trust_remote_code: bool,
                            description: Dict[str, str]) -> ModelStatistics:
    """One forward pass of the expert over its calibration data, with the hook collector."""
    from tqdm.auto import tqdm

    check_pass_fits(model_dir, device, settings.max_batch_tokens, settings.seq_len, trust_remote_code)
    model = load_model(model_dir, device, trust_remote_code)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"output_qp: model {model_dir!r} has NaN or Inf in tensor {name}")
    collector = StatisticsCollector(model, stop_after=output_head(model))
    try:
        with tqdm(total=total, unit="tok", desc=f"output_qp statistics {os.path.basename(model_dir.rstrip('/'))}") as bar:
            for input_ids, mask in batch_list:
                collector.observe(input_ids.to(device), mask.to(device))
                bar.update(int(mask.sum()))
        tensors = collector.tensors(gram_dtype(settings))
    except StatisticsError as error:
        raise StatisticsError(f"output_qp: model {model_dir!r} on calibration data "
                              f"'{description['calibration']}': {error}") from None
    finally:
        collector.close()
    if collector.skipped:
        LOG.info("output_qp: no statistics for %s", ", ".join(sorted(collector.skipped)))
    metadata = statistics_metadata(
        aliases=collector.aliases, transposed=collector.transposed, tokens=collector.token_count(),
        base_model_prefix=getattr(model, "base_model_prefix", "") or "", description=description)
    del model
    return ModelStatistics(tensors, metadata)


STATISTICS = StatisticsCache()  # the process's cache, handed to each merge's state


def expert_statistics(model, base_model, calibration: Optional[str], settings: CalibrationSettings,
                      device: torch.device, trust_remote_code: bool = False,
                      artifact: Optional[str] = None) -> ModelStatistics:
    """`StatisticsCache.expert_statistics` of the process's cache."""
    return STATISTICS.expert_statistics(model, base_model, calibration, settings, device, trust_remote_code,
                                        artifact)
