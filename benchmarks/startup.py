"""Start-up cost of the installed hook (site-packages/mergekit_qp.pth).

Measures, with the package installed: the import time of the hook module as Python itself
reports it (`-X importtime`), and the wall time of `python -c pass` with the hook armed
against MERGEKIT_QP_NO_AUTOLOAD=1 (the .pth line still runs but returns at once), median of
alternating runs. Writes benchmarks/results/startup.json.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = int(os.environ.get("RUNS", "40"))
OUT = Path(__file__).resolve().parent / "results" / "startup.json"


def import_time_us() -> int:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    for line in err.splitlines():
        if line.rstrip().endswith("_mergekit_qp_autoload"):
            return int(line.split("|")[1])
    raise SystemExit("the hook module was not imported at start-up: is mergekit-qp installed?")


def wall(env) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    on = dict(os.environ)
    on.pop("MERGEKIT_QP_NO_AUTOLOAD", None)
    off = dict(on, MERGEKIT_QP_NO_AUTOLOAD="1")
    for _ in range(3):
        wall(on), wall(off)  # warm the file cache
    with_hook, without = [], []
    for _ in range(RUNS):
        with_hook.append(wall(on))
        without.append(wall(off))
    result = {
        "hook_import_us": statistics.median(import_time_us() for _ in range(9)),
        "python_pass_ms_hook_armed": 1000 * statistics.median(with_hook),
        "python_pass_ms_hook_off": 1000 * statistics.median(without),
        "runs": RUNS,
        "python": sys.version.split()[0],
    }
    result["difference_ms"] = result["python_pass_ms_hook_armed"] - result["python_pass_ms_hook_off"]
    print(json.dumps(result, indent=2))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
