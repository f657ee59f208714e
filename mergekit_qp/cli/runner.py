"""Running merges and scoring the merged models, shared by `mergekit-qp compare`, `mergekit-qp demo`
and the benchmarks: one subprocess runner for the stock `mergekit-yaml` (wall time, CPU time and
peak RSS of the merge's process tree) and one held-out loss (mean next-token cross-entropy).

Peak memory is read by a thin launcher process, not by the caller: on Linux a child's ru_maxrss
starts from the memory of the process it was forked from (the high-water mark survives fork and
exec), so a caller holding models in memory would add its own size to every merge. The launcher
starts the command, waits for it with os.wait4 (whose ru_maxrss is the largest of the command and
of the descendants it waited for) and reports the cost on its own stdout.

This module never imports mergekit (the merge runs in its own process).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

# argv: LOG COMMAND...; the command's stdout and stderr go to LOG (appended), the cost to stdout.
# Ctrl-C reaches the command itself (same process group); SIGTERM (a timeout) kills the command.
LAUNCHER = r"""
import json, os, signal, subprocess, sys, time
log = open(sys.argv[1], "ab")
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *_: child.kill())
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": os.waitstatus_to_exitcode(status)}))
"""

TAIL_LINES = 40  # lines of a command's output kept in ProcessRun.output_tail


@dataclass
class ProcessRun:
    """One command run through the launcher. wall_s / cpu_s / peak_rss_mb are NaN when the
    launcher itself failed (the command could not be started)."""

    command: List[str]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    log: Optional[Path]  # the command's output (None: a temporary file, already removed)
    output_tail: str  # its last TAIL_LINES lines of output (stdout and stderr together)
    timed_out: Optional[float] = None  # the timeout in seconds when the command was killed by it

    def cost(self) -> dict:
        """The fields the result files carry: wall_s, cpu_s, peak_rss_mb."""
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "peak_rss_mb": self.peak_rss_mb}


class MergeFailed(RuntimeError):
    """A merge process (`mergekit-yaml`) that exited non-zero, timed out or wrote no config.json."""

    def __init__(self, config: PathLike, out_dir: PathLike, run: ProcessRun):
        self.config, self.out_dir, self.run = Path(config), Path(out_dir), run
        if run.timed_out is not None:
            why = f"killed after the {run.timed_out:g} s timeout"
        elif run.returncode != 0:
            why = f"exit {run.returncode}"
        else:
            why = "exit 0 without writing config.json"
        log = f"; log {run.log}" if run.log is not None else ""
        super().__init__(f"the merge of {self.config} into {self.out_dir} failed ({why}){log}; "
                         f"last lines of its output:\n{run.output_tail}")


def mergekit_yaml_command() -> List[str]:
    """The command prefix of the stock `mergekit-yaml` of this interpreter's environment: the
    script beside the interpreter, else the one on PATH, else `python -m mergekit.scripts.run_yaml`."""
    for name in ("mergekit-yaml", "mergekit-yaml.exe"):
        beside = Path(sys.executable).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return [str(beside)]
    found = shutil.which("mergekit-yaml")
    return [found] if found else [sys.executable, "-m", "mergekit.scripts.run_yaml"]


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    with open(path, "rb") as fp:
        fp.seek(0, os.SEEK_END)
        fp.seek(max(0, fp.tell() - 256 * 1024))
        text = fp.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def run_measured(command: Sequence[str], *, log: Optional[PathLike] = None, env: Optional[Mapping[str, str]] = None,
                 timeout: Optional[float] = None) -> ProcessRun:
    """Run `command` in its own process through the launcher: wall time, CPU time and peak RSS
    of its process tree. Its output goes to `log` (first line `$ COMMAND`; a temporary file when
    None). `env`: variables set on top of this process's environment. Never raises for the
    command's own failure: see `returncode`, `timed_out` and `output_tail`."""
    command = [str(c) for c in command]
    temporary = log is None
    if temporary:
        fd, name = tempfile.mkstemp(prefix="mergekit-qp-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    else:
        log_path = Path(log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        log_path.write_text("$ " + " ".join(command) + "\n", encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(log_path), *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        timed_out = None
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the launcher kills the command and still reports
            out, err = proc.communicate()
            timed_out = timeout
        report = None
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                report = json.loads(line)
                break
        tail = _tail(log_path)
        if report is None:  # the launcher failed: its own error is the output that matters
            tail = "\n".join([tail, *err.splitlines()][-TAIL_LINES:])
            report = {"wall_s": math.nan, "cpu_s": math.nan, "peak_rss_mb": math.nan,
                      "returncode": proc.returncode or 1}
        return ProcessRun(command=command, returncode=int(report["returncode"]), wall_s=report["wall_s"],
                          cpu_s=report["cpu_s"], peak_rss_mb=report["peak_rss_mb"],
                          log=None if temporary else log_path, output_tail=tail, timed_out=timed_out)
    finally:
        if temporary:
            log_path.unlink(missing_ok=True)


def write_config(path: PathLike, config: Mapping[str, Any], comment: Optional[str] = None) -> Path:
    """A merge config as YAML (keys in their order; `comment`: a first `# ...` line)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
    path.write_text((f"# {comment}\n" if comment else "") + text, encoding="utf-8")
    return path


def run_merge(config: PathLike, out_dir: PathLike, *, options: Sequence[str] = ("--random-seed", "0"),
              log: Optional[PathLike] = None, env: Optional[Mapping[str, str]] = None,
              timeout: Optional[float] = None) -> ProcessRun:
    """`mergekit-yaml CONFIG OUT_DIR OPTIONS...` in its own process (OUT_DIR is emptied first):
    returns its wall time, CPU time and peak RSS. Raises MergeFailed, naming the config and the
    output folder with the last lines of the merge's output, unless it exits 0 having written
    OUT_DIR/config.json."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    run = run_measured([*mergekit_yaml_command(), str(config), str(out_dir), *options], log=log, env=env,
                       timeout=timeout)
    if run.returncode != 0 or run.timed_out is not None or not (out_dir / "config.json").is_file():
        raise MergeFailed(config, out_dir, run)
    return run


# -- held-out loss --------------------------------------------------------------------------------
def load_causal_lm(model_dir: PathLike, device: str = "cpu"):
    """The causal LM saved in model_dir, in float32 on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[Tuple[Any, Any]]:
    """(input_ids, attention_mask) batches of `batch_size` sequences in their order, right-padded
    with pad_id; the mask is True on real tokens."""
    import torch

    for start in range(0, len(sequences), batch_size):
        chunk = [torch.as_tensor(s, dtype=torch.long) for s in sequences[start:start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = True
        yield ids, mask


def heldout_loss(model, batches: Iterable[Tuple[Any, Any]], *, device: str = "cpu", logits_dtype: str = "float64",
                 average: str = "tokens") -> float:
    """Mean next-token cross-entropy (nats/token) of a causal LM on held-out batches.

    `model`: a loaded causal LM, or its folder (loaded by `load_causal_lm`). `batches`:
    (input_ids, attention_mask) pairs, right-padded, mask True on real tokens (padding is never
    scored), or mask None when every token is real (the model then gets no attention mask).

    `average="tokens"`: every scored token weighs the same: the cross-entropy of the logits in
    `logits_dtype`, summed over all targets, divided by their number (compare: float64; the demo:
    float32). `average="batch_means"`: the model's own (Hugging Face) mean loss of each batch,
    weighted by its rows; with full-length windows every window weighs the same (the lm
    benchmark's numbers). Raises ValueError when nothing can be scored.
    """
    import torch

    if average not in ("tokens", "batch_means"):
        raise ValueError(f"heldout_loss: average must be 'tokens' or 'batch_means', not {average!r}")
    if isinstance(model, (str, os.PathLike)):
        model = load_causal_lm(model, device)
    dtype = getattr(torch, logits_dtype)
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask in batches:
            ids = ids.to(device)
            if average == "batch_means":
                if mask is not None and not bool(mask.all()):
                    raise ValueError("heldout_loss: average='batch_means' needs unpadded batches")
                total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
                count += len(ids)
                continue
            kwargs = {} if mask is None else {"attention_mask": mask.to(device).long()}
            logits = model(input_ids=ids, **kwargs).logits.to(dtype)
            targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(~mask[:, 1:].to(device).bool(), -100)
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("heldout_loss: no held-out sequence of two or more tokens to score")
    return total / count
