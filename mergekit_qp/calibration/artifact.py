"""Statistics as a publishable artifact: an expert's calibration statistics in a folder of per-layer
safetensors shards (the cache's own format, store.py) plus `card.json`, which says what they were
computed from without the text itself — content hashes of the model's weight files and of the
tokenizer, a fingerprint of the data, sequence and token counts, the settings and the versions.

`produce_artifact` writes one (resumable: a killed pass continues at the next layer); a merge
given `statistics: DIR` for an expert opens it with `open_artifact`, which refuses a card that
does not match the model being merged (naming both hashes) and shards that are missing or
truncated. The statistics are those a raw-data merge computes, so the merge is bit-identical.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

import torch

from .. import __version__
from .data import CalibrationSource, calibration_fingerprint
from .store import FORMAT, FORMAT_VERSION, INDEX_FILE, ModelStatistics, StatisticsError, save_tensors, write_index, \
    write_json

LOG = logging.getLogger("mergekit_qp")

CARD_FILE = "card.json"
CARD_FORMAT = "mergekit_qp.statistics_card"
CARD_VERSION = "1"
REQUEST_FILE = "request.json"  # what the pass computes: in DIR.partial, then in DIR until the card is written
MODEL_CONFIG = "config.json"
HASH_MEMO = "file_hashes.json"
# Producer-side paths the statistics' metadata carries in a cache; an artifact is published without them.
LOCAL_FIELDS = ("model", "calibration", "cache_dir")


def weight_files(model_dir: str) -> list:
    """The files a model is loaded from, as transformers and mergekit's hub download pick them:
    the safetensors files if there are any, else the PyTorch `.bin` weights (never optimizer,
    scheduler or training-argument files that sit beside them in a training output)."""
    names = sorted(e.name for e in os.scandir(model_dir) if e.is_file() and not e.name.startswith("."))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if safetensors:
        return safetensors
    return [n for n in names if n.endswith(".bin") and n != "training_args.bin"]


class ArtifactError(ValueError):
    """A statistics artifact that cannot be used for this merge (mismatched, incomplete, foreign)."""


def model_hashes(model_dir: str, memo_dir: Optional[str] = None) -> Dict[str, str]:
    """sha256 of each weight file and of config.json of a model folder, by file name. With
    `memo_dir`, hashes are remembered there by (path, size, mtime), so a merge re-hashes only
    files that changed (hashing reads every byte: seconds per GB)."""
    memo_path = os.path.join(memo_dir, HASH_MEMO) if memo_dir else None
    memo: Dict[str, Any] = {}
    if memo_path and os.path.exists(memo_path):
        try:
            with open(memo_path) as fp:
                memo = json.load(fp)
        except (OSError, ValueError):
            memo = {}
    weights = weight_files(model_dir)
    if not weights:
        raise ArtifactError(f"output_qp: {model_dir!r} has no weight files (.safetensors or .bin)")
    names = weights + ([MODEL_CONFIG] if os.path.isfile(os.path.join(model_dir, MODEL_CONFIG)) else [])
    hashes, changed = {}, False
    for name in names:
        path = os.path.join(model_dir, name)
        st = os.stat(path)
        key = os.path.realpath(path)
        known = memo.get(key)
        if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
            hashes[name] = known["sha256"]
            continue
        hashes[name] = file_sha256(path)
        memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashes[name]}
        changed = True
    if memo_path and changed:
        os.makedirs(memo_dir, exist_ok=True)
        write_json(memo_path, memo)
    return hashes


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hashes(model_dir: str) -> Dict[str, str]:
    """sha256 of each tokenizer file the folder has (models.TOKENIZER_FILES)."""
    from .models import TOKENIZER_FILES

    return {name: file_sha256(os.path.join(model_dir, name)) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(model_dir, name))}


def versions() -> Dict[str, str]:
    import importlib.metadata as metadata

    found = {"mergekit_qp": __version__, "torch": torch.__version__}
    for package in ("transformers", "mergekit", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def request_of(model_hashes_: Dict[str, str], tokenizer: Dict[str, str], source: CalibrationSource,
               settings) -> Dict[str, Any]:
    """What the statistics are a function of: model, tokenizer, data and sampling settings."""
    return {
        "model": {"files": model_hashes_},
        "tokenizer": {"files": tokenizer},
        "data": {"fingerprint": calibration_fingerprint(source), "field": source.field},
        "settings": {"calibration_samples": settings.samples, "calibration_seq_len": settings.seq_len,
                     "calibration_seed": settings.seed, "calibration_packing": settings.packing,
                     "statistics_dtype": settings.gram_dtype},
    }


def produce_artifact(model_dir: str, source: CalibrationSource, out: str, settings, *, base_dir: Optional[str] = None,
                     device: torch.device = torch.device("cpu"), trust_remote_code: bool = False,
                     memo_dir: Optional[str] = None, **pass_options) -> Dict[str, Any]:
    """Compute the statistics of `model_dir` on `source` into the artifact folder `out` and return
    its card. An artifact already complete there for the same request is kept as it is; a killed
    pass resumes after its last resume point (`pass_options`: those of `compute_statistics`,
    e.g. resume_every); a folder holding anything else is refused, not overwritten."""
    from .cache import compute_statistics

    out = os.path.abspath(os.path.expanduser(out))  # "stats/" would put stats/.partial inside stats
    base_dir = base_dir or model_dir
    request = request_of(model_hashes(model_dir, memo_dir), tokenizer_hashes(base_dir), source, settings)
    card_path = os.path.join(out, CARD_FILE)
    if os.path.exists(card_path):
        card = read_card(out)
        if {k: card.get(k) for k in request} == request:
            LOG.info("output_qp: %s already holds these statistics; nothing to do", out)
            return card
        raise ArtifactError(f"output_qp: {out} already holds statistics of another model, data set or settings; "
                            "remove it or choose another --out")
    if os.path.exists(out) and _read_json(os.path.join(out, REQUEST_FILE)) != request:
        raise ArtifactError(f"output_qp: {out} exists and is not a statistics artifact of this model, data and "
                            "settings; choose another --out")
    if not os.path.exists(os.path.join(out, INDEX_FILE)):  # else: killed after its pass, before its card
        partial = out + ".partial"
        if os.path.isdir(partial) and _read_json(os.path.join(partial, REQUEST_FILE)) != request:
            LOG.warning("output_qp: %s is the unfinished pass of another request; starting again", partial)
            shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        write_json(os.path.join(partial, REQUEST_FILE), request)
        stats = compute_statistics(model_dir, base_dir, source, settings, device, trust_remote_code,
                                   description={"artifact": CARD_FORMAT}, folder=out, **pass_options)
        if stats.path is None:  # no layer adapter (the streamed pass removed its folder): one whole-model file
            os.makedirs(partial, exist_ok=True)
            write_json(os.path.join(partial, REQUEST_FILE), request)
            save_tensors(os.path.join(partial, "statistics-all.safetensors"),
                         {k: stats._get(k) for k in stats._keys}, _published(stats.metadata))
            write_index(partial, stats.metadata, ["statistics-all.safetensors"])
            os.replace(partial, out)
    index = _read_json(os.path.join(out, INDEX_FILE))
    write_index(out, _published(index["metadata"]), index["files"])
    metadata = index["metadata"]
    card = {
        "format": CARD_FORMAT, "format_version": CARD_VERSION, **request,
        "counts": {"sequences": int(metadata.get("sequences", 0)), "tokens": int(metadata["tokens"])},
        "statistics": {"format": FORMAT, "format_version": FORMAT_VERSION,
                       "files": {name: os.path.getsize(os.path.join(out, name)) for name in index["files"]}},
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(card_path, card)  # a folder with a card is complete
    os.remove(os.path.join(out, REQUEST_FILE))
    return card


def _published(metadata: Dict[str, str]) -> Dict[str, str]:
    """Statistics metadata without the producer's local paths."""
    return {k: v for k, v in metadata.items() if k not in LOCAL_FIELDS}


