"""Statistics artifacts (`mergekit-qp statistics`, `statistics:` in the YAML): made in one process,
merged in another from the artifacts alone (no calibration file there, the folders moved),
bit-identical to the merge from raw data; the card's hashes; mismatched models, missing cards and
truncated shards refused with errors naming them; a killed pass resumes; config checks."""

import hashlib
import json
import os
import shutil

import pytest
import torch
import yaml

import tiny_models
from mergekit_qp.calibration.artifact import ArtifactError, open_artifact, produce_artifact
from mergekit_qp.calibration.cache import CalibrationSettings
from mergekit_qp.calibration.checkpoint import Checkpoint
from mergekit_qp.calibration.data import CalibrationSource
from mergekit_qp.calibration.store import ModelStatistics

# the merge's own defaults (calibration_samples 128, seq_len 512): what a raw-data merge computes
DEFAULTS = CalibrationSettings()


def cli(args, cache, check=True):
    from test_end_to_end import executable, run

    return run([executable("mergekit-qp"), *args], cache, check=check)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two experts' artifacts made by `mergekit-qp statistics` (its own process), and a merge of
    the same experts from the raw calibration data."""
    from test_end_to_end import executable, run

    root = tmp_path_factory.mktemp("artifact")
    paths = tiny_models.build("llama", root)
    cache = root / "cache"
    for expert, calib in (("expert_a", "calib_a"), ("expert_b", "calib_b")):
        cli(["statistics", str(paths[expert]), "--calibration", str(paths[calib]), "--base", str(paths["base"]),
             "--out", str(root / f"stats_{expert}")], cache)
    raw = root / "out_raw"
    config = tiny_models.write_config(root / "raw.yml", paths, "output_qp")
    run([executable("mergekit-yaml"), str(config), str(raw)], root / "cache_raw")
    return paths, root, raw


def artifact_config(paths, root, stats, name="from_stats.yml"):
    config = {"merge_method": "output_qp", "base_model": str(paths["base"]), "dtype": "float32",
              "models": [{"model": str(paths[e]), "parameters": {"statistics": str(stats[e])}}
                         for e in ("expert_a", "expert_b")]}
    path = root / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_merge_from_artifacts_alone_is_bit_identical_to_the_raw_data_merge(made):
    from test_end_to_end import executable, run

    paths, root, raw = made
    # "another machine": the artifacts moved elsewhere, the calibration files gone, a fresh cache
    moved = root / "elsewhere"
    moved.mkdir()
    stats = {e: shutil.copytree(root / f"stats_{e}", moved / e) for e in ("expert_a", "expert_b")}
    hidden = {k: paths[k].with_suffix(".hidden") for k in ("calib_a", "calib_b")}
    for k in hidden:
        paths[k].rename(hidden[k])
    try:
        out = root / "out_stats"
        run([executable("mergekit-yaml"), str(artifact_config(paths, root, stats)), str(out)], root / "cache_fresh")
    finally:
        for k in hidden:
            hidden[k].rename(paths[k])
    fresh = root / "cache_fresh"
    assert {p.name for p in fresh.iterdir()} <= {"file_hashes.json"} if fresh.exists() else True  # no pass ran
    merged, reference = Checkpoint(str(out)), Checkpoint(str(raw))
    assert sorted(merged.files) == sorted(reference.files)
    for name in reference.files:
        assert torch.equal(merged.get(name), reference.get(name)), name
    report, raw_report = (json.loads((d / "merge_report.json").read_text()) for d in (out, raw))
    assert report["rho"] == raw_report["rho"]


def test_card_holds_hashes_counts_and_no_text(made):
    paths, root, _ = made
    card = json.loads((root / "stats_expert_a" / "card.json").read_text())
    for name, digest in card["model"]["files"].items():
        assert digest == hashlib.sha256((paths["expert_a"] / name).read_bytes()).hexdigest(), name
    assert "model.safetensors" in card["model"]["files"] and "config.json" in card["model"]["files"]
    assert card["counts"]["sequences"] == 24 and card["counts"]["tokens"] > 24
    assert card["settings"]["calibration_samples"] == 128 and card["data"]["fingerprint"]
    assert {"mergekit_qp", "torch", "transformers"} <= set(card["versions"])
    text = paths["calib_a"].read_text().splitlines()[0]
    sample = json.loads(text)["text"]
    for file in (root / "stats_expert_a").iterdir():
        assert sample.encode() not in file.read_bytes(), file.name  # never the text itself
    for name, size in card["statistics"]["files"].items():
        assert (root / "stats_expert_a" / name).stat().st_size == size


def test_another_models_artifact_is_refused_naming_both_hashes(made):
    from test_end_to_end import executable, run

    paths, root, _ = made
    stats = {"expert_a": root / "stats_expert_b", "expert_b": root / "stats_expert_b"}
    out = root / "out_mismatch"
    result = run([executable("mergekit-yaml"), str(artifact_config(paths, root, stats, "mismatch.yml")), str(out)],
                 root / "cache_mismatch", check=False)
    assert result.returncode != 0
    card = json.loads((root / "stats_expert_b" / "card.json").read_text())
    mine = hashlib.sha256((paths["expert_a"] / "model.safetensors").read_bytes()).hexdigest()
    assert "were computed from another model than" in result.stderr and str(paths["expert_a"]) in result.stderr
    assert f"model {mine} vs statistics {card['model']['files']['model.safetensors']}" in result.stderr
    assert not (out / "config.json").exists()


def test_truncated_shard_and_missing_card_are_refused(made, tmp_path):
    paths, root, _ = made
    broken = shutil.copytree(root / "stats_expert_a", tmp_path / "broken")
    shard = next(p for p in broken.iterdir() if p.name.startswith("layer-"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=f"statistics shard {shard} is truncated \\(100 bytes, the card says"):
        open_artifact(str(broken), str(paths["expert_a"]), str(paths["base"]))
    (broken / "card.json").unlink()
    with pytest.raises(ArtifactError, match="is not a statistics artifact \\(no card.json"):
        open_artifact(str(broken), str(paths["expert_a"]), str(paths["base"]))
    with pytest.raises(ArtifactError, match="no such folder"):
        open_artifact(str(tmp_path / "nowhere" / "x" / "y"), str(paths["expert_a"]), str(paths["base"]))


class Killed(BaseException):
    """A kill as the pass sees it: not an error it cleans up after."""


def test_a_killed_artifact_run_resumes_and_equals_an_uninterrupted_one(made, tmp_path):
    paths, root, _ = made
    source = CalibrationSource(path=str(paths["calib_a"]))
    out = tmp_path / "stats"

    def kill_after_first(index):
        if index == 0:
            raise Killed

    args = (str(paths["expert_a"]), source, str(out), DEFAULTS)
    with pytest.raises(Killed):
        produce_artifact(*args, base_dir=str(paths["base"]), resume_every=0, after_layer=kill_after_first)
    assert not out.exists() and (tmp_path / "stats.partial" / "layer-00000.safetensors").is_file()
    ran = []
    card = produce_artifact(*args, base_dir=str(paths["base"]), resume_every=0, after_layer=ran.append)
    assert ran == [1]  # layer 0 not run again
    assert not (out / "request.json").exists() and not (tmp_path / "stats.partial").exists()
    reference = root / "stats_expert_a"
    assert card["model"] == json.loads((reference / "card.json").read_text())["model"]
    resumed, whole = ModelStatistics.open(str(out)), ModelStatistics.open(str(reference))
    assert set(resumed._keys) == set(whole._keys) and resumed.tokens == whole.tokens
    for key in whole._keys:
        assert torch.equal(resumed._get(key), whole._get(key)), key
    # a second run finds it complete; another request into the same folder is refused
    assert produce_artifact(*args, base_dir=str(paths["base"]))["created"] == card["created"]
    with pytest.raises(ArtifactError, match="already holds statistics of another model, data set or settings"):
        produce_artifact(str(paths["expert_b"]), source, str(out), DEFAULTS, base_dir=str(paths["base"]))


@pytest.mark.parametrize("snippet, message", [
    ("parameters: {statistics: ./s}", "statistics in parameters: an artifact describes one model"),
    ("models: [{model: a, parameters: {statistics: ./s, calibration: c.jsonl}}]",
     "gives both calibration and statistics: give one"),
])
def test_statistics_config_errors(snippet, message):
    from mergekit.config import MergeConfiguration

    import mergekit_qp
    from mergekit_qp import plugin

    mergekit_qp.register()
    text = "merge_method: output_qp\nbase_model: b\n" + snippet
    if "models:" not in snippet:
        text += "\nmodels: [{model: a, parameters: {calibration: c.jsonl}}]"
    with pytest.raises(ValueError, match=message):
        plugin.check_config(MergeConfiguration.model_validate(yaml.safe_load(text)))


def test_sequential_refuses_an_artifact(made):
    from test_end_to_end import executable, run

    paths, root, _ = made
    config = yaml.safe_load(artifact_config(paths, root, {e: root / f"stats_{e}" for e in ("expert_a", "expert_b")},
                                            "seq.yml").read_text())
    config["parameters"] = {"sequential": True}
    (root / "seq.yml").write_text(yaml.safe_dump(config))
    result = run([executable("mergekit-yaml"), str(root / "seq.yml"), str(root / "out_seq")], root / "cache_seq",
                 check=False)
    assert result.returncode != 0
    assert "sequential: true computes each layer's statistics on the merged layers' outputs" in result.stderr


def test_diagnose_takes_artifacts_and_gives_the_raw_data_rho(made, monkeypatch):
    """`mergekit-qp diagnose` / `compare` read ρ's statistics from `statistics:` too."""
    import mergekit_qp
    from mergekit_qp.plugin import diagnose

    mergekit_qp.register()
    paths, root, raw = made
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(root / "cache_diagnose"))
    stats = {e: root / f"stats_{e}" for e in ("expert_a", "expert_b")}
    from_artifacts = diagnose(str(root / "raw.yml"), str(raw),
                              calibration_config=str(artifact_config(paths, root, stats, "diag.yml")))
    from_data = json.loads((raw / "merge_report.json").read_text())
    assert from_artifacts["rho"] == pytest.approx(from_data["rho"], rel=1e-9)


