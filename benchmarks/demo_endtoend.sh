#!/usr/bin/env bash
# Whole `make demo` (configs/demo.yml) against the same five steps with the paper's recipe
# (configs/demo_bot.yml, what `make demo` ran before issue 14), timed end to end, once in each
# order (paper, demo, demo, paper) so that drift does not favour either; another order can be
# given as arguments (bash benchmarks/demo_endtoend.sh demo paper paper demo). Needs `make venv` and
# data/synthetic; writes runs/demo, runs/demo_bot
# and one log per run, runs/demo_endtoend_<i>_<name>.log. docs/ablation.md, "Wall time".
set -euo pipefail
cd "$(dirname "$0")/.."
paper() { make demo DEMO_CONFIG=configs/demo_bot.yml DEMO_RUN=runs/demo_bot; }
demo() { make demo; }
mkdir -p runs
i=0
order=("$@")
[ ${#order[@]} -gt 0 ] || order=(paper demo demo paper)
for run in "${order[@]}"; do  # all checked before the first run starts
  case $run in paper|demo) ;; *) echo "unknown run '$run': use paper or demo" >&2; exit 2 ;; esac
done
for run in "${order[@]}"; do
  i=$((i + 1))
  t0=$(date +%s.%N)
  $run > "runs/demo_endtoend_${i}_$run.log" 2>&1
  echo "$run $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
done
