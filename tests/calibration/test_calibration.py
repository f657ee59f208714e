"""Tests for mergekit_qp.calibration: loading, fingerprinting, tokenising, batching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_qp.calibration.data import (
    CalibrationError,
    CalibrationSource,
    batches,
    calibration_fingerprint,
    load_calibration,
    load_records,
    tokenize_calibration,
)

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the quick brown fox jumps over the lazy dog",
]
IDS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny word-level tokenizer that prepends <s>, built and saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        TEXTS * 3, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>"
    )
    out = tmp_path_factory.mktemp("tok")
    wrapped.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _save_dataset(path: Path, columns: dict, split: str | None = None) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    if split is not None:
        ds = datasets.DatasetDict({split: ds})
    ds.save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------ formats


def _make(kind: str, tmp: Path) -> tuple[CalibrationSource, list]:
    """Write TEXTS (or IDS) in format ``kind``; return the source and expected records."""
    if kind == "txt":
        (tmp / "d.txt").write_text("\n".join(TEXTS[:1] + ["", "   "] + TEXTS[1:]) + "\n")
        return CalibrationSource(str(tmp / "d.txt")), TEXTS
    if kind == "noext":
        (tmp / "data").write_text("\n".join(TEXTS))
        return CalibrationSource(str(tmp / "data")), TEXTS
    if kind == "jsonl":
        _write_jsonl(tmp / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
        return CalibrationSource(str(tmp / "d.jsonl")), TEXTS
    if kind == "jsonl-field":
        _write_jsonl(tmp / "d.jsonl", [{"text": "x", "prompt": t} for t in TEXTS])
        return CalibrationSource(str(tmp / "d.jsonl"), field="prompt"), TEXTS
    if kind == "json-list":
        (tmp / "d.json").write_text(json.dumps([{"text": t} for t in TEXTS], indent=2))
        return CalibrationSource(str(tmp / "d.json")), TEXTS
    if kind == "json-lines":
        _write_jsonl(tmp / "d.json", [{"text": t} for t in TEXTS])
        return CalibrationSource(str(tmp / "d.json")), TEXTS
    if kind == "csv":
        pd.DataFrame({"n": range(3), "body": TEXTS}).to_csv(tmp / "d.csv", index=False)
        return CalibrationSource(str(tmp / "d.csv"), field="body"), TEXTS
    if kind == "parquet":
        pd.DataFrame({"text": TEXTS}).to_parquet(tmp / "d.parquet")
        return CalibrationSource(str(tmp / "d.parquet")), TEXTS
    if kind == "dataset":
        return CalibrationSource(str(_save_dataset(tmp / "ds", {"text": TEXTS}))), TEXTS
    if kind == "datasetdict":
        path = _save_dataset(tmp / "dd", {"text": TEXTS}, split="train")
        return CalibrationSource(str(path)), TEXTS
    if kind == "ids-jsonl":
        _write_jsonl(tmp / "d.jsonl", [{"input_ids": r} for r in IDS])
        return CalibrationSource(str(tmp / "d.jsonl")), IDS
    if kind == "ids-dataset":
        return CalibrationSource(str(_save_dataset(tmp / "ds", {"input_ids": IDS}))), IDS
    if kind == "ids-parquet":
        pd.DataFrame({"toks": IDS}).to_parquet(tmp / "d.parquet")
        return CalibrationSource(str(tmp / "d.parquet"), field="toks"), IDS
    raise AssertionError(kind)


KINDS = [
    "txt", "noext", "jsonl", "jsonl-field", "json-list", "json-lines", "csv", "parquet",
    "dataset", "datasetdict", "ids-jsonl", "ids-dataset", "ids-parquet",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_formats_round_trip(kind, tmp_path):
    source, expected = _make(kind, tmp_path)
    records = load_records(source)
    assert records == expected
    # Plain Python values, not numpy arrays / Arrow scalars.
    assert all(type(r) in (str, list) for r in records)
    if expected is IDS:
        assert all(type(t) is int for r in records for t in r)


def test_auto_field_prefers_text(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [1, 2], "text": "a b"}])
    assert load_records(CalibrationSource(str(path))) == ["a b"]
    assert load_records(CalibrationSource(str(path), field="input_ids")) == [[1, 2]]


def test_datasetdict_uses_train_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"text": ["val"]}),
         "train": datasets.Dataset.from_dict({"text": TEXTS})}
    )  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(CalibrationSource(str(tmp_path / "dd"))) == TEXTS


def test_hub_name_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": TEXTS})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_records(CalibrationSource("someorg/somedata")) == TEXTS
    assert calls == [("someorg/somedata", "train")]


def test_hub_unreachable_is_calibration_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("Couldn't reach it (no network)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationError) as e:
        load_records(CalibrationSource("someorg/missing"))
    msg = str(e.value)
    assert "someorg/missing" in msg and "does not exist locally" in msg
    assert "hub" in msg and "no network" in msg


# ------------------------------------------------------------------------- errors


def _error(source: CalibrationSource) -> str:
    with pytest.raises(CalibrationError) as e:
        load_records(source)
    assert source.path in str(e.value)
    return str(e.value)


def test_missing_file(tmp_path, monkeypatch):
    # A missing path that looks like a data file is never sent to the hub: the hub reader is
    # not called, and the message is the local one (the hub's says "could not be loaded").
    import mergekit_qp.calibration.data as data

    def no_hub(name, where):
        raise AssertionError(f"{name} was sent to the hub")

    monkeypatch.setattr(data, "_read_hub", no_hub)
    missing = str(tmp_path / "nope.jsonl")
    assert _error(CalibrationSource(missing)) == f"calibration data '{missing}' does not exist"
    assert _error(CalibrationSource("calib.txt")) == "calibration data 'calib.txt' does not exist"


def test_a_name_without_a_file_goes_to_the_hub(monkeypatch):
    import mergekit_qp.calibration.data as data

    asked = []
    monkeypatch.setattr(data, "_read_hub", lambda name, where: asked.append(name) or [{"text": "from the hub"}])
    assert load_records(CalibrationSource("someone/some-dataset")) == ["from the hub"]
    assert asked == ["someone/some-dataset"]


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.json", "e.csv", "e.parquet"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert "empty" in _error(CalibrationSource(str(tmp_path / name)))


@pytest.mark.parametrize(
    "name,content",
    [("blank.txt", "\n  \n\n"), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
     ("header.csv", "text\n"), ("emptytext.jsonl", '{"text": ""}\n')],
)  # fmt: skip
def test_no_records(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert "no records" in _error(CalibrationSource(str(tmp_path / name)))


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    assert "line 3" in _error(CalibrationSource(str(path)))
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    assert "line 3" in _error(CalibrationSource(str(path)))


def test_json_not_objects(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["b"]\n')
    assert "line 2" in _error(CalibrationSource(str(path)))


def test_missing_field_lists_available(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    msg = _error(CalibrationSource(str(path), field="content"))
    assert "content" in msg and "prompt" in msg and "answer" in msg
    # Auto mode: neither "text" nor "input_ids".
    msg = _error(CalibrationSource(str(path)))
    assert "prompt" in msg and "answer" in msg
    # CSV column missing.
    pd.DataFrame({"body": TEXTS}).to_csv(tmp_path / "d.csv", index=False)
    msg = _error(CalibrationSource(str(tmp_path / "d.csv"), field="text"))
    assert "'text'" in msg and "body" in msg


def test_field_missing_in_later_record(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b"}])
    msg = _error(CalibrationSource(str(path)))
    assert "record 2" in msg and "body" in msg


@pytest.mark.parametrize(
    "rows",
    [[{"text": 3}], [{"text": "a"}, {"text": None}], [{"input_ids": [1, "2"]}],
     [{"input_ids": [1, 2.5]}], [{"input_ids": [True, 2]}], [{"text": ["a", "b"]}],
     [{"input_ids": [1, 2]}, {"input_ids": "3 4"}]],
)  # fmt: skip
def test_wrong_type(tmp_path, rows):
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert "expected" in _error(CalibrationSource(str(path)))


def test_datasetdict_without_train_lists_splits(tmp_path):
    path = _save_dataset(tmp_path / "dd", {"text": TEXTS}, split="validation")
    assert "validation" in _error(CalibrationSource(str(path)))


def test_unreadable(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    assert "cannot read" in _error(CalibrationSource(str(tmp_path / "junk.parquet")))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    assert "cannot read" in _error(CalibrationSource(str(tmp_path / "latin.txt")))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("hi")
    assert "save_to_disk" in _error(CalibrationSource(str(tmp_path / "folder")))
    (tmp_path / "d.xlsx").write_bytes(b"x")
    assert "unsupported" in _error(CalibrationSource(str(tmp_path / "d.xlsx")))


def test_txt_with_other_field_is_an_error(tmp_path):
    (tmp_path / "d.txt").write_text("a b\n")
    assert load_records(CalibrationSource(str(tmp_path / "d.txt"), field="text")) == ["a b"]
    assert "prompt" in _error(CalibrationSource(str(tmp_path / "d.txt"), field="prompt"))


# -------------------------------------------------------------------- fingerprint


def test_fingerprint_file(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t, "p": t} for t in TEXTS])
    src = CalibrationSource(str(path))
    fp = calibration_fingerprint(src)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert calibration_fingerprint(CalibrationSource(str(path))) == fp  # stable
    # Same bytes under another name in another folder: same key.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.jsonl").write_bytes(path.read_bytes())
    assert calibration_fingerprint(CalibrationSource(str(tmp_path / "other" / "x.jsonl"))) == fp
    # Field changes the key, including explicit "text" vs auto.
    assert calibration_fingerprint(CalibrationSource(str(path), field="p")) != fp
    assert calibration_fingerprint(CalibrationSource(str(path), field="text")) != fp
    # One byte of data changes the key.
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))
    assert calibration_fingerprint(src) != fp


def test_fingerprint_directory(tmp_path):
    path = _save_dataset(tmp_path / "ds", {"text": TEXTS})
    src = CalibrationSource(str(path))
    fp = calibration_fingerprint(src)
    assert calibration_fingerprint(src) == fp
    arrow = next(path.glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-1] ^= 1
    arrow.write_bytes(bytes(data))
    fp2 = calibration_fingerprint(src)
    assert fp2 != fp
    (path / "extra.txt").write_text("x")  # a new file is part of the content too
    assert calibration_fingerprint(src) != fp2


def test_fingerprint_hub_name():
    a = calibration_fingerprint(CalibrationSource("org/a"))
    assert a == calibration_fingerprint(CalibrationSource("org/a"))
    assert a != calibration_fingerprint(CalibrationSource("org/b"))
    assert a != calibration_fingerprint(CalibrationSource("org/a", field="body"))


# ---------------------------------------------------------------------- tokenising


def _all_windows(records, seq_len):
    """Every candidate window, in order (samples large enough to keep all)."""
    return tokenize_calibration(records, None, samples=10**9, seq_len=seq_len)


def test_tokenize_text_adds_special_tokens_and_windows(tokenizer):
    long = " ".join(TEXTS)  # 21 words + <s> = 22 tokens
    expected = tokenizer(long, add_special_tokens=True)["input_ids"]
    assert expected[0] == tokenizer.bos_token_id and len(expected) == 22
    assert tokenizer.unk_token_id not in expected
    # 22 tokens -> windows 8, 8, 6; then with seq_len 10: 10, 10, 2 (a 2-token tail is kept).
    out = tokenize_calibration([long], tokenizer, samples=100, seq_len=8)
    assert [len(s) for s in out] == [8, 8, 6]
    assert torch.cat(out).tolist() == expected
    out = tokenize_calibration([long], tokenizer, samples=100, seq_len=10)
    assert [len(s) for s in out] == [10, 10, 2]
    assert torch.cat(out).tolist() == expected
    # A 1-token tail window is dropped: 22 = 7*3 + 1.
    out = tokenize_calibration([long], tokenizer, samples=100, seq_len=7)
    assert [len(s) for s in out] == [7, 7, 7]
    assert torch.cat(out).tolist() == expected[:21]


def test_packing_joins_records_into_full_windows(tokenizer):
    """Packed: every record's tokens then EOS, one stream, cut into full windows (the tail that
    does not fill one is dropped); the seeded choice then picks among the windows."""
    eos = tokenizer.convert_tokens_to_ids("<pad>")
    tokenizer.eos_token = "<pad>"  # the fixture's tokenizer has no EOS: lend it one
    try:
        records = [TEXTS[i % 3] for i in range(7)]
        stream = []
        for r in records:
            stream += tokenizer(r, add_special_tokens=True)["input_ids"] + [eos]
        out = tokenize_calibration(records, tokenizer, samples=100, seq_len=8, pack=True)
        assert [len(s) for s in out] == [8] * (len(stream) // 8)
        assert torch.cat(out).tolist() == stream[: len(stream) // 8 * 8]
        unpacked = tokenize_calibration(records, tokenizer, samples=100, seq_len=8)
        assert len(unpacked) > len(out) and sum(len(s) for s in unpacked) < len(stream)
        # a budget smaller than the windows: `samples` full windows, in stream order
        few = tokenize_calibration(records, tokenizer, samples=2, seq_len=8, pack=True, seed=1)
        windows = [stream[i:i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
        assert len(few) == 2 and all(s.tolist() in windows for s in few)
        assert windows.index(few[0].tolist()) < windows.index(few[1].tolist())
        # a stream shorter than one window stays whole
        short = tokenize_calibration([TEXTS[0]], tokenizer, samples=4, seq_len=500, pack=True)
        assert [s.tolist() for s in short] == [tokenizer(TEXTS[0])["input_ids"] + [eos]]
    finally:
        tokenizer.eos_token = None
    # token ids without a tokenizer: joined as they are (no EOS to add)
    out = tokenize_calibration(IDS, None, samples=10, seq_len=3, pack=True)
    assert [s.tolist() for s in out] == [[5, 6, 7], [8, 9, 10], [11, 12, 13]]


def test_tokenize_many_records(tokenizer):
    # More records than one tokenizer call handles: every one must be tokenised.
    records = [TEXTS[i % 3] for i in range(2500)]
    out = tokenize_calibration(records, tokenizer, samples=10**6, seq_len=64)
    assert len(out) == 2500
    assert out[-1].tolist() == tokenizer(records[-1])["input_ids"]


def test_short_record_kept_and_seq_len_one():
    out = tokenize_calibration([[7], [1, 2, 3]], None, samples=10, seq_len=2)
    assert [s.tolist() for s in out] == [[7], [1, 2]]  # [3] tail dropped, [7] is whole record
    out = tokenize_calibration([[1, 2, 3]], None, samples=10, seq_len=1)
    assert [s.tolist() for s in out] == [[1], [2], [3]]


def test_tokenize_deterministic_and_seeded(tokenizer):
    records = [f"{TEXTS[i % 3]} {TEXTS[(i + 1) % 3]}" for i in range(40)]
    a = tokenize_calibration(records, tokenizer, samples=10, seq_len=6, seed=3)
    b = tokenize_calibration(records, tokenizer, samples=10, seq_len=6, seed=3)
    assert len(a) == 10 and all(s.dtype == torch.long and s.dim() == 1 for s in a)
    assert [s.tolist() for s in a] == [s.tolist() for s in b]
    subsets = {
        tuple(tuple(s.tolist()) for s in tokenize_calibration(
            records, tokenizer, samples=10, seq_len=6, seed=seed))
        for seed in range(4)
    }  # fmt: skip
    assert len(subsets) > 1  # the seed matters


def test_pretokenised_pass_through():
    out = tokenize_calibration(IDS, None, samples=10, seq_len=16)
    assert [s.tolist() for s in out] == IDS


def test_pretokenised_vocab_check(tokenizer):
    vocab = len(tokenizer)
    assert tokenize_calibration([[0, vocab - 1]], tokenizer, samples=1, seq_len=4)[0].tolist() == [
        0, vocab - 1
    ]  # fmt: skip
    with pytest.raises(CalibrationError, match=str(vocab)):
        tokenize_calibration([[0, vocab]], tokenizer, samples=1, seq_len=4, source_name="src.jsonl")
    with pytest.raises(CalibrationError, match="src.jsonl"):
        tokenize_calibration([[-1, 2]], None, samples=1, seq_len=4, source_name="src.jsonl")


def test_tokenize_errors(tokenizer):
    with pytest.raises(CalibrationError, match="calibration_samples"):
        tokenize_calibration(IDS, None, samples=0, seq_len=4)
    with pytest.raises(CalibrationError, match="calibration_seq_len"):
        tokenize_calibration(IDS, None, samples=4, seq_len=0)
    with pytest.raises(CalibrationError, match="calibration_samples"):
        tokenize_calibration(IDS, None, samples=2.5, seq_len=4)
    with pytest.raises(CalibrationError, match="input_ids"):
        tokenize_calibration(TEXTS, None, samples=4, seq_len=4, source_name="mine")
    with pytest.raises(CalibrationError, match="mine"):
        tokenize_calibration([], tokenizer, samples=4, seq_len=4, source_name="mine")
    with pytest.raises(CalibrationError, match="mine"):
        tokenize_calibration([[]], None, samples=4, seq_len=4, source_name="mine")
    with pytest.raises(CalibrationError, match="mixes"):
        tokenize_calibration([[1, 2], "text"], tokenizer, samples=4, seq_len=4)


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=30), min_size=1, max_size=12),
    samples=st.integers(1, 20),
    seq_len=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_tokenize_properties(records, samples, seq_len, seed):
    everything = [s.tolist() for s in _all_windows(records, seq_len)]
    # Windows concatenate back to each record (minus a dropped 1-token tail).
    pos = 0
    for r in records:
        need = r if len(r) <= seq_len or len(r) % seq_len != 1 or seq_len == 1 else r[:-1]
        got = []
        while len(got) < len(need):
            got += everything[pos]
            pos += 1
        assert got == need
    assert pos == len(everything)

    out = [s.tolist() for s in tokenize_calibration(records, None, samples=samples,
                                                    seq_len=seq_len, seed=seed)]  # fmt: skip
    assert len(out) == min(samples, len(everything))
    assert all(1 <= len(s) <= seq_len for s in out)
    # Order preserved: the output is a subsequence of the candidate list.
    it = iter(everything)
    assert all(any(s == c for c in it) for s in out)


def test_load_calibration(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("\n".join(TEXTS))
    out = load_calibration(str(tmp_path / "d.txt"), tokenizer, samples=2, seq_len=64, seed=1)
    full = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len(out) == 2 and all(s.tolist() in full for s in out)
    src = CalibrationSource(str(tmp_path / "missing.txt"))
    with pytest.raises(CalibrationError, match="missing.txt"):
        load_calibration(src, tokenizer, samples=2, seq_len=64)


# ------------------------------------------------------------------------- batches


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), max_size=25),
    max_tokens=st.integers(1, 120),
)
def test_batches_properties(lengths, max_tokens):
    # Distinct, non-negative values so every sequence is identifiable; pad with -1.
    seqs, start = [], 0
    for n in lengths:
        seqs.append(torch.arange(start, start + n))
        start += n
    seen = []
    for ids, mask in batches(seqs, max_tokens=max_tokens, pad_id=-1):
        assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
        b, t = ids.shape
        assert b * t <= max_tokens or b == 1
        assert bool((ids == -1).eq(~mask).all())  # padding exactly where mask is False
        for row in range(b):
            n = int(mask[row].sum())
            assert mask[row, :n].all()  # right padding
            seen.append(ids[row, :n].tolist())
        assert int(mask.sum(1).max()) == t  # no all-padding columns
    assert sorted(seen) == sorted(s.tolist() for s in seqs)


def test_batches_deterministic_and_sorted():
    seqs = [torch.arange(n) for n in (3, 9, 1, 9, 4, 7)]
    a = list(batches(seqs, max_tokens=18))
    b = list(batches(seqs, max_tokens=18))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert [tuple(x[0].shape) for x in a] == [(2, 9), (2, 7), (2, 3)]
    assert list(batches([], max_tokens=8)) == []
    with pytest.raises(CalibrationError, match="max_tokens"):
        list(batches(seqs, max_tokens=0))


def test_import_is_cheap():
    code = (
        "import sys, mergekit_qp.calibration; "
        "print([m for m in ('torch', 'transformers', 'datasets', 'pandas') if m in sys.modules])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
