"""Memory and time of merges at LLM layer geometry, against `ties` on the same slice.

Llama-layout slices (random init, bfloat16, made here, one safetensors shard per layer) of
2, 4 and 8 layers with two experts; every merge its own stock `mergekit-yaml` process; its
peak *anonymous* memory sampled from /proc/PID/status (RssAnon, summed over the process tree:
VmHWM would also count the checkpoint pages mergekit maps from disk). Variants:
- `ties` (density 0.5): the baseline of each slice;
- `output_qp`: statistics computed (layer-streamed pass, into an empty cache);
- `output_qp_cached`: the same merge again, statistics read from that cache;
- `sequential`: `sequential: true`.
Besides: the statistics' bytes on disk, and the statistics pass against a plain layer-by-layer
forward over the same tokens, with the multiply-add floor of that ratio (forward + Gram
products over forward) computed beside it.

    python benchmarks/scale.py --geometry quarter --layers 2 4 8 --threads 1
    python benchmarks/scale.py --geometry 7b --layers 2 --variants ties output_qp

`quarter` is the 7B layout at a quarter of its width (hidden 1024, MLP 3584, 8/2 heads, vocab
32000), which this 2-core machine merges in minutes; `7b` is Mistral-7B's (hidden 4096, MLP
14336, 32/8 heads, vocab 32000). Results: benchmarks/results/scale-<geometry>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

GEOMETRIES = {
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32000),
    "quarter": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                    vocab_size=32000),
}
VARIANTS = ("ties", "output_qp", "output_qp_cached", "sequential")


def llama_config(geometry: str, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(**GEOMETRIES[geometry], num_hidden_layers=layers, max_position_embeddings=4096,
                       tie_word_embeddings=False, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])


def write_model(folder: Path, config, expert: int) -> None:
    """A checkpoint of random weights, one shard per layer (and one for the rest). Each tensor
    is drawn from a generator seeded by its name, so the base never has to be held: an expert
    is the base plus a rank-8 update per matrix (expert 0 is the base)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    groups = {}
    for name in shapes:
        part = name.split(".")
        groups.setdefault(f"layer{int(part[2]):03d}" if part[1:2] == ["layers"] else "outer", []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for n, (group, names) in enumerate(sorted(groups.items())):
        file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            g = torch.Generator().manual_seed(hash_name(name))
            shape = shapes[name]
            if len(shape) == 1:
                w = torch.ones(shape)
            else:
                w = torch.randn(shape, generator=g) * 0.02
                if expert:
                    e = torch.Generator().manual_seed(hash_name(name) + 1000 * expert)
                    w += 0.01 * torch.randn(shape[0], 8, generator=e) @ torch.randn(8, shape[1], generator=e) / 8
            tensors[name] = w.to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def hash_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def write_calibration(path: Path, vocab: int, samples: int, seq_len: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fp:
        for _ in range(samples):
            fp.write(json.dumps({"input_ids": torch.randint(4, vocab, (seq_len,), generator=g).tolist()}) + "\n")


def merge_config(variant: str, models: dict, calibration: dict, samples: int, seq_len: int, cache: Path) -> dict:
    experts = ["expert_a", "expert_b"]
    if variant == "ties":
        return {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "bfloat16",
                "models": [{"model": str(models[e]), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}
    parameters = {"calibration_samples": samples, "calibration_seq_len": seq_len, "cache_dir": str(cache)}
    if variant == "sequential":
        parameters["sequential"] = True
    return {"merge_method": "output_qp", "base_model": str(models["base"]), "dtype": "bfloat16",
            "parameters": parameters,
            "models": [{"model": str(models[e]), "parameters": {"calibration": str(calibration[e])}} for e in experts]}


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fp:
            for line in fp:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def gpu_used_mb() -> int:
    """Memory in use on the GPUs (nvidia-smi), or 0 without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(int(x) for x in out.split())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def run_sampled(command, env, log: Path, interval: float = 0.05, gpu: bool = False) -> dict:
    """Wall time and peak RssAnon of the process tree (sampled); with `gpu`, peak GPU memory
    in use (nvidia-smi, every 0.5 s, less what was in use before)."""
    import psutil

    peak, gpu_peak, gpu_idle = [0], [0], gpu_used_mb() if gpu else 0
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
                except psutil.Error:
                    pids = [proc.pid]
                peak[0] = max(peak[0], sum(rss_anon_kb(p) for p in pids))
                if gpu:
                    gpu_peak[0] = max(gpu_peak[0], gpu_used_mb() - gpu_idle)
                time.sleep(interval if not gpu else 0.5)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        code = proc.wait()
        done.set()
        thread.join()
    result = {"returncode": code, "wall_s": time.perf_counter() - start, "peak_anon_gb": peak[0] * 1024 / 1e9}
    if gpu:
        result["peak_gpu_gb"] = gpu_peak[0] * 1.048576e6 / 1e9
    return result


PASS_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from mergekit_qp.calibration.cache import CalibrationSettings, compute_statistics
from mergekit_qp.calibration.data import CalibrationSource, batches, load_records, tokenize_calibration
from mergekit_qp.calibration.layers import Backbone, Batch, embed, run_layer
from mergekit_qp.calibration.checkpoint import Checkpoint
import transformers
model, calib, folder, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seq_len = int(sys.argv[6])
settings = CalibrationSettings(samples=samples, seq_len=seq_len)
start = time.perf_counter()
compute_statistics(model, model, CalibrationSource(calib), settings, torch.device("cpu"), folder=folder,
                   resume_every=None)
statistics_s = time.perf_counter() - start
# the plain forward over the same tokens, layer by layer from the same files, no hooks
config = transformers.AutoConfig.from_pretrained(model)
backbone, ckpt = Backbone(config), Checkpoint(model)
sequences = tokenize_calibration(load_records(CalibrationSource(calib)), None, samples=samples, seq_len=seq_len,
                                 seed=0, source_name=calib)
start = time.perf_counter()
state = embed(backbone, {"embed_tokens.weight": ckpt.get("model.embed_tokens.weight")},
              list(batches(sequences, max_tokens=settings.max_batch_tokens)), torch.device("cpu"))
for i in range(backbone.num_layers):
    prefix = f"model.layers.{i}."
    weights = {k[len(prefix):]: ckpt.get(k) for k in ckpt.files if k.startswith(prefix)}
    state = run_layer(backbone.layer(i, weights, torch.device("cpu")), i, state)
forward_s = time.perf_counter() - start
print(json.dumps({"statistics_s": statistics_s, "forward_s": forward_s}))
"""


def pass_ratio(models: dict, calibration: dict, samples: int, seq_len: int, threads: int, work: Path, config) -> dict:
    folder = work / "pass-stats"
    shutil.rmtree(folder, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", PASS_CHILD, str(models["expert_a"]), str(calibration["expert_a"]),
                          str(folder), str(samples), str(threads), str(seq_len)],
                         capture_output=True, text=True, env=child_env(threads), check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    h, f = config.hidden_size, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    forward = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * seq_len // 2 * h  # per token per layer (attention: mean length)
    grams = 3 * h * h + f * f  # q/k/v, o_proj, gate/up: h wide; down_proj: f wide
    result["ratio"] = result["statistics_s"] / result["forward_s"]
    result["floor"] = (forward + grams) / forward
    shutil.rmtree(folder, ignore_errors=True)
    return result


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="quarter")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergekit-qp-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs in --work")
    parser.add_argument("--cuda", action="store_true", help="merge on the GPU (mergekit's --cuda)")
    args = parser.parse_args()
    import mergekit_qp
    from mergekit_qp.cli.runner import mergekit_yaml_command

    rows, passes = [], {}
    for layers in args.layers:
        work = args.work / f"{args.geometry}-{layers}"
        shutil.rmtree(work, ignore_errors=True)
        config = llama_config(args.geometry, layers)
        models = {name: work / name for name in ("base", "expert_a", "expert_b")}
        for k, (name, folder) in enumerate(models.items()):
            write_model(folder, config, k)
        calibration = {e: work / f"calib_{e}.jsonl" for e in ("expert_a", "expert_b")}
        for k, (e, path) in enumerate(calibration.items()):
            write_calibration(path, config.vocab_size, args.samples, args.seq_len, seed=k)
        cache = work / "statistics"
        for variant in args.variants:
            kind = "output_qp" if variant == "output_qp_cached" else variant
            if variant == "output_qp":
                shutil.rmtree(cache, ignore_errors=True)
            cfg = work / f"{variant}.yml"
            cfg.write_text(json.dumps(merge_config(kind, models, calibration, args.samples, args.seq_len, cache)))
            out = work / f"out-{variant}"
            command = mergekit_yaml_command() + [str(cfg), str(out), "--random-seed", "0"] + (["--cuda"] * args.cuda)
            result = run_sampled(command, child_env(args.threads), work / f"{variant}.log", gpu=args.cuda)
            if result["returncode"] != 0:
                raise SystemExit(f"{variant} on {layers} layers failed; log {work / f'{variant}.log'}")
            row = {"layers": layers, "variant": variant, **result}
            if variant == "output_qp" and cache.exists():
                row["statistics_gb"] = folder_bytes(cache) / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if "output_qp" in args.variants and not args.cuda:
            passes[layers] = pass_ratio(models, calibration, args.samples, args.seq_len, args.threads, work, config)
            print(json.dumps({"layers": layers, **passes[layers]}), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args, rows, passes, mergekit_qp.__version__)


def provenance_of(args, version: str, **extra) -> dict:
    """Commit, versions, threads and date of a benchmark run, with its calibration budget."""
    import mergekit

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"commit": commit, "mergekit_qp": version, "mergekit": getattr(mergekit, "__version__", "?"),
            "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"), "calibration": f"{args.samples} x {args.seq_len} tokens per expert",
            **extra}


def write_results(args, rows, passes, version: str) -> None:
    provenance = provenance_of(args, version, geometry=GEOMETRIES[args.geometry], experts=2,
                               device="cuda" if args.cuda else "cpu")
    commit = provenance["commit"]
    name = f"scale-{args.geometry}" + ("-cuda" if args.cuda else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"provenance": provenance, "merges": rows,
                                                      "statistics_pass": passes}, indent=1))
    ties = {r["layers"]: r for r in rows if r["variant"] == "ties"}
    lines = [f"# Merges at {args.geometry} geometry: peak anonymous memory and wall time against ties", "",
             f"`python benchmarks/scale.py --geometry {args.geometry} --layers {' '.join(map(str, args.layers))} "
             f"--threads {args.threads}` — commit {commit}, mergekit-qp {version}, torch {torch.__version__}, "
             f"{provenance['date']}; geometry {GEOMETRIES[args.geometry]}; two experts; "
             f"{provenance['calibration']}. Peak = largest sampled sum of RssAnon over the merge's process tree.",
             "", "| layers | variant | peak anon (GB) | ÷ ties | wall (s) | ÷ ties | statistics on disk (GB) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = ties.get(r["layers"])
        ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else "—"  # noqa: E731
        stats = f"{r['statistics_gb']:.3f}" if "statistics_gb" in r else ""
        gpu = f" (GPU {r['peak_gpu_gb']:.2f})" if "peak_gpu_gb" in r else ""
        lines.append(f"| {r['layers']} | {r['variant']} | {r['peak_anon_gb']:.2f}{gpu} | {ratio('peak_anon_gb')} | "
                     f"{r['wall_s']:.1f} | {ratio('wall_s')} | {stats} |")
    if passes:
        lines += ["", "Statistics pass (one expert) against a plain layer-by-layer forward over the same tokens:", "",
                  "| layers | statistics pass (s) | plain forward (s) | ratio | multiply-add floor |",
                  "|---:|---:|---:|---:|---:|"]
        for layers, p in sorted(passes.items()):
            lines.append(f"| {layers} | {p['statistics_s']:.1f} | {p['forward_s']:.1f} | {p['ratio']:.2f} | "
                         f"{p['floor']:.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
