"""The statistics store: one model's calibration statistics as float32 means (keys
``<kind>/<module>/<statistic>``), either one safetensors file (the whole-model pass) or a folder
of per-layer shards with an index written last (the layer-streamed pass), every file written
atomically; and the fingerprints that key the cache (no mergekit, no transformers)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.statistics import EmbeddingStats, LinearStats, NormStats

FORMAT = "mergekit_qp.statistics"
FORMAT_VERSION = "1"
INDEX_FILE = "statistics.json"  # a shard folder's index: its metadata and shard files

LINEAR, NORM, EMBEDDING = "linear", "norm", "embedding"


class StatisticsError(RuntimeError):
    """A statistics file that cannot be used (foreign, truncated, or from other settings)."""


class ModelStatistics:
    """Read access to one model's statistics, keyed by checkpoint tensor name: from a file
    (`ModelStatistics.open`) or straight from a collector's tensors (`ModelStatistics(...)`,
    so a pass that just computed them does not read them back from disk)."""

    def __init__(self, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], path: Optional[str] = None):
        self.path = path
        self.metadata = metadata
        self.aliases: Dict[str, str] = json.loads(metadata["aliases"])
        self.transposed = set(json.loads(metadata.get("transposed", "[]")))
        self.prefix: str = metadata.get("base_model_prefix", "")
        self.tokens = int(metadata["tokens"])
        self._tensors = tensors
        self._keys = set(tensors.keys())
        self._shared = set(self.aliases.values())  # stored modules whose Gram others read too

    @staticmethod
    def open(path: str) -> "ModelStatistics":
        """A statistics file, or a folder of shards (read lazily, one tensor when asked for)."""
        if os.path.isdir(path):
            return _open_folder(path)
        try:
            file = safe_open(path, framework="pt")
            meta = file.metadata() or {}
        except Exception as error:  # safetensors raises several types for a broken file
            raise StatisticsError(f"cannot read statistics file {path}: {error}") from error
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise StatisticsError(f"{path} is not a mergekit-qp statistics file of version {FORMAT_VERSION}")
        return ModelStatistics(_LazyTensors({key: file for key in file.keys()}), meta, path)

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
        return self._tensors[key]

    def lookup(self, module: str):
        """Statistics for a module name, as LinearStats / NormStats / EmbeddingStats, or None."""
        if (name := self._module(LINEAR, module)) is not None:
            shared = (self.path or id(self), name) if name in self._shared else None
            return LinearStats(self._get(f"{LINEAR}/{name}/gram"), self._get(f"{LINEAR}/{name}/mean"),
                               transposed=name in self.transposed, shared_input=shared)
        if (name := self._module(NORM, module)) is not None:
            return NormStats(self._get(f"{NORM}/{name}/m2"), self._get(f"{NORM}/{name}/m1"))
        if (name := self._module(EMBEDDING, module)) is not None:
            return EmbeddingStats(self._get(f"{EMBEDDING}/{name}/freq"))
        return None


def statistics_metadata(*, aliases: Dict[str, str], transposed: Iterable[str], tokens: int, base_model_prefix: str,
                        description: Dict[str, str]) -> Dict[str, str]:
    """The metadata of a statistics file (all strings, as safetensors stores them)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aliases": json.dumps(aliases, sort_keys=True),
        "transposed": json.dumps(sorted(transposed)),
        "tokens": str(tokens),
        "base_model_prefix": base_model_prefix,
        **{k: str(v) for k, v in description.items()},
    }


def save_statistics(path: str, statistics: ModelStatistics) -> None:
    """Write atomically: a reader never sees a half-written file under the final name."""
    save_tensors(path, {k: statistics._get(k) for k in statistics._keys}, statistics.metadata)


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file written under a temporary name and renamed into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_index(folder: str, metadata: Dict[str, str], files: List[str]) -> None:
    """The index that makes a shard folder complete (written last, atomically)."""
    write_json(os.path.join(folder, INDEX_FILE), {"metadata": metadata, "files": files})


def write_json(path: str, value) -> None:
    """A JSON file written under a temporary name and renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as fp:
        json.dump(value, fp, indent=1)
    os.replace(tmp, path)


def _open_folder(path: str) -> ModelStatistics:
    try:
        with open(os.path.join(path, INDEX_FILE)) as fp:
            index = json.load(fp)
        meta, files = index["metadata"], index["files"]
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise StatisticsError(f"{path} is not a mergekit-qp statistics folder of version {FORMAT_VERSION}")
        by_key = {}
        for name in files:
            handle = safe_open(os.path.join(path, name), framework="pt")
            by_key.update({key: handle for key in handle.keys()})
    except StatisticsError:
        raise
    except Exception as error:  # a missing or truncated index or shard
        raise StatisticsError(f"cannot read statistics folder {path}: {error}") from error
    return ModelStatistics(_LazyTensors(by_key), meta, path)


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


class _LazyTensors:
    """Open safetensors files (one, or a folder's shards) as one read-only mapping, keyed by
    tensor name, loading a tensor when asked for."""

    def __init__(self, by_key):
        self._by_key = by_key

    def keys(self):
        return self._by_key.keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._by_key[key].get_tensor(key)
