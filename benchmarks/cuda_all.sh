#!/usr/bin/env bash
# Every benchmark on a CUDA machine, in one command (about 8 minutes on one H100/H200):
#   bash benchmarks/cuda_all.sh [OUT_DIR]
# Training images/s with AMP (and the data-wait share), evaluation and re-ranking at Market-1501
# and MSMT17 scale on the GPU, and DDP scaling when more than one GPU is visible. Each part writes
# its own log; a failing part does not stop the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/bench-cuda}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" benchmarks/train_throughput.py --device cuda --warmup 3 --iters 10 2>&1 | tee "$out/train_throughput.txt"
"$py" benchmarks/evaluation.py --scale both --rerank 2>&1 | tee "$out/evaluation.txt"
if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then
  "$py" benchmarks/ddp_scaling.py 2>&1 | tee "$out/ddp_scaling.txt"
fi
echo "logs in $out"
