"""Calibration data: load per-model samples and turn them into token-id sequences.

Users name calibration data with a path in the merge YAML.  This module reads it
(text, JSON lines, JSON, CSV, Parquet, a ``datasets`` folder, or a hub dataset
name), tokenises it into at most ``samples`` sequences of at most ``seq_len``
tokens, and groups sequences into padded batches for forward passes.

Heavy libraries (torch, transformers, datasets, pandas) are imported inside the
functions that need them, so importing this module stays cheap for the CLI and
for mergekit's plugin discovery.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

if TYPE_CHECKING:
    import torch

__all__ = [
    "CalibrationError",
    "CalibrationSource",
    "load_records",
    "calibration_fingerprint",
    "tokenize_calibration",
    "batches",
    "load_calibration",
]

Records = Union[list[str], list[list[int]]]

_TEXT_SUFFIXES = {"", ".txt"}
_JSON_SUFFIXES = {".json", ".jsonl"}
_TABLE_SUFFIXES = {".csv", ".parquet"}
# "name" or "org/name": what a hub dataset id looks like.  Anything with a known
# data-file suffix is treated as a missing local file rather than sent to the hub.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class CalibrationError(ValueError):
    """A user-facing problem with calibration data or parameters."""


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration data lives.

    ``path`` is a file, a ``datasets.save_to_disk`` folder, or a hub dataset name.
    ``field`` names the column/key holding text (or token ids); ``None`` means
    ``"text"`` if present, else ``"input_ids"``.
    """

    path: str
    field: Optional[str] = None


# --------------------------------------------------------------------------- loading


def load_records(source: CalibrationSource) -> Records:
    """Read ``source`` into a list of texts or a list of token-id lists.

    Empty texts / empty id lists are dropped (they contribute no tokens); if
    nothing remains a :class:`CalibrationError` is raised.
    """
    path = Path(source.path).expanduser()
    where = f"calibration data '{source.path}'"  # verbatim path (repr would double backslashes)
    if path.is_dir():
        rows = _read_dataset_dir(path, where)
    elif path.is_file():
        if path.stat().st_size == 0:
            raise CalibrationError(f"{where}: file is empty")
        suffix = path.suffix.lower()
        if suffix in _TEXT_SUFFIXES:
            # A line is the sample; accept field "text" since a config may set it for all models.
            if source.field not in (None, "text"):
                raise CalibrationError(
                    f"{where}: a plain-text file has no fields, but field {source.field!r} was given"
                )
            lines = [ln for ln in _read_text(path, where).splitlines() if ln.strip()]
            return _non_empty(lines, where)
        if suffix in _JSON_SUFFIXES:
            rows = _read_json(path, where)
        elif suffix in _TABLE_SUFFIXES:
            rows = _read_table(path, suffix, where)
        else:
            raise CalibrationError(
                f"{where}: unsupported file type {suffix!r} "
                "(use .txt, .jsonl, .json, .csv, .parquet or a datasets folder)"
            )
    elif _HUB_NAME.match(source.path) and Path(source.path).suffix.lower() not in (
        _JSON_SUFFIXES | _TABLE_SUFFIXES | {".txt"}
    ):
        rows = _read_hub(source.path, where)
    else:
        raise CalibrationError(f"{where} does not exist")

    if not rows:
        raise CalibrationError(f"{where}: no records")
    # Tables share one schema; JSON objects may differ, and _extract checks every row.
    field = _pick_field(source.field, list(rows[0]), where)
    return _extract(rows, field, where)


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{where}: cannot read file: {e}") from e


def _read_json(path: Path, where: str) -> list[dict]:
    """A JSON array of objects, or JSON lines (one object per non-blank line)."""
    text = _read_text(path, where)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: bad JSON on line {e.lineno}: {e.msg}") from e
        numbered = list(enumerate(rows, start=1))
        what = "item"
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CalibrationError(
                        f"{where}: bad JSON on line {n}: {e.msg} "
                        "(expected a JSON array of objects or one JSON object per line)"
                    ) from e
        what = "line"
    for n, row in numbered:
        if not isinstance(row, dict):
            raise CalibrationError(
                f"{where}: {what} {n} is a {type(row).__name__}, expected a JSON object"
            )
    return [row for _, row in numbered]


