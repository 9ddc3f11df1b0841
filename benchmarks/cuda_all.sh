#!/usr/bin/env bash
# Every benchmark on a CUDA machine, in one command:
#   bash benchmarks/cuda_all.sh [OUT_DIR] [PARTS]
# PARTS (comma list, default all of them, in this order):
#   data   the two training data paths (docs/data-path.md): one epoch of
#          configs/softmax_triplet_with_center.yml on the synthetic set at 256x128 with AMP, on one
#          GPU and under torchrun on all GPUs, DATALOADER.DATA_PATH 'pil' and 'device'; images/s and
#          the data-wait share of each run (benchmarks/data_path.py --summarize)
#   train  training images/s with AMP (and the data-wait share) of the step alone
#   eval   evaluation and re-ranking at Market-1501 and MSMT17 scale on the GPU
#   ddp    DDP scaling when more than one GPU is visible
#   search the search service's upload latency (docs/search.md): p95 at 16 concurrent clients over
#          one query alone, with the forward pass on the GPU and, for comparison on the same
#          machine, on its CPU cores
# Each part runs under its own time limit (seconds: DATA_S, TRAIN_S, EVAL_S, DDP_S, SEARCH_S) so the whole
# command stays under 10 minutes; each writes its own log and a failing part does not stop the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/bench-cuda}
parts=",${2:-data,train,eval,ddp,search},"
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
ngpu=$(nvidia-smi -L | wc -l)

if [[ $parts == *,data,* ]]; then
  [ -d data/synthetic ] || "$py" -m strongreid synth --out data/synthetic
  # From scratch (nothing can be downloaded); AMP 'auto' is bf16/fp16 on CUDA. One epoch ends
  # with the evaluation, so every run also reports its mAP.
  common=(--config configs/softmax_triplet_with_center.yml MODEL.DEVICE cuda MODEL.PRETRAIN_CHOICE none
          MODEL.AMP auto DATASETS.NAMES synthetic DATASETS.ROOT_DIR data SOLVER.MAX_EPOCHS 1
          SOLVER.LOG_PERIOD 10 DATALOADER.NUM_WORKERS "${WORKERS:-8}")
  runs=()
  for path in pil device; do
    dir="$out/dp-1gpu-$path"; rm -rf "$dir"; runs+=("$dir")
    timeout "${DATA_S:-70}" "$py" -m strongreid train "${common[@]}" DATALOADER.DATA_PATH $path \
      OUTPUT_DIR "$dir" > "$dir.log" 2>&1 || echo "dp-1gpu-$path failed or timed out: $dir.log"
    if [ "$ngpu" -gt 1 ]; then
      dir="$out/dp-${ngpu}gpu-$path"; rm -rf "$dir"; runs+=("$dir")
      timeout "${DATA_S:-70}" "$py" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" \
        -m strongreid train "${common[@]}" DATALOADER.DATA_PATH $path OUTPUT_DIR "$dir" > "$dir.log" 2>&1 \
        || echo "dp-${ngpu}gpu-$path failed or timed out: $dir.log"
    fi
  done
  "$py" benchmarks/data_path.py --summarize "${runs[@]}" 2>&1 | tee "$out/data_path.txt"
fi
if [[ $parts == *,train,* ]]; then
  timeout "${TRAIN_S:-130}" "$py" benchmarks/train_throughput.py --device cuda --warmup 3 --iters 10 2>&1 \
    | tee "$out/train_throughput.txt"
fi
if [[ $parts == *,eval,* ]]; then
  timeout "${EVAL_S:-110}" "$py" benchmarks/evaluation.py --scale both --rerank 2>&1 | tee "$out/evaluation.txt"
fi
if [[ $parts == *,ddp,* ]] && [ "$ngpu" -gt 1 ]; then
  timeout "${DDP_S:-60}" "$py" benchmarks/ddp_scaling.py 2>&1 | tee "$out/ddp_scaling.txt"
fi
if [[ $parts == *,search,* ]]; then
  for dev in cuda cpu; do
    timeout "${SEARCH_S:-60}" "$py" benchmarks/search_service.py --body raw --client socket --big 0 \
      --server-arg=--device=$dev --out "$out/search_service_$dev.json" > "$out/search_service_$dev.log" 2>&1 \
      || echo "search ($dev) failed or timed out: $out/search_service_$dev.log"
  done
fi
echo "logs in $out"
