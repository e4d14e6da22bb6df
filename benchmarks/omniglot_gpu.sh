#!/usr/bin/env bash
# Paper-scale Omniglot signal on one accelerator in ~8 minutes (prepared for an H200).
#
#   OUT=/path/to/results bash benchmarks/omniglot_gpu.sh
#
# Writes under $OUT:
#   devices.txt                  what jax sees
#   speed_omniglot_gpu.md        ms per inner step per task (matmul vs lax conv, 1 and 4
#                                vmapped tasks, steps_per_check) and s per meta-step /
#                                tasks per second of lcp, cml, imaml, fomaml at paper scale
#   runs/<solver>/summary.json   lcp and cml, paper-scale config (20-way 1-shot, 64
#                                channels, meta-batch 16, 200 inner steps, lambda 0.5,
#                                CML beta 0.03 / 100 steps per nudged phase) for
#                                $STEPS meta-steps (the paper runs 3750), then the full
#                                meta-test: 600 test tasks + the 20 official runs
#   table3_gpu.md                those runs in the shape of Table 3
#   *.log                        everything printed
# Every part has its own timeout so a slow part cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/omniglot_gpu}
STEPS=${STEPS:-150}            # meta-steps per solver (~2-3 min each on one H200, estimated)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"

timeout 130 python -m benchmarks.speed_omniglot --parts inner,meta --scale paper \
  --solvers lcp,cml,imaml,fomaml --steps 50 --reps 2 \
  --out "$OUT/speed_omniglot_gpu.md" > "$OUT/speed.log" 2>&1
echo "speed: exit $?" | tee -a "$OUT/devices.txt"

for solver in lcp cml; do
  timeout 170 python launch/run.py --config omniglot --config.solver=$solver \
    --config.num_steps=$STEPS --config.eval_every_epochs=0 \
    --config.checkpoint_every_steps=0 --config.keep_checkpoints=1 \
    --workdir "$OUT/runs/$solver" --no_progress > "$OUT/run_$solver.log" 2>&1
  echo "$solver: exit $?" | tee -a "$OUT/devices.txt"
done

# Tabulate what finished (the sweep layout is runs/<solver>/<cell>/seed<k>).
mkdir -p "$OUT/sweep/runs"
for solver in lcp cml; do
  if [ -f "$OUT/runs/$solver/summary.json" ]; then
    mkdir -p "$OUT/sweep/runs/$solver/default/seed0"
    cp "$OUT/runs/$solver/summary.json" "$OUT/sweep/runs/$solver/default/seed0/"
  fi
done
timeout 60 python -m benchmarks.table3_omniglot --config omniglot --report_only \
  --no_init_row --solvers lcp,cml --sweepdir "$OUT/sweep" \
  --config.num_steps=$STEPS --out "$OUT/table3_gpu.md" > "$OUT/table3.log" 2>&1
rm -rf "$OUT/runs"/*/checkpoints
echo done | tee -a "$OUT/devices.txt"
