"""Suite `lm`: a small Llama pretrained here, four domain experts, every merge method.

Builds (once, cached under bench_dir()/lm/<build key>/): four text domains from packages
(`code` CPython stdlib, `cdecl` libc6-dev headers, `man` man pages, `prose` English fortunes and
the Jargon File), a byte-level BPE tokenizer, a Llama base pretrained on the mix, and experts that
continue the base on one domain each, `gentle` (low lr: they keep the base's skill) and `hard`
(high lr: they forget), for each expert seed. Then merges the experts with every method of
`method_grid` through the stock `mergekit-yaml` and reports held-out loss per domain, gain kept,
ρ, merge wall time and peak memory. Results: OUT/lm.json, lm.md, lm.png.

    python benchmarks/lm.py                          # full: both settings, seeds 0 1
    python benchmarks/lm.py --build-only --threads 1 # models only, prints their losses
    python benchmarks/lm.py --smoke --out /tmp/x     # tiny, local Python text only, < 2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    RESULTS,
    clean_nan,
    fmt,
    mean,
    merge_config,
    method_grid,
    rho_function,
    run_merge,
    save_json,
    spearman,
    stderr,
    svc_cost_lines,
    svc_seconds,
)
from sources import (
    bench_dir,
    fetch_debian,
    fortune_files,
    fortunes,
    man_pages,
    man_paragraphs,
    read_text,
    split_of,
    stable_hash,
)

DOMAINS = ("code", "cdecl", "man", "prose")
DATA_VERSION = 1  # bump when the text extraction changes: it renames the cache
# Top-level files of the Debian `fortunes` package (English); the same folder also holds the
# Italian files of fortunes-it and other languages' folders.
ENGLISH_FORTUNES = {
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "love",
    "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets",
    "platitudes", "politics", "pratchett", "science", "songs-poems", "sports", "startrek", "tao",
    "translate-me", "wisdom", "work", "zippy",
}
MIN_GAIN = 0.02  # nats: an expert must gain this much on its own domain to count in gain kept


@dataclasses.dataclass(frozen=True)
class Build:
    """Everything that determines data and models. The data, tokenizer and base fields name the
    cache folder; the expert fields name each expert's folder, so tuning experts keeps the base."""

    smoke: bool
    chars_per_domain: int
    calibration_chars: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    context: int
    base_steps: int
    base_batch: int
    base_lr: float
    expert_steps: int
    expert_batch: int
    lrs: tuple  # ((setting, lr), ...)
    eval_windows: int
    calibration_samples: int

    def key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("expert_steps", "expert_batch", "lrs", "eval_windows", "calibration_samples")}
        payload = json.dumps([fields, DATA_VERSION, sys.version_info[:2]], sort_keys=True)
        return ("smoke-" if self.smoke else "full-") + hashlib.sha256(payload.encode()).hexdigest()[:12]


# 400 base steps of 16 x 128 tokens (about 8 min on one core) and 100 expert steps of 8 x 128 (about
# 50 s each): with batch 4 the lr-1e-3 experts were too noisy to improve even on their own domain.
FULL = Build(smoke=False, chars_per_domain=4_000_000, calibration_chars=400_000, vocab=4096, hidden=256,
             layers=4, heads=4, ffn=704, context=128, base_steps=400, base_batch=16, base_lr=2e-3,
             expert_steps=100, expert_batch=8, lrs=(("gentle", 2e-4), ("hard", 1e-3)), eval_windows=48,
             calibration_samples=128)
# A tiny model learns slowly per step, so the smoke lrs are higher; names keep their roles.
SMOKE = Build(smoke=True, chars_per_domain=100_000, calibration_chars=20_000, vocab=512, hidden=64, layers=2,
              heads=4, ffn=176, context=64, base_steps=40, base_batch=8, base_lr=5e-3, expert_steps=20,
              expert_batch=8, lrs=(("gentle", 2e-3), ("hard", 5e-3)), eval_windows=8, calibration_samples=16)