def _read_table(path: Path, suffix: str, where: str) -> list[dict]:
    import pandas as pd

    try:
        if suffix == ".csv":
            # CSV cells are text: keep "" for empty cells instead of NaN floats.
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types for bad files
        raise CalibrationError(f"{where}: cannot read file: {e}") from e
    return df.to_dict(orient="records")


def _read_dataset_dir(path: Path, where: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CalibrationError(
            f"{where}: folder is not a dataset written by datasets' save_to_disk: {e}"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise CalibrationError(
                f"{where}: DatasetDict has no 'train' split (splits: {sorted(ds.keys())})"
            )
        ds = ds["train"]
    return ds.to_list()


def _read_hub(name: str, where: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise CalibrationError(
            f"{where} does not exist locally and could not be loaded from the hub: "
            f"{type(e).__name__}: {e}"
        ) from e
    return ds.to_list()


def _pick_field(field: Optional[str], available: list[str], where: str) -> str:
    if field is None:
        for candidate in ("text", "input_ids"):
            if candidate in available:
                return candidate
        raise CalibrationError(
            f"{where}: no 'text' or 'input_ids' field; available fields: {available}; "
            "set the calibration field parameter"
        )
    if field not in available:
        raise CalibrationError(f"{where}: field {field!r} not found; available fields: {available}")
    return field


def _extract(rows: list[dict], field: str, where: str) -> Records:
    """Pull ``field`` out of every row; all values must be str, or all lists of ints."""
    values = []
    for i, row in enumerate(rows, start=1):
        if field not in row:
            raise CalibrationError(
                f"{where}: record {i} has no field {field!r}; available fields: {list(row)}"
            )
        v = row[field]
        if hasattr(v, "tolist") and not isinstance(v, str):  # numpy arrays from parquet
            v = v.tolist()
        values.append(v)
    if all(isinstance(v, str) for v in values):
        return _non_empty(values, where)
    for i, v in enumerate(values, start=1):
        if not (
            isinstance(v, (list, tuple))
            and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        ):
            raise CalibrationError(
                f"{where}: field {field!r} of record {i} is {type(v).__name__} {str(v)[:60]!r}; "
                "expected text (str) in every record or token ids (list of int) in every record"
            )
    return _non_empty([list(v) for v in values], where)


def _non_empty(records: list, where: str) -> Records:
    kept = [r for r in records if len(r) > 0]
    if not kept:
        raise CalibrationError(f"{where}: no records")
    return kept


# ----------------------------------------------------------------------- fingerprint


def calibration_fingerprint(source: CalibrationSource) -> str:
    """sha256 hex digest identifying the data and field, for use as a cache key.

    Files hash their bytes (plus their suffix, which decides how they parse);
    folders hash every file's relative path and bytes in sorted order; hub names
    hash the name (we cannot see hub content without downloading it).
    """
    h = hashlib.sha256()

    def put(tag: str, data: bytes) -> None:
        # Length-prefixed pieces so different splits of the same bytes differ.
        h.update(f"{tag}:{len(data)}:".encode())
        h.update(data)

    put("version", b"1")
    put("field", b"\x00" if source.field is None else source.field.encode())
    path = Path(source.path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for p in files:
            put("name", p.relative_to(path).as_posix().encode())
            _put_file(h, p)
    elif path.is_file():
        put("suffix", path.suffix.lower().encode())
        _put_file(h, path)
    else:
        put("hub", source.path.encode())
    return h.hexdigest()


def _put_file(h: "hashlib._Hash", path: Path) -> None:
    h.update(f"file:{path.stat().st_size}:".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


# ------------------------------------------------------------------------ tokenising


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{name} must be a positive integer, got {value!r}")


def tokenize_calibration(
    records: Sequence[Union[str, Sequence[int]]],
    tokenizer: Any,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    source_name: str = "calibration",
    pack: bool = False,
) -> list["torch.LongTensor"]:
    """Turn records into at most ``samples`` 1-D LongTensors of at most ``seq_len`` ids.

    Records longer than ``seq_len`` are cut into consecutive windows; each window is
    a candidate.  With more candidates than ``samples``, a seeded permutation picks
    which to keep, and they are returned in their original order (deterministic).

    ``pack``: the records are first joined into one stream (each followed by the
    tokenizer's end-of-sequence token, where it has one) and cut into full windows of
    ``seq_len``, so short records (one sentence, one quote) fill the budget of
    ``samples`` x ``seq_len`` tokens instead of giving one short sequence each.
    """
    import torch

    _check_positive(samples, "calibration_samples")
    _check_positive(seq_len, "calibration_seq_len")
    records = list(records)
    if records and all(isinstance(r, str) for r in records):
        if tokenizer is None:
            raise CalibrationError(
                f"{source_name}: no tokenizer available to tokenise text; give input_ids instead"
            )
        token_lists = []
        for start in range(0, len(records), 1024):  # chunks bound peak memory
            enc = tokenizer(records[start : start + 1024], add_special_tokens=True)
            token_lists.extend(list(ids) for ids in enc["input_ids"])
    else:
        token_lists = []
        vocab = len(tokenizer) if tokenizer is not None else None
        for i, r in enumerate(records, start=1):
            if isinstance(r, str) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in r
            ):
                raise CalibrationError(
                    f"{source_name}: record {i} mixes text and token ids or holds non-integers"
                )
            bad = [t for t in r if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise CalibrationError(
                    f"{source_name}: record {i} has token id {bad[0]} outside the "
                    f"tokenizer's vocabulary (size {vocab})"
                )
            token_lists.append(list(r))

    if pack:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        stream = [t for ids in token_lists for t in (*ids, *([eos] if isinstance(eos, int) else []))]
        # full windows only, unless the whole stream is shorter than one
        token_lists = [stream] if len(stream) <= seq_len else [stream[: len(stream) // seq_len * seq_len]]
    # A trailing window of one token carries no next-token context; drop it unless
    # the whole record is that short (or seq_len itself is 1).
    min_window = min(2, seq_len)
    candidates: list[list[int]] = []
    for ids in token_lists:
        if len(ids) <= seq_len:
            if ids:
                candidates.append(ids)
            continue
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if len(window) >= min_window:
                candidates.append(window)
    if not candidates:
        raise CalibrationError(f"{source_name}: calibration data produced no tokens")

    if len(candidates) > samples:
        gen = torch.Generator().manual_seed(seed)
        chosen = sorted(torch.randperm(len(candidates), generator=gen)[:samples].tolist())
        candidates = [candidates[i] for i in chosen]
    return [torch.tensor(c, dtype=torch.long) for c in candidates]


def batches(
    sequences: Sequence["torch.LongTensor"], *, max_tokens: int = 4096, pad_id: int = 0
) -> Iterator[tuple["torch.LongTensor", "torch.BoolTensor"]]:
    """Yield right-padded ``(input_ids, attention_mask)`` batches with B*T <= max_tokens.

    Sequences are sorted longest first (stable, so deterministic) to keep padding
    small; a sequence longer than ``max_tokens`` forms a batch on its own.  The mask
    is True exactly on real tokens: padding must never enter statistics.
    """
    import torch

    _check_positive(max_tokens, "max_tokens")
    for i, s in enumerate(sequences):
        if s.dim() != 1 or s.numel() == 0:
            raise CalibrationError(f"calibration sequence {i} must be a non-empty 1-D tensor")
    order = sorted(range(len(sequences)), key=lambda i: -sequences[i].numel())

    def make(group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = sequences[group[0]].numel()  # longest first, so this is the max
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.bool)
        for row, i in enumerate(group):
            n = sequences[i].numel()
            ids[row, :n] = sequences[i]
            mask[row, :n] = True
        return ids, mask

    group: list[int] = []
    for i in order:
        width = sequences[group[0]].numel() if group else sequences[i].numel()
        if group and (len(group) + 1) * width > max_tokens:
            yield make(group)
            group = []
        group.append(i)
    if group:
        yield make(group)


def load_calibration(
    source: Union[CalibrationSource, str],
    tokenizer: Any,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    pack: bool = False,
) -> list["torch.LongTensor"]:
    """Convenience: :func:`load_records` then :func:`tokenize_calibration`."""
    if isinstance(source, str):
        source = CalibrationSource(source)
    records = load_records(source)
    return tokenize_calibration(
        records, tokenizer, samples=samples, seq_len=seq_len, seed=seed, source_name=source.path, pack=pack
    )