def _read_json(path: str) -> Any:
    try:
        with open(path) as fp:
            return json.load(fp)
    except (OSError, ValueError):
        return None


def read_card(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, CARD_FILE)
    try:
        with open(path) as fp:
            card = json.load(fp)
    except FileNotFoundError:
        raise ArtifactError(f"output_qp: {folder} is not a statistics artifact (no {CARD_FILE}; an unfinished "
                            "`mergekit-qp statistics` run leaves DIR.partial: run it again to finish)") from None
    except (OSError, ValueError) as error:
        raise ArtifactError(f"output_qp: cannot read {path}: {error}") from None
    if card.get("format") != CARD_FORMAT or card.get("format_version") != CARD_VERSION:
        raise ArtifactError(f"output_qp: {path} is not a mergekit-qp statistics card of version {CARD_VERSION}")
    return card


def resolve_artifact(location: str) -> str:
    """A local artifact folder, or a hub repository id fetched through huggingface_hub."""
    location = os.path.expanduser(location)
    if os.path.isdir(location):
        return location
    if location.count("/") == 1 and not location.startswith((".", "/")) and not os.path.exists(location.split("/")[0]):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(repo_id=location)
        except Exception as error:
            raise ArtifactError(f"output_qp: statistics {location!r}: no such local folder, and fetching it as a hub "
                                f"repository failed: {error}") from None
    raise ArtifactError(f"output_qp: statistics {location!r}: no such folder")


def open_artifact(location: str, model_dir: str, base_dir: str, memo_dir: Optional[str] = None) -> ModelStatistics:
    """The statistics of an artifact, after checking its card against the model merged (weight
    and config hashes) and the base's tokenizer, and its shards against the card."""
    folder = resolve_artifact(location)
    card = read_card(folder)
    mine = model_hashes(model_dir, memo_dir)
    theirs = card["model"]["files"]
    if mine != theirs:
        differ = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
        detail = "; ".join(f"{n}: model {mine.get(n, 'absent')} vs statistics {theirs.get(n, 'absent')}"
                           for n in differ[:4])
        raise ArtifactError(f"output_qp: the statistics in {location} were computed from another model than "
                            f"{model_dir!r} ({detail})")
    # The tokenizer files both sides have must agree (a hub download may lack e.g. vocab.txt beside
    # tokenizer.json), and there must be one: statistics of text need the tokenizer that cut it.
    mine, theirs = tokenizer_hashes(base_dir), card["tokenizer"]["files"]
    common = sorted(set(mine) & set(theirs))
    differ = [n for n in common if mine[n] != theirs[n]]
    if differ or (theirs and not common):
        detail = "; ".join(f"{n}: base {mine[n]} vs statistics {theirs[n]}" for n in differ) or \
            f"the base has none of {', '.join(sorted(theirs))}"
        raise ArtifactError(f"output_qp: the statistics in {location} were tokenised with another tokenizer than "
                            f"the base model {base_dir!r} has ({detail})")
    for name, size in card["statistics"]["files"].items():
        path = os.path.join(folder, name)
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != size:
            raise ArtifactError(f"output_qp: statistics shard {path} is {'missing' if actual is None else 'truncated'}"
                                f" ({actual} bytes, the card says {size})")
    try:
        return ModelStatistics.open(folder)
    except StatisticsError as error:
        raise ArtifactError(f"output_qp: statistics {location}: {error}") from None