# ----------------------------------------------------------------------------- data


def stdlib_files(suffix: str) -> list[Path]:
    """Standard-library files, sorted, without tests, site-packages or caches."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob(f"*{suffix}")
                  if p.is_file() and not skip & set(p.relative_to(root).parts[:-1]))


def paragraph_docs(prefix: str, text: str) -> list[tuple[str, str]]:
    parts = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [(f"{prefix}/{i}", p) for i, p in enumerate(parts) if len(p) > 40]


def jargon_entries(text: str) -> list[tuple[str, str]]:
    """Glossary entries of the Jargon File (each starts with a line `   :term: ...`)."""
    entries, term, lines = [], None, []
    for line in text.splitlines():
        match = re.match(r"^   :([^:]+):", line)
        if match:
            if term:
                entries.append((f"prose/jargon/{term}", "\n".join(lines).strip()))
            term, lines = match.group(1), []
        if term:
            lines.append(line[3:])
    if term:
        entries.append((f"prose/jargon/{term}", "\n".join(lines).strip()))
    return entries


def domain_documents(domain: str, smoke: bool) -> list[tuple[str, str]]:
    """(key, text) of every document of a domain. Smoke mode reads the Python install only."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if domain == "code":
        return [(f"code/{p.relative_to(stdlib)}", read_text(p)) for p in stdlib_files(".py")]
    if smoke:
        if domain == "cdecl":
            include = Path(sysconfig.get_paths()["include"])
            return [(f"cdecl/{p.relative_to(include)}", read_text(p)) for p in sorted(include.rglob("*.h"))]
        if domain == "man":  # the interpreter's help topics read like manual pages
            from pydoc_data.topics import topics
            return [(f"man/{name}", text) for name, text in sorted(topics.items())]
        import codecs
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
            import this
        docs = [("prose/zen", codecs.decode(this.s, "rot13"))]
        for path in [stdlib / "LICENSE.txt", *sorted((stdlib / "idlelib").glob("*.txt"))]:
            if path.is_file():
                docs += paragraph_docs(f"prose/{path.name}", read_text(path))
        return docs
    debian = fetch_debian(bench_dir() / "raw")
    if domain == "cdecl":
        include = debian / "usr" / "include"
        return [(f"cdecl/{p.relative_to(include)}", read_text(p)) for p in sorted(include.rglob("*.h"))]
    if domain == "man":
        pages = [p for section in "12345678" for p in man_pages(debian, section)]
        docs = [(f"man/{p.name}", "\n\n".join(man_paragraphs(p))) for p in pages]
        return [(k, t) for k, t in docs if t]
    folder = debian / "usr" / "share" / "games" / "fortunes"
    docs = [(f"prose/{path.name}/{i}", quote) for path in fortune_files(folder) if path.name in ENGLISH_FORTUNES
            for i, quote in enumerate(fortunes(path))]
    return docs + jargon_entries(read_text(debian / "usr" / "share" / "doc" / "jargon-text" / "jargon.txt.gz"))


