"""Bad input, faults and numerics through the real entry point (issue #7).

Every row of the table "bad input → behaviour" (docs/reliability.md) has a test here that runs the installed
`mergekit-yaml` (the plugin gets in through the start-up hook, not an import of ours). A process
costs ~10 s of imports, so the rows that fail (or succeed) within one merge run in one driver
process that calls `mergekit.scripts.run_yaml.main`, the function behind the `mergekit-yaml`
console script, once per config (`_DRIVER`); each row is still its own test. Rows that depend
on what a process leaves behind (the cache, a killed or failed write, two merges at once) run
the `mergekit-yaml` executable itself.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_models
from mergekit_qp.calibration.store import ModelStatistics
from test_end_to_end import executable

SAMPLES, SEQ_LEN = 8, 16
FAST = {"calibration_samples": SAMPLES, "calibration_seq_len": SEQ_LEN}


def clean_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"MERGEKIT_QP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def mergekit_yaml(config: Path, out: Path, cache: Path, *extra, **popen):
    return subprocess.run([executable("mergekit-yaml"), str(config), str(out), *extra], capture_output=True,
                          text=True, env=clean_env(cache), cwd=str(config.parent), **popen)


def looks_complete(out: Path) -> bool:
    """What a user (or transformers) takes for a finished model: a config and weights."""
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def cache_entries(cache: Path) -> dict:
    """cache entry name → metadata, for every statistics folder (the layer-streamed pass) or
    file (temporary and partial ones are listed too; lock files are not entries)."""
    entries = {}
    for path in sorted(cache.iterdir()):
        if path.suffix == ".lock":
            continue
        if path.is_dir():
            entries[path.name] = json.loads((path / "statistics.json").read_text())["metadata"]
            continue
        with safe_open(str(path), framework="pt") as f:
            entries[path.name] = f.metadata()
    return entries


def entry_of(cache: Path, model: Path) -> Path:
    (name,) = [n for n, meta in cache_entries(cache).items() if meta["model"] == str(model)]
    return cache / name


def config_file(path: Path, paths: dict, *, base=None, experts=None, parameters=None, model_parameters=None,
                calibration=None, method="output_qp", extra=None) -> Path:
    models = []
    for i, expert in enumerate(experts or (paths["expert_a"], paths["expert_b"])):
        p = dict(model_parameters or {}) if i == 0 else {}
        p.setdefault("calibration", str((calibration or {}).get(i, paths["calib_a"] if i == 0 else paths["calib_b"])))
        models.append({"model": str(expert), "parameters": p})
    config = {"merge_method": method, "base_model": str(base or paths["base"]), "models": models, "dtype": "float32",
              "parameters": {**FAST, **(parameters or {})}}
    config.update(extra or {})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- models and data ---------------------------------------------------------------------
def variant(src: Path, dst: Path, change=None, config_change=None, drop_tokenizer=False) -> Path:
    """A copy of a checkpoint folder with its weights and/or config.json changed."""
    shutil.copytree(src, dst)
    if change is not None:
        weights = load_file(str(dst / "model.safetensors"))
        change(weights)
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_change is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_change)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (dst / name).unlink(missing_ok=True)
    return dst


def other_shape(root: Path, name: str, **shape) -> Path:
    """An expert built like tiny_models' Llama but with some shapes changed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaConfig.from_pretrained(root / "base")
    cfg = base.to_dict()
    cfg.update(shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(root / name, safe_serialization=True)
    tiny_models.make_tokenizer("llama").save_pretrained(root / name)
    return root / name


def scaled_half(root: Path, dtype: torch.dtype, scale: float = 400.0) -> dict:
    """Base and experts stored in a 16-bit dtype, every norm scale ×`scale`: the inputs of the
    linear maps are ~`scale` in size, so their squares (Gram entries) exceed float16's 65504."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name in ("base", "expert_a", "expert_b"):
        model = AutoModelForCausalLM.from_pretrained(root / name)
        with torch.no_grad():
            for module_name, p in model.named_parameters():
                if "norm" in module_name:
                    p.mul_(scale)
        folder = root / f"{name}_{str(dtype)[6:]}"
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
        tiny_models.make_tokenizer("llama").save_pretrained(folder)
        out[name] = folder
    return out


def long_texts(path: Path, n: int = 6, words: int = 41) -> Path:
    with open(path, "w") as fp:
        for i in range(n):
            fp.write(json.dumps({"text": " ".join(tiny_models.WORDS[(i + j) % 60] for j in range(words + i))}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    paths = tiny_models.build("llama", root / "m")
    m = root / "m"
    data = root / "data"
    data.mkdir()

    def nan(weights):
        weights["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")

    def inf_last(weights):
        weights["model.norm.weight"][0] = float("inf")

    (data / "empty.jsonl").write_bytes(b"")
    (data / "latin1.txt").write_bytes("caf\xe9 w1 w2\n".encode("latin-1"))
    (data / "plain.jsonl").write_text("w1 w2 w3\nw4 w5\n")
    (data / "sheet.xlsx").write_bytes(b"PK\x03\x04")
    (data / "body.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    (data / "two.jsonl").write_text(json.dumps({"text": "w1 w2 w3"}) + "\n" + json.dumps({"text": "w4"}) + "\n")
    long_texts(data / "long.jsonl")
    # one short record per line (a quote, a sentence): far fewer tokens than samples x seq_len unpacked
    (data / "short.jsonl").write_text("".join(json.dumps({"text": f"w{i % 20} w{(i + 7) % 20} w{(i + 3) % 20}"}) + "\n"
                                              for i in range(200)))
    long_texts(data / "longer.jsonl", n=3, words=90)
    world = {
        **paths, "root": root, "data": data,
        "expert_nan": variant(paths["expert_a"], m / "expert_nan", change=nan),
        "base_inf": variant(paths["base"], m / "base_inf", change=inf_last),
        "base_no_tokenizer": variant(paths["base"], m / "base_no_tokenizer", drop_tokenizer=True),
        "expert_wide": other_shape(m, "expert_wide", intermediate_size=64),
        "expert_vocab": other_shape(m, "expert_vocab", vocab_size=80),
        "expert_shallow": other_shape(m, "expert_shallow", num_hidden_layers=1),
        "olmo2": {name: variant(paths[name], m / f"olmo2_{name}",
                                config_change={"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]})
                  for name in ("base", "expert_a", "expert_b")},
        "float16": scaled_half(m, torch.float16),
        "bfloat16": scaled_half(m, torch.bfloat16),
    }
    return world


# -- one process, many configs -----------------------------------------------------------
_DRIVER = r"""
import json, logging, os, sys, traceback
from mergekit.scripts.run_yaml import main   # the function behind the mergekit-yaml script

class Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

results = {}
for job in json.load(open(sys.argv[1])):
    os.environ["MERGEKIT_QP_CACHE"] = job["cache"]
    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        main.main([job["config"], job["out"], *job.get("options", [])], standalone_mode=False)
        results[job["name"]] = {"ok": True, "error": None, "log": keep.lines}
    except BaseException as error:  # noqa: BLE001 - reported to the test
        results[job["name"]] = {"ok": False, "error": f"{type(error).__name__}: {error}", "log": keep.lines,
                                "traceback": traceback.format_exc()[-3000:]}
    finally:
        logging.getLogger().removeHandler(keep)
json.dump(results, open(sys.argv[2], "w"))
"""


def _jobs(w) -> dict:
    """name → (config kwargs, what the result must show)."""
    d = w["data"]
    o2 = w["olmo2"]
    return {
        # First: it writes both experts' statistics into its own cache (later jobs with the same
        # statistics find them in the process's memory and write nothing).
        "reference": dict(),
        # calibration
        "calibration missing": dict(calibration={0: d / "nope" / "code.jsonl"}),
        "calibration empty": dict(calibration={1: d / "empty.jsonl"}),
        "calibration unreadable": dict(calibration={0: d / "latin1.txt"}),
        "calibration not JSON": dict(calibration={0: d / "plain.jsonl"}),
        "calibration unknown format": dict(calibration={0: d / "sheet.xlsx"}),
        "calibration without text field": dict(calibration={0: d / "body.jsonl"}),
        "calibration named field missing": dict(parameters={"calibration_field": "content"}),
        "base without tokenizer": dict(base=w["base_no_tokenizer"]),
        "sequences longer than the model takes": dict(calibration={0: d / "longer.jsonl"},
                                                      parameters={"calibration_seq_len": 100}),
        # configuration
        "misspelled parameter": dict(parameters={"rigde": 0.1}),
        "misspelled per-model parameter": dict(model_parameters={"wieght": 2.0}),
        "shared parameter under a model": dict(model_parameters={"basis": "task"}),
        "unknown basis": dict(parameters={"basis": "diagnol"}),
        "rank-0 basis": dict(parameters={"basis": "rank-0"}),
        "negative ridge": dict(parameters={"ridge": -0.5}),
        "slices that do not line up": dict(slices=True),
        "expert of another shape": dict(experts=(w["expert_a"], w["expert_wide"])),
        "expert of another vocabulary": dict(experts=(w["expert_vocab"], w["expert_b"])),
        "expert with fewer layers": dict(experts=(w["expert_a"], w["expert_shallow"])),
        "slice asking an expert for layers it lacks": dict(slices_from_shallow=True),
        "sequential on an unsupported architecture": dict(base=o2["base"], experts=(o2["expert_a"], o2["expert_b"]),
                                                          parameters={"sequential": True}),
        # checkpoints
        "NaN in an expert": dict(experts=(w["expert_nan"], w["expert_b"])),
        "Inf in the base, found mid-merge": dict(base=w["base_inf"], options=["--out-shard-size", "1"]),
        # succeeding rows
        "few tokens": dict(calibration={0: d / "two.jsonl"}),
        "texts longer than calibration_seq_len": dict(calibration={0: d / "long.jsonl"},
                                                      parameters={"calibration_seq_len": 8,
                                                                  "calibration_samples": 1000}),
        "short records": dict(calibration={0: d / "short.jsonl"}),
        "short records packed": dict(calibration={0: d / "short.jsonl"}, parameters={"calibration_packing": True}),
        "rank larger than the matrix": dict(parameters={"basis": "rank-1000"}),
        "float16 overflow": dict(half="float16"),
        "bfloat16": dict(half="bfloat16"),
    }


@pytest.fixture(scope="module")
def driven(world):
    """Every config of `_jobs`, merged (or refused) by one process; name → (result, out, cache)."""
    root = world["root"] / "driven"
    root.mkdir()
    jobs, where = [], {}
    for i, (name, spec) in enumerate(_jobs(world).items()):
        spec = dict(spec)
        options = spec.pop("options", [])
        config_path = root / f"job{i}.yml"
        if spec.pop("slices_from_shallow", False):  # both sources take layers 0–1; the expert has one layer
            calib = {"calibration": str(world["calib_a"])}
            config = {"merge_method": "output_qp", "base_model": str(world["base"]), "dtype": "float32",
                      "parameters": dict(FAST),
                      "slices": [{"sources": [{"model": str(world["base"]), "layer_range": [0, 2]},
                                              {"model": str(world["expert_shallow"]), "layer_range": [0, 2],
                                               "parameters": calib}]}]}
            config_path.write_text(yaml.safe_dump(config))
        elif spec.pop("slices", False):
            calib = {"calibration": str(world["calib_a"])}
            config = {"merge_method": "output_qp", "base_model": str(world["base"]), "dtype": "float32",
                      "slices": [{"sources": [{"model": str(world["base"]), "layer_range": [0, 1]},
                                              {"model": str(world["expert_a"]), "layer_range": [1, 2],
                                               "parameters": calib}]}]}
            config_path.write_text(yaml.safe_dump(config))
        elif (half := spec.pop("half", None)) is not None:
            models = world[half]
            config_file(config_path, world, base=models["base"], experts=(models["expert_a"], models["expert_b"]),
                        extra={"dtype": half})
        else:
            config_file(config_path, world, **spec)
        out, cache = root / f"out{i}", root / f"cache{i}"
        jobs.append({"name": name, "config": str(config_path), "out": str(out), "cache": str(cache),
                     "options": options})
        where[name] = (out, cache)
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "driver.py").write_text(_DRIVER)
    done = subprocess.run([sys.executable, str(root / "driver.py"), str(root / "jobs.json"), str(root / "results.json")],
                          capture_output=True, text=True, env=clean_env(root / "unused-cache"), cwd=str(root))
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((root / "results.json").read_text())
    return {name: (results[name], *where[name]) for name in results}


FAILS_EARLY = {
    "calibration missing": ["calibration data '", "nope/code.jsonl' does not exist"],
    "calibration empty": ["empty.jsonl': file is empty"],
    "calibration unreadable": ["latin1.txt': cannot read file", "utf-8"],
    "calibration not JSON": ["plain.jsonl': bad JSON on line 1"],
    "calibration unknown format": ["sheet.xlsx': unsupported file type '.xlsx'"],
    "calibration without text field": ["body.jsonl': no 'text' or 'input_ids' field", "['body']"],
    "calibration named field missing": ["calib_a.jsonl': field 'content' not found", "['text']"],
    "base without tokenizer": ["base model '", "base_no_tokenizer' has no tokenizer", "calib_a.jsonl"],
    "sequences longer than the model takes": ["takes at most 64 positions", "calibration_seq_len ≤ 64"],
    "misspelled parameter": ["unknown parameter 'rigde' in parameters; did you mean 'ridge'?"],
    "misspelled per-model parameter": ["unknown parameter 'wieght' in models[0]", "did you mean 'weight'?"],
    "shared parameter under a model": ["'basis' in models[0]", "is a shared parameter"],
    "unknown basis": ["invalid basis 'diagnol'", "valid: full, diagonal, task, rank-N"],
    "rank-0 basis": ["invalid basis 'rank-0'"],
    "negative ridge": ["ridge must be finite and ≥ 0", "-0.5"],
    "slices that do not line up": ["slices do not line up", "expert_a"],
    "expert of another shape": ["expert_wide has intermediate_size = 64", "has 48"],
    "expert of another vocabulary": ["expert_vocab has vocab_size = 80", "has 64", "tokenizer_source"],
    "expert with fewer layers": ["expert_shallow has 1 layers but the base model", "has 2"],
    "slice asking an expert for layers it lacks": ["takes layers 0–1 from model", "expert_shallow, which has 1 layers"],
    "sequential on an unsupported architecture": ["sequential: true does not support the 'olmo2' architecture"],
    "NaN in an expert": ["expert_nan' has NaN or Inf in tensor model.layers.0.mlp.up_proj.weight"],
}


@pytest.mark.parametrize("row", list(FAILS_EARLY))
def test_bad_input_fails_before_any_output(driven, row):
    """Refused while planning: the error names the file / parameter / model / tensor, and no
    output folder and no cache entry exist (no forward pass ran, or its result was dropped)."""
    result, out, cache = driven[row]
    assert not result["ok"], f"{row}: merged although it should not"
    for fragment in FAILS_EARLY[row]:
        assert fragment in result["error"], (fragment, result["error"])
    assert not out.exists()
    if cache.exists():  # an expert before the bad one may have sound statistics; nothing else is kept
        entries = cache_entries(cache)
        assert all(name == meta["cache_key"] + ".safetensors" for name, meta in entries.items()), entries


def test_nonfinite_base_tensor_fails_mid_merge_without_a_complete_looking_folder(driven):
    """Inf in a base tensor no forward pass reads: found when that tensor is merged, after
    other tensors were already written as shards (one tensor per shard here)."""
    result, out, _ = driven["Inf in the base, found mid-merge"]
    assert not result["ok"]
    assert "tensor model.norm.weight of model" in result["error"] and "base_inf" in result["error"]
    assert "NaN or Inf" in result["error"]
    assert list(out.glob("*.safetensors")), "expected shards written before the failure"
    assert not looks_complete(out)


def written(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def test_fewer_tokens_than_asked_merges_with_a_warning(driven):
    result, out, cache = driven["few tokens"]
    assert result["ok"], result.get("traceback")
    warning = " ".join(result["log"])
    assert "two.jsonl' gives 2 sequences" in warning and f"calibration_samples: {SAMPLES}" in warning
    assert all(torch.isfinite(t).all() for t in written(out).values())
    report = json.loads((out / "merge_report.json").read_text())
    assert 0 < report["rho"] <= 1  # 5 tokens for a width of 32: rank-deficient, still no worse than the base


def test_texts_longer_than_seq_len_are_cut_into_windows(driven, world):
    """Every token of the long texts enters, in windows of calibration_seq_len (a trailing
    window of a single token is dropped), counted independently from the tokenizer."""
    result, out, cache = driven["texts longer than calibration_seq_len"]
    assert result["ok"], result.get("traceback")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    lengths = [len(tokenizer(json.loads(line)["text"])["input_ids"])
               for line in (world["data"] / "long.jsonl").read_text().splitlines()]
    assert max(lengths) > 8
    expected = sum(n - (1 if n % 8 == 1 else 0) for n in lengths)
    meta = cache_entries(cache)[entry_of(cache, world["expert_a"]).name]
    assert int(meta["tokens"]) == expected and meta["seq_len"] == "8"
    assert looks_complete(out)


def test_short_records_warn_and_packing_fills_the_budget(driven, world):
    """One short record per line gives SAMPLES short sequences, under half the budget: a warning
    names calibration_packing. Packed, the records (each followed by EOS) fill SAMPLES full windows,
    and the report states the tokens each expert's statistics rest on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    records = [json.loads(line)["text"] for line in (world["data"] / "short.jsonl").read_text().splitlines()]
    per_record = len(tokenizer(records[0])["input_ids"])
    assert SAMPLES * per_record < SAMPLES * SEQ_LEN / 2
    result, out, cache = driven["short records"]
    assert result["ok"], result.get("traceback")
    log = " ".join(result["log"])
    assert "short.jsonl' gives" in log and "set calibration_packing: true" in log
    meta = cache_entries(cache)[entry_of(cache, world["expert_a"]).name]
    assert int(meta["tokens"]) == SAMPLES * per_record

    result, out, cache = driven["short records packed"]
    assert result["ok"], result.get("traceback")
    assert "calibration_packing" not in " ".join(result["log"])
    meta = cache_entries(cache)[entry_of(cache, world["expert_a"]).name]
    assert int(meta["tokens"]) == SAMPLES * SEQ_LEN
    report = json.loads((out / "merge_report.json").read_text())
    tokens = report["settings"]["calibration_tokens"]
    assert tokens[str(world["expert_a"])] == SAMPLES * SEQ_LEN
    assert f"Calibration tokens per expert (budget {SAMPLES} × {SEQ_LEN} = {SAMPLES * SEQ_LEN}, packed)" in \
        (out / "merge_report.md").read_text()
    assert looks_complete(out)


def test_rank_larger_than_the_matrix_is_the_full_solution(driven):
    result, out, _ = driven["rank larger than the matrix"]
    assert result["ok"], result.get("traceback")
    full, ranked = written(driven["reference"][1]), written(out)
    assert full.keys() == ranked.keys()
    for name in full:
        torch.testing.assert_close(ranked[name], full[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_checkpoints_accumulate_statistics_without_overflow(driven, world, half):
    """Linear inputs of ~400: Gram entries far beyond float16's range (65504). The statistics
    stay finite and exact in float32 storage, and the merge is finite and better than the base."""
    result, out, cache = driven["float16 overflow" if half == "float16" else "bfloat16"]
    assert result["ok"], result.get("traceback")
    biggest = 0.0
    for path in cache.rglob("*.safetensors"):
        stats = load_file(str(path))
        assert all(torch.isfinite(t).all() for t in stats.values()), path
        biggest = max(biggest, max(float(t.abs().max()) for t in stats.values()))
    assert biggest > 65504
    merged = written(out)
    assert all(t.dtype == getattr(torch, half) and torch.isfinite(t).all() for t in merged.values())
    report = json.loads((out / "merge_report.json").read_text())
    assert 0 < report["rho"] <= 1


# -- the statistics cache ------------------------------------------------------------------
def test_truncated_and_foreign_cache_entries_are_recomputed(driven, world, tmp_path):
    """A truncated entry, and a valid statistics file of another expert under this expert's
    key, are both ignored (a warning names each file) and recomputed; the merge equals the
    merge made with a sound cache, and the cache ends with sound entries only."""
    _, reference_out, reference_cache = driven["reference"]
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    entry_a, entry_b = entry_of(cache, world["expert_a"]), entry_of(cache, world["expert_b"])
    shard = entry_a / "layer-00001.safetensors"
    sound = shard.read_bytes()
    shard.write_bytes(sound[: len(sound) // 2])
    shutil.rmtree(entry_b)
    shutil.copytree(reference_cache / entry_a.name, entry_b)  # expert_a's statistics under expert_b's key
    config = config_file(tmp_path / "c.yml", world)  # the reference's config
    result = mergekit_yaml(config, tmp_path / "out", cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ignoring unusable cache file (cannot read statistics folder {entry_a}" in result.stderr
    assert f"{entry_b} holds statistics of another model" in result.stderr
    reference, again = written(reference_out), written(tmp_path / "out")
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    entries = cache_entries(cache)
    assert sorted(entries) == sorted([entry_a.name, entry_b.name])
    assert {meta["cache_key"] for meta in entries.values()} == set(entries)


def test_stale_cache_entries_are_not_reused(driven, world, tmp_path):
    """The expert's weights and the other expert's data change after a merge: both are
    recomputed (new entries), and the merge equals one made from freshly computed statistics."""
    from mergekit_qp.core import qp
    from mergekit_qp.calibration.cache import CalibrationSettings, expert_statistics

    _, _, reference_cache = driven["reference"]
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    expert = variant(world["expert_a"], tmp_path / "expert_a",
                     change=lambda w: w["model.layers.1.self_attn.o_proj.weight"].mul_(1.5))
    calib_b = tmp_path / "calib_b.jsonl"
    tiny_models.write_calibration(calib_b, 7, 25, 60)
    config = config_file(tmp_path / "c.yml", world, experts=(expert, world["expert_b"]),
                         calibration={1: calib_b})
    first = mergekit_yaml(config, tmp_path / "first", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    before = set(cache_entries(cache))
    # Now change both after their statistics were cached.
    weights = load_file(str(expert / "model.safetensors"))
    weights["model.layers.1.self_attn.o_proj.weight"] *= 0.5
    time.sleep(0.01)
    save_file(weights, str(expert / "model.safetensors"), metadata={"format": "pt"})
    with open(calib_b, "a") as fp:
        fp.write(json.dumps({"text": "w30 w31 w32 w33 w34 w35"}) + "\n")
    result = mergekit_yaml(config, tmp_path / "out", cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "output_qp statistics expert_a" in result.stderr and "output_qp statistics expert_b" in result.stderr
    assert len(set(cache_entries(cache)) - before) == 2

    settings = CalibrationSettings(samples=SAMPLES, seq_len=SEQ_LEN, cache_dir=str(tmp_path / "fresh"))
    stats = [expert_statistics(str(e), str(world["base"]), str(c), settings, torch.device("cpu"))
             for e, c in ((expert, world["calib_a"]), (world["expert_b"], calib_b))]
    module = "model.layers.1.self_attn.o_proj"
    w0 = load_file(str(world["base"] / "model.safetensors"))[f"{module}.weight"].double()
    deltas = [load_file(str(e / "model.safetensors"))[f"{module}.weight"].double() - w0
              for e in (expert, world["expert_b"])]
    update = qp.full_update(deltas, [s.lookup(module).gram for s in stats], [1.0, 1.0], 1e-4).double()
    torch.testing.assert_close(written(tmp_path / "out")[f"{module}.weight"].double(), w0 + update,
                               rtol=1e-5, atol=1e-6)


def test_two_merges_sharing_one_empty_cache_at_once(driven, world, tmp_path):
    config = config_file(tmp_path / "c.yml", world)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([executable("mergekit-yaml"), str(config), str(tmp_path / f"out{i}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env(cache),
                              cwd=str(tmp_path)) for i in range(2)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    one, two, reference = written(tmp_path / "out0"), written(tmp_path / "out1"), written(driven["reference"][1])
    assert all(torch.equal(one[k], two[k]) and torch.equal(one[k], reference[k]) for k in one)
    entries = cache_entries(cache)  # reads every entry: no temporary, partial or half-written one is left
    assert len(entries) == 2 and all(name == meta["cache_key"] for name, meta in entries.items())
    assert all(ModelStatistics.open(str(cache / name)).lookup("model.layers.1.mlp.down_proj") for name in entries)


# -- faults ---------------------------------------------------------------------------------
def test_merge_killed_midway_leaves_no_complete_looking_folder(world, driven, tmp_path):
    """SIGKILL once the first shard is on disk (one tensor per shard): no config.json."""
    config = config_file(tmp_path / "c.yml", world)
    out = tmp_path / "out"
    proc = subprocess.Popen([executable("mergekit-yaml"), str(config), str(out), "--out-shard-size", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env(driven["reference"][2]), cwd=str(tmp_path))
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("*.safetensors")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.fail("the merge finished before it could be interrupted")
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob("*.safetensors")) and not looks_complete(out)


def test_merge_killed_over_an_earlier_model_leaves_no_complete_looking_folder(world, driven, tmp_path):
    """Re-merging into a folder that holds a finished model: once the new merge writes its first
    shard the old config.json is gone, so a kill leaves no mix of old and new that loads."""
    config = config_file(tmp_path / "c.yml", world)
    out = tmp_path / "out"
    first = mergekit_yaml(config, out, driven["reference"][2])
    assert first.returncode == 0 and looks_complete(out), first.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    proc = subprocess.Popen([executable("mergekit-yaml"), str(config), str(out), "--out-shard-size", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env(driven["reference"][2]), cwd=str(tmp_path))
    deadline = time.monotonic() + 120

    def rewritten():
        return any(p.name not in before or p.stat().st_mtime_ns != before[p.name] for p in out.glob("*.safetensors"))

    while proc.poll() is None and time.monotonic() < deadline and not rewritten():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.fail("the merge finished before it could be interrupted")
    assert rewritten() and not looks_complete(out)


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_while_writing_the_model_names_the_folder(world, driven, tmp_path):
    """Files may not grow past 20 kB (EFBIG, as on a full disk): the model shard (~100 kB) cannot
    be written; statistics come from the cache."""
    cache = tmp_path / "cache"
    shutil.copytree(driven["reference"][2], cache)
    config = config_file(tmp_path / "c.yml", world)
    out = tmp_path / "out"
    result = mergekit_yaml(config, out, cache, preexec_fn=_file_size_limit(20_000))
    assert result.returncode != 0
    assert f"writing the merged model into {out} failed" in result.stderr
    assert "File too large" in result.stderr
    assert not looks_complete(out)


def test_full_disk_while_writing_the_cache_names_the_cache_file(world, tmp_path):
    config = config_file(tmp_path / "c.yml", world)
    cache, out = tmp_path / "cache", tmp_path / "out"
    result = mergekit_yaml(config, out, cache, preexec_fn=_file_size_limit(20_000))
    assert result.returncode != 0
    assert "cannot write the statistics of" in result.stderr and f"to the cache folder {cache}/" in result.stderr
    assert not out.exists()
    # no half-written entry for a later merge to pick up (a lock file is no entry)
    assert not [p for p in cache.iterdir() if p.suffix != ".lock"]
