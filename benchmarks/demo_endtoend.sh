#!/usr/bin/env bash
# Whole `make demo` (configs/demo.yml) against the same five steps with the paper's recipe
# (configs/demo_bot.yml, what `make demo` ran before issue 14), timed end to end, once in each
# order (paper, demo, demo, paper) so that drift does not favour either; another order can be
# given as arguments (bash benchmarks/demo_endtoend.sh demo paper paper demo). Needs `make venv` and
# data/synthetic; writes runs/demo, runs/demo_old
# and one log per run, runs/demo_endtoend_<i>_<name>.log. docs/ablation.md, "Wall time".
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin
paper() {
  rm -rf runs/demo_old
  $B/strongreid train --config configs/demo_bot.yml OUTPUT_DIR runs/demo_old
  $B/strongreid test --config configs/demo_bot.yml OUTPUT_DIR runs/demo_old TEST.WEIGHT runs/demo_old/best.pt
  $B/python benchmarks/histogram_baseline.py --root data/synthetic --out runs/demo_old/histogram_baseline.json \
    --compare runs/demo_old/results.json
  $B/strongreid visualize --results runs/demo_old
  $B/strongreid report --results runs/demo_old
}
demo() { make demo; }
mkdir -p runs
i=0
order=("$@")
[ ${#order[@]} -gt 0 ] || order=(paper demo demo paper)
for run in "${order[@]}"; do
  case $run in paper|demo) ;; *) echo "unknown run '$run': use paper or demo" >&2; exit 2 ;; esac
  i=$((i + 1))
  t0=$(date +%s.%N)
  $run > "runs/demo_endtoend_${i}_$run.log" 2>&1
  echo "$run $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
done