def test_a_run_killed_before_its_card_finishes_without_a_pass_and_a_trailing_slash_works(made, tmp_path):
    """Killed after the pass renamed its folder into place but before the card: the next run
    writes the card without running a layer. `--out DIR/` is DIR (not DIR/.partial inside DIR)."""
    paths, root, _ = made
    source = CalibrationSource(path=str(paths["calib_a"]))
    out = tmp_path / "stats"
    card = produce_artifact(str(paths["expert_a"]), source, str(out) + "/", DEFAULTS, base_dir=str(paths["base"]))
    assert (out / "card.json").is_file() and not (out / ".partial").exists()
    (out / "card.json").unlink()
    (out / "request.json").write_text(json.dumps({k: card[k] for k in ("model", "tokenizer", "data", "settings")}))
    ran = []
    again = produce_artifact(str(paths["expert_a"]), source, str(out), DEFAULTS, base_dir=str(paths["base"]),
                             after_layer=ran.append)
    assert ran == [] and again["statistics"] == card["statistics"] and not (out / "request.json").exists()
    index = json.loads((out / "statistics.json").read_text())["metadata"]
    assert not {"model", "calibration", "cache_dir"} & set(index)  # no local paths published
    assert str(paths["calib_a"]) not in (out / "statistics.json").read_text()


