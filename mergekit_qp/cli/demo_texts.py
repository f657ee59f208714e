"""The demo's three text domains, taken from the Python installation itself (present on every
CPython, so nothing is downloaded):

* ``code``  -- source of top-level standard-library modules (``*.py`` next to ``os.py``, filtered
  by ``sys.stdlib_module_names``, so nothing from site-packages);
* ``prose`` -- the English help topics of ``pydoc_data.topics``;
* ``table`` -- a ``UnicodeData.txt``-like table generated from ``unicodedata``;

each cut into chunks and split deterministically (hash of the chunk's key) into train and
held-out (1 in `heldout_mod`).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Tuple

if TYPE_CHECKING:
    from .demo_assets import DemoSettings

DOMAINS: Tuple[str, ...] = ("code", "prose", "table")


@dataclass(frozen=True)
class Document:
    """One chunk of a domain's text; `key`: its source (module, help topic, first code point) and
    chunk number, which also decides its split."""

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


def domain_documents(domain: str, settings: Optional[DemoSettings] = None) -> Tuple[List[Document], List[Document]]:
    """(train, heldout) documents of a domain; deterministic for a given Python version
    (settings: the full demo's by default)."""
    if settings is None:
        from .demo_assets import FULL_SETTINGS

        settings = FULL_SETTINGS
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

