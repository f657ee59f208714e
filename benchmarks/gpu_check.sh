#!/usr/bin/env bash
# The GPU check of docs/scale.md: a 2-layer slice at Mistral-7B's layer geometry (hidden 4096,
# MLP 14336, 32/8 heads, vocab 32000, bf16, two experts, 8 x 256 calibration tokens each),
# merged with ties, output_qp (statistics computed, then cached) and sequential, each through
# `mergekit-yaml --cuda` in its own process; prints and saves wall time, peak anonymous RAM and
# peak GPU memory in use (benchmarks/results/scale-7b-cuda.{json,md}). Needs one GPU; the tests
# never need it.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv
python benchmarks/scale.py --geometry 7b --layers 2 --cuda --threads "$(nproc)" --work "${WORK:-/tmp/mergekit-qp-gpu}"