def capped(docs: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Documents in a fixed pseudo-random order (not the split's hash) until `limit` chars.

    Each is cut to limit/25 chars, so that a few huge files cannot fill a domain alone."""
    kept, total = [], 0
    for key, text in sorted(docs, key=lambda d: stable_hash("order/" + d[0])):
        if total >= limit:
            break
        text = text[: limit // 25]
        kept.append((key, text))
        total += len(text)
    return sorted(kept)


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def prepare_data(build: Build, root: Path) -> dict:
    """data/<domain>.{train,test}.jsonl and calibration/<domain>.jsonl (train split only)."""
    data, calib = root / "data", root / "calibration"
    data.mkdir(parents=True, exist_ok=True)
    calib.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for domain in DOMAINS:
        if not (calib / f"{domain}.jsonl").is_file():
            docs = capped(domain_documents(domain, build.smoke), build.chars_per_domain)
            split = {"train": [], "val": [], "test": []}
            for key, text in docs:  # by document, never by window
                split[split_of(key)].append({"key": key, "text": text})
            for name in ("train", "test"):
                write_jsonl(data / f"{domain}.{name}.jsonl", split[name])
            train_docs = [(r["key"], r["text"]) for r in split["train"]]
            write_jsonl(calib / f"{domain}.jsonl",
                        [{"text": text} for _, text in capped(train_docs, build.calibration_chars)])
        sizes[domain] = {name: sum(len(r["text"]) for r in read_jsonl(data / f"{domain}.{name}.jsonl"))
                         for name in ("train", "test")}
    return sizes


# ----------------------------------------------------------------------------- models


def train_tokenizer(build: Build, root: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    folder = root / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        texts = [r["text"] for d in DOMAINS for r in read_jsonl(root / "data" / f"{d}.train.jsonl")]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=build.vocab, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        # output_qp tokenises calibration text with add_special_tokens: <s> starts each sample
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")
        tmp = folder.with_name("tokenizer.part")
        shutil.rmtree(tmp, ignore_errors=True)
        fast.save_pretrained(str(tmp))
        tmp.rename(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def token_stream(tokenizer, texts: list[str]):
    """Documents as one 1-D tensor `<s> text </s> <s> text </s> ...`."""
    import torch

    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(build: Build, tokenizer, root: Path) -> dict:
    """A fixed set of full context-length windows per domain, evenly spread over the test split."""
    windows = {}
    for d in DOMAINS:
        stream = token_stream(tokenizer, [r["text"] for r in read_jsonl(root / "data" / f"{d}.test.jsonl")])
        chunks = stream[: len(stream) // build.context * build.context].view(-1, build.context)
        n = min(build.eval_windows, len(chunks))
        windows[d] = chunks[[i * len(chunks) // n for i in range(n)]]
    return windows


def train(model, streams: list, *, steps: int, batch: int, lr: float, seed: int, cosine: bool, desc: str,
          context: int | None = None, bf16: bool = False, on_step=None) -> dict:
    """AdamW on random windows; batch rows cycle over `streams` so a mix is balanced.

    `context`: window length (default the model's whole context). `bf16`: forward and backward under
    bfloat16 autocast (the float32 weights and optimiser stay float32): 3x faster on CPUs with AMX.
    `on_step(steps_done, model)`: called after every step (to save checkpoints)."""
    import torch
    from tqdm import tqdm

    context = context or model.config.max_position_embeddings
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc=desc, file=sys.stderr, leave=False)
    for step in bar:
        scale = (step + 1) / warmup if step < warmup else 1.0
        if cosine and step >= warmup:  # decay to 10 % so the base ends settled
            scale = 0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * (step - warmup) / (steps - warmup)))).item()
        for group in opt.param_groups:
            group["lr"] = lr * scale
        rows = []
        for r in range(batch):
            s = streams[(step * batch + r) % len(streams)]
            i = int(torch.randint(0, len(s) - context, (1,), generator=gen))
            rows.append(s[i:i + context])
        ids = torch.stack(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "tokens_per_s": round(steps * batch * context / seconds),
            "train_loss_first": round(losses[0], 3), "train_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 3)}


def save_model(model, tokenizer, folder: Path) -> None:
    """Written to a temporary folder and renamed, so a killed run never leaves a half model."""
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(folder)


def build_models(build: Build, root: Path, settings: list[str], seeds: list[int]) -> dict:
    """Base and experts (reruns skip finished ones); returns their paths and training logs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(build, root)
    log_path = root / "build.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    streams = {}

    def stream(d):
        if d not in streams:
            streams[d] = token_stream(tokenizer, [r["text"] for r in read_jsonl(root / "data" / f"{d}.train.jsonl")])
        return streams[d]

    base = root / "base"
    if not (base / "config.json").is_file():
        config = LlamaConfig(vocab_size=build.vocab, hidden_size=build.hidden, intermediate_size=build.ffn,
                             num_hidden_layers=build.layers, num_attention_heads=build.heads,
                             num_key_value_heads=build.heads, max_position_embeddings=build.context,
                             tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        log["base"] = train(model, [stream(d) for d in DOMAINS], steps=build.base_steps, batch=build.base_batch,
                            lr=build.base_lr, seed=0, cosine=True, desc="base")
        save_model(model, tokenizer, base)
        save_json(log_path, log)
    lrs = dict(build.lrs)
    experts = {}
    for setting in settings:
        for seed in seeds:
            experts[setting, seed] = {}
            for i, d in enumerate(DOMAINS):
                name = f"{setting}-lr{lrs[setting]:g}-steps{build.expert_steps}x{build.expert_batch}-seed{seed}"
                folder = root / "experts" / name / d
                experts[setting, seed][d] = folder
                if (folder / "config.json").is_file():
                    continue
                folder.parent.mkdir(parents=True, exist_ok=True)
                model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
                torch.manual_seed(1000 * seed + i)  # the seed changes the data order only
                log[f"{setting}-seed{seed}/{d}"] = train(
                    model, [stream(d)], steps=build.expert_steps, batch=build.expert_batch, lr=lrs[setting],
                    seed=1000 * seed + i + 1, cosine=False, desc=f"{setting} seed {seed} {d}")
                save_model(model, tokenizer, folder)
                save_json(log_path, log)
    return {"base": base, "experts": experts, "log": log, "windows": eval_windows(build, tokenizer, root)}


def heldout_losses(model_dir: Path, windows: dict) -> dict:
    """Mean next-token loss (nats/token) per domain on the fixed test windows (the shared held-out
    loss of mergekit_qp/cli/runner.py: every window is full length, so batch means weigh equally)."""
    from mergekit_qp.cli.runner import heldout_loss, load_causal_lm

    model = load_causal_lm(model_dir)
    return {d: heldout_loss(model, ((b, None) for b in w.split(16)), average="batch_means") for d, w in windows.items()}


# ----------------------------------------------------------------------------- metrics


def seed_metrics(losses: dict, base: dict, experts: dict) -> dict:
    """Per task: gain kept and normalised loss on that expert's own domain."""
    per_task, kept, normalized = {}, [], []
    for d in DOMAINS:
        gain = base[d] - experts[d][d]
        gain_kept = (base[d] - losses[d]) / gain if gain != 0 else float("nan")
        per_task[d] = {"loss": losses[d], "gain_kept": gain_kept}
        normalized.append(experts[d][d] / losses[d])
        if gain >= MIN_GAIN:
            kept.append(gain_kept)
    return {"gain_kept": mean(kept), "normalized": mean(normalized), "mean_loss": mean(losses.values()),
            "per_task": per_task}


def summarize(seed_rows: dict, calibration: str | None) -> dict:
    rows = list(seed_rows.values())

    def avg(key):
        return mean([r[key] for r in rows]) if all(r.get(key) is not None for r in rows) else None

    return {
        "gain_kept": avg("gain_kept"), "gain_kept_se": stderr([r["gain_kept"] for r in rows]),
        "normalized": avg("normalized"), "mean_loss": avg("mean_loss"),
        "per_task": {d: {k: mean([r["per_task"][d][k] for r in rows]) for k in ("loss", "gain_kept")}
                     for d in DOMAINS},
        "rho": avg("rho"), "rho_by_task": {d: mean([r["rho_by_task"][d] for r in rows]) for d in DOMAINS},
        "wall_s": avg("wall_s"), "cpu_s": avg("cpu_s"), "peak_rss_mb": avg("peak_rss_mb"), "svc_s": avg("svc_s"),
        "calibration": calibration, "seeds": seed_rows,
    }


# ----------------------------------------------------------------------------- runner


def run_setting(build: Build, root: Path, models: dict, setting: str, seeds: list[int], threads: int,
                smoke: bool, only: list[str] | None = None) -> dict:
    calibration = {d: root / "calibration" / f"{d}.jsonl" for d in DOMAINS}
    calib_params = {"calibration_samples": build.calibration_samples, "calibration_seq_len": build.context}
    budget = f"{build.calibration_samples} x {build.context}"
    grid = [m for m in method_grid(rank=32, smoke=smoke) if only is None or m.name in only]
    names = ["base", *(f"expert:{d}" for d in DOMAINS), *(m.name for m in grid)]
    per_seed = {name: {} for name in names}
    counted = {}
    for seed in seeds:
        experts = models["experts"][setting, seed]
        # statistics computed once here; every output_qp merge reads them from the same cache
        rho = rho_function(models["base"], experts, calibration, calib_params, root / "statistics")

        def evaluate(folder, rho=rho):
            return {"losses": heldout_losses(folder, models["windows"]), **rho(folder)}

        refs = {"base": evaluate(models["base"]), **{f"expert:{d}": evaluate(experts[d]) for d in DOMAINS}}
        base_losses = refs["base"]["losses"]
        expert_losses = {d: refs[f"expert:{d}"]["losses"] for d in DOMAINS}
        counted[str(seed)] = [d for d in DOMAINS if base_losses[d] - expert_losses[d][d] >= MIN_GAIN]
        for name, row in refs.items():
            per_seed[name][str(seed)] = {**row, **seed_metrics(row["losses"], base_losses, expert_losses)}
        for method in grid:
            out = root / "merges" / f"{setting}-seed{seed}" / re.sub(r"[^A-Za-z0-9_.-]", "_", method.name)
            config = merge_config(method, models["base"], experts, calibration, calib_params, root / "statistics")
            cost = run_merge(config, out, root / "logs" / f"{setting}-seed{seed}", threads=threads)
            if method.svc_of:
                cost["svc_s"] = svc_seconds(models["base"], experts, out)
            row = {**evaluate(out), **cost}
            shutil.rmtree(out)  # a merged model is 20 MB; sixty of them add up
            per_seed[method.name][str(seed)] = {**row, **seed_metrics(row["losses"], base_losses, expert_losses)}
            m = per_seed[method.name][str(seed)]
            print(f"[lm] {setting} seed {seed} {method.name}: gain kept {fmt(m['gain_kept'])}, mean loss "
                  f"{fmt(m['mean_loss'])}, rho {fmt(m['rho'])}, {cost['wall_s']:.1f} s", file=sys.stderr, flush=True)
    calibrated = {m.name for m in grid if m.calibrated}
    methods = {name: summarize(per_seed[name], budget if name in calibrated else None) for name in names}
    for m in grid:
        methods[m.name]["svc_of"] = m.svc_of
    ties = methods.get("ties", {}).get("wall_s")
    for row in methods.values():
        row["wall_vs_ties"] = row["wall_s"] / ties if row["wall_s"] and ties else None
    merged = [m.name for m in grid if methods[m.name]["gain_kept"] is not None]
    return {"methods": methods, "tasks_counted": counted,
            "spearman_rho_vs_gain_kept": spearman([methods[n]["rho"] for n in merged],
                                                  [methods[n]["gain_kept"] for n in merged])}


def merge_into_previous(previous: dict, fresh: dict, grid_names: list[str]) -> dict:
    """`--update`: one setting's re-run rows over those of the previous result, in grid order.
    Reference rows (base, experts) come from this run; a kept row keeps its time ratio to the
    ties of its own run (ties is re-run beside the new rows for theirs)."""
    names = ["base", *(f"expert:{d}" for d in DOMAINS), *grid_names]
    methods = {}
    for name in names:
        row = fresh["methods"].get(name) or previous["methods"].get(name)
        if row is None:
            raise SystemExit(f"--update: no row {name!r} in the previous lm.json and not re-run; add it to --methods")
        methods[name] = row
    merged = [n for n in grid_names if methods[n]["gain_kept"] is not None]
    return {"methods": methods, "tasks_counted": fresh["tasks_counted"],
            "spearman_rho_vs_gain_kept": spearman([methods[n]["rho"] for n in merged],
                                                  [methods[n]["gain_kept"] for n in merged])}


def render(result: dict) -> str:
    lines = ["# Suite `lm`: held-out loss of merged domain experts", "",
             ("Loss in nats/token on the test split (lower is better). Gain kept = (L_base − L_merged) / "
             "(L_base − L_expert) on each expert's own domain, averaged over tasks whose expert gains at least "
             f"{MIN_GAIN} nats there, then over seeds (± one standard error across seeds). Normalized = "
             "L_expert / L_merged on the own domain. ρ: residual energy captured on the calibration data. "
             "An `expert:<domain>` row scores that expert alone as if it were the merge (gain kept 1 on its own "
             "domain, negative on the others). The benchmark computes each expert's statistics once, untimed, "
             "for ρ, so every output_qp merge here finds them in its cache (the cost of computing them: "
             "perf.md)."), ""]
    lines += [note for n in result["meta"].get("notes", []) for note in (n, "")]
    for setting, block in result["settings"].items():
        lines += [f"## Setting `{setting}`", "",
                  "| method | gain kept (± se) | normalized | mean loss | " + " | ".join(DOMAINS)
                  + " | ρ | merge wall s (× ties) | peak RSS MB | calibration |",
                  "|---" * (8 + len(DOMAINS)) + "|"]
        for name, m in block["methods"].items():
            wall = "–" if m["wall_s"] is None else f"{m['wall_s']:.1f} ({fmt(m['wall_vs_ties'], 2)}×)"
            lines.append(f"| {name} | {fmt(m['gain_kept'])} ± {fmt(m['gain_kept_se'])} | {fmt(m['normalized'])} | "
                         f"{fmt(m['mean_loss'])} | " + " | ".join(fmt(m["per_task"][d]["loss"]) for d in DOMAINS)
                         + f" | {fmt(m['rho'])} | {wall} | {fmt(m['peak_rss_mb'], 0)} | {m['calibration'] or '–'} |")
        counted = "; ".join(f"seed {s}: {', '.join(ds) or 'none'}" for s, ds in block["tasks_counted"].items())
        svc_lines = svc_cost_lines(block["methods"])
        lines += ["", *svc_lines] if svc_lines else []
        lines += ["", (f"Tasks counted in gain kept ({counted}). Spearman correlation of ρ and gain kept across "
                  f"merged methods: {fmt(block['spearman_rho_vs_gain_kept'], 2)}."), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["settings"])
    names = [n for n in next(iter(result["settings"].values()))["methods"] if n != "base"]
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(names) * len(settings) + 1.2))
    height = 0.8 / len(settings)
    for k, setting in enumerate(settings):
        methods = result["settings"][setting]["methods"]
        # a row missing from a setting (not run there) draws no bar
        values = [methods[n]["gain_kept"] if n in methods and methods[n]["gain_kept"] is not None else float("nan")
                  for n in names]
        errors = [(methods[n]["gain_kept_se"] or 0.0) if n in methods else 0.0 for n in names]
        ax.barh([i + k * height for i in range(len(names))], values, height, xerr=errors, label=setting)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("gain kept on own domain (1 = expert, 0 = base)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on local Python text only")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; smoke: work folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, nargs="+", help="expert seeds (default 0 1; smoke 0)")
    parser.add_argument("--settings", nargs="+", choices=["gentle", "hard"], help="default both; smoke gentle")
    parser.add_argument("--build-only", action="store_true", help="build and evaluate base and experts, no merges")
    parser.add_argument("--methods", help="comma-separated subset of the method grid's row names")
    parser.add_argument("--update", action="store_true",
                        help="re-run --methods (and ties, the time baseline) into the existing OUT/lm.json")
    args = parser.parse_args()
    grid_names = [m.name for m in method_grid(rank=32, smoke=args.smoke)]
    only = None
    if args.update and not args.methods:
        parser.error("--update needs --methods")
    if args.methods:
        only = args.methods.split(",") + (["ties"] if args.update else [])
        unknown = sorted(set(only) - set(grid_names))
        if unknown:
            parser.error(f"unknown method(s) {unknown}; known: {grid_names}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAYON_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    build = SMOKE if args.smoke else FULL
    seeds = args.seeds or ([0] if args.smoke else [0, 1])
    settings = args.settings or (["gentle"] if args.smoke else ["gentle", "hard"])
    root = bench_dir() / "lm" / build.key()
    out = args.out or (root / "results" if args.smoke else RESULTS)
    start = time.perf_counter()
    sizes = prepare_data(build, root)
    print(f"[lm] text chars per domain and split: {sizes}", file=sys.stderr)
    models = build_models(build, root, settings, seeds)
    print(f"[lm] data and models ready in {time.perf_counter() - start:.0f} s under {root}", file=sys.stderr)
    if args.build_only:
        print("| model | " + " | ".join(DOMAINS) + " | mean |\n" + "|---" * (len(DOMAINS) + 2) + "|")
        rows = [("base", models["base"])] + [(f"{s} seed {k} expert:{d}", p) for (s, k), e in
                                            models["experts"].items() for d, p in e.items()]
        for name, folder in rows:
            losses = heldout_losses(folder, models["windows"])
            print(f"| {name} | " + " | ".join(f"{losses[d]:.3f}" for d in DOMAINS) + f" | {mean(losses.values()):.3f} |")
        print(f"[lm] build-only done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return
    import transformers

    result = {"meta": {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
        "build": dataclasses.asdict(build), "lrs": dict(build.lrs), "seeds": seeds,
        "steps": {"base": build.base_steps, "expert": build.expert_steps},
        "budget": {"calibration": f"{build.calibration_samples} samples x {build.context} tokens per expert",
                   "eval": f"{build.eval_windows} windows x {build.context} tokens per domain"},
        "data_chars": sizes, "training": models["log"], "min_gain_nats": MIN_GAIN,
    }, "settings": {}}
    previous = None
    if args.update:
        previous = json.loads((out / "lm.json").read_text())
        if sorted(previous["meta"]["seeds"]) != sorted(seeds):
            raise SystemExit(f"--update: {out / 'lm.json'} has seeds {previous['meta']['seeds']}, this run {seeds}")
        if previous["meta"]["build"] != json.loads(json.dumps(dataclasses.asdict(build))):
            raise SystemExit(f"--update: {out / 'lm.json'} is of another build (smoke or sizes differ)")
        missing = [s for s in settings if s not in previous["settings"]]
        if missing:
            raise SystemExit(f"--update: {out / 'lm.json'} has no setting {', '.join(missing)} to update; run it in full")
        result = {**previous, "meta": {**previous["meta"]}, "settings": dict(previous["settings"])}
        note = (f"Rows re-measured in a later run (`lm.py --update --settings {' '.join(settings)}`): "
                f"{', '.join(n for n in only if n != 'ties')} (and ties, their time baseline); each row's × ties is "
                "against ties of its own run.")
        result["meta"]["notes"] = [*previous["meta"].get("notes", []), note]
    for setting in settings:
        fresh = run_setting(build, root, models, setting, seeds, args.threads, args.smoke, only)
        if previous is not None:
            fresh = merge_into_previous(previous["settings"][setting], fresh, grid_names)
        result["settings"][setting] = fresh
        # the issue asks for a top-level "methods": the gentle setting (else the first one run)
        result["methods"] = result["settings"].get("gentle", result["settings"][settings[0]])["methods"]
        if previous is None:
            result["meta"]["total_s"] = round(time.perf_counter() - start, 1)
        save_json(out / "lm.json", clean_nan(result))
        (out / "lm.md").write_text(render(result) + "\n", encoding="utf-8")
        plot(result, out / "lm.png")
    print(render(result))


if __name__ == "__main__":
    main()