def test_whole_model_pass_artifact_and_tokenizer_mismatch(made, tmp_path, monkeypatch):
    """An architecture without a layer adapter writes one shard under the same index; its
    statistics equal the layer-streamed artifact's (to float32 summation order). A base whose
    tokenizer differs is refused, naming the file and both hashes."""
    from mergekit_qp.calibration import cache

    paths, root, _ = made
    monkeypatch.setattr(cache, "streams", lambda config, model_dir: False)
    out = tmp_path / "whole"
    card = produce_artifact(str(paths["expert_a"]), CalibrationSource(path=str(paths["calib_a"])), str(out), DEFAULTS,
                            base_dir=str(paths["base"]))
    assert list(card["statistics"]["files"]) == ["statistics-all.safetensors"]
    whole = open_artifact(str(out), str(paths["expert_a"]), str(paths["base"]))
    layered = ModelStatistics.open(str(root / "stats_expert_a"))
    assert set(whole._keys) == set(layered._keys) and whole.tokens == layered.tokens
    for key in layered._keys:
        torch.testing.assert_close(whole._get(key), layered._get(key), rtol=1e-5, atol=1e-6)
    other_base = shutil.copytree(paths["base"], tmp_path / "other_base")
    tokenizer = other_base / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"', '"', 1) + " ")
    with pytest.raises(ArtifactError, match="tokenised with another tokenizer than the base model .*tokenizer.json: base"):
        open_artifact(str(out), str(paths["expert_a"]), str(other_base))


def test_a_hub_repository_id_is_read_from_the_hub_cache_offline(made, monkeypatch):
    """`statistics: someone/expert-a-stats` goes through huggingface_hub: here a repository laid out
    in a local hub cache (refs/main → snapshots/<commit>/), with the hub offline, gives the same ρ as
    the folder itself; an id the cache lacks is refused naming it."""
    import huggingface_hub.constants as hub
    import mergekit_qp
    from mergekit_qp.plugin import diagnose

    mergekit_qp.register()
    paths, root, raw = made
    cache = root / "hub"
    for expert in ("expert_a", "expert_b"):
        repo = cache / f"models--someone--{expert.replace('_', '-')}-stats"
        commit = hashlib.sha1(expert.encode()).hexdigest()
        shutil.copytree(root / f"stats_{expert}", repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MERGEKIT_QP_CACHE", str(root / "cache_hub"))
    ids = {e: f"someone/{e.replace('_', '-')}-stats" for e in ("expert_a", "expert_b")}
    from_hub = diagnose(str(root / "raw.yml"), str(raw), calibration_config=str(artifact_config(paths, root, ids, "hub.yml")))
    from_data = json.loads((raw / "merge_report.json").read_text())
    assert from_hub["rho"] == pytest.approx(from_data["rho"], rel=1e-9)
    with pytest.raises(ArtifactError, match="statistics 'someone/absent-stats': no such local folder, and fetching it"):
        open_artifact("someone/absent-stats", str(paths["expert_a"]), str(paths["base"]))
