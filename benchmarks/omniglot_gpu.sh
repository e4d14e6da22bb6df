#!/usr/bin/env bash
# Paper-scale Omniglot on one accelerator: seconds per meta-step of EVERY solver.
#
#   OUT=/path/to/results bash benchmarks/omniglot_gpu.sh
#
# Paper scale = `--config omniglot` unchanged: 20-way 1-shot, 15 query images per class,
# conv-4 with 64 channels, meta-batch 16, 200 free SGD steps, LCP 200 controlled steps,
# CML 2 x 100 nudged steps, RBP 200 adjoint steps, iMAML 20 CG steps, BP 200 unrolled
# steps (steps_per_check 5). Each solver runs under its own time box (BOX seconds,
# compile included) so one slow or out-of-memory solver cannot eat the others' time.
#
# Environment (defaults in brackets):
#   OUT [/tmp/omniglot_gpu]  results folder
#   BOX [60]                 seconds per solver / variant (worst case: 13 x BOX + PROFILE_BOX)
#   SOLVERS [lcp cml imaml rbp fomaml t1t2 reptile bp]
#   REPS [3]                 timed meta-steps per solver after the compiling one (median)
#   VARIANTS [1]             also time lcp with conv_impl=lax (cuDNN, no im2col copies),
#                            TF32 forced / full FP32 (an LCP or CML meta-step is ~64 TFLOP,
#                            see benchmarks/results/omniglot_profile.md), steps_per_check=10,
#                            and XLA command buffers for while loops (device-side conditions)
#   PROFILE [1]              inner-step cost grid + meta-step split at meta-batch 16
#                            (PROFILE_BOX [180] s)
#   META_ARGS []             extra arguments for every meta-step run (e.g. "--batch_size 1"
#                            for a CPU smoke test of this script)
#   STEPS [0]                > 0: also train lcp and cml for STEPS meta-steps and meta-test
#                            them (the old Table 3 signal; 170 s box each)
#
# Writes under $OUT:
#   devices.txt                  what jax sees, and the exit status of every part
#   seconds_per_meta_step.md     one row per solver / variant (the headline table)
#   meta_<name>.md, meta_<name>.log   each part's own table and everything it printed
#   profile.md, profile.log      where the time goes (PROFILE=1)
#   runs/, table3_gpu.md         (STEPS > 0)
set -u
OUT=${OUT:-/tmp/omniglot_gpu}
BOX=${BOX:-60}
SOLVERS=${SOLVERS:-"lcp cml imaml rbp fomaml t1t2 reptile bp"}
REPS=${REPS:-3}
VARIANTS=${VARIANTS:-1}
PROFILE=${PROFILE:-1}
PROFILE_BOX=${PROFILE_BOX:-180}
STEPS=${STEPS:-0}
PY=${PY:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# The device image lacks haiku / ml_collections: install the carried wheels if needed.
if ! $PY -c "import haiku, ml_collections" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/devices.txt"

# meta NAME [extra args...] -- one time-boxed meta-step measurement.
meta() {
  local name=$1; shift
  timeout -k 10 "$BOX" $PY -m benchmarks.speed_omniglot --parts meta --scale paper \
    --reps "$REPS" --out "$OUT/meta_$name.md" ${META_ARGS:-} "$@" > "$OUT/meta_$name.log" 2>&1
  echo "meta $name: exit $? ($(date +%T))" | tee -a "$OUT/devices.txt"
}

for s in $SOLVERS; do meta "$s" --solvers "$s"; done
if [ "$VARIANTS" = 1 ]; then
  meta lcp_lax --solvers lcp --conv_impl lax
  JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 meta lcp_tf32 --solvers lcp
  JAX_DEFAULT_MATMUL_PRECISION=float32 meta lcp_fp32 --solvers lcp
  meta lcp_spc10 --solvers lcp --steps_per_check 10
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
    meta lcp_cmdbuf --solvers lcp
fi

# Headline table: the row of every part that finished; the exit status of the others.
{
  echo "# Seconds per paper-scale Omniglot meta-step"
  echo
  echo "Device: $(grep -v -e '^name,' -e '^meta ' "$OUT/devices.txt" | head -n 2 | tr '\n' ' ')"
  echo
  echo "Box ${BOX} s per row (compile included); median of ${REPS} meta-steps after the first."
  echo
  echo "| run | solver | s / meta-step (median) | tasks / s | compile + first step s |"
  echo "|---|---|---:|---:|---:|"
  for f in "$OUT"/meta_*.log; do
    name=$(basename "$f" .log); name=${name#meta_}
    row=$(grep -h '^| [a-z0-9_]* | [0-9.]* |' "$OUT/meta_$name.md" "$f" 2>/dev/null | head -n 1)
    if [ -n "$row" ]; then echo "| $name $row"
    else echo "| $name | - | not finished: $(grep "meta $name:" "$OUT/devices.txt" | tail -n 1) | | |"
    fi
  done
} > "$OUT/seconds_per_meta_step.md"
cat "$OUT/seconds_per_meta_step.md"

if [ "$PROFILE" = 1 ]; then
  timeout -k 10 "$PROFILE_BOX" $PY -m benchmarks.speed_omniglot --parts profile \
    --solvers lcp,cml,fomaml --batch_size 16 --steps 50 --query_steps 20 --reps 3 \
    --out "$OUT/profile.md" > "$OUT/profile.log" 2>&1
  echo "profile: exit $?" | tee -a "$OUT/devices.txt"
fi

if [ "$STEPS" -gt 0 ]; then
  for solver in lcp cml; do
    timeout 170 $PY launch/run.py --config omniglot --config.solver=$solver \
      --config.num_steps=$STEPS --config.eval_every_epochs=0 \
      --config.checkpoint_every_steps=0 --config.keep_checkpoints=1 \
      --workdir "$OUT/runs/$solver" --no_progress > "$OUT/run_$solver.log" 2>&1
    echo "run $solver: exit $?" | tee -a "$OUT/devices.txt"
    if [ -f "$OUT/runs/$solver/summary.json" ]; then
      mkdir -p "$OUT/sweep/runs/$solver/default/seed0"
      cp "$OUT/runs/$solver/summary.json" "$OUT/sweep/runs/$solver/default/seed0/"
    fi
  done
  timeout 60 $PY -m benchmarks.table3_omniglot --config omniglot --report_only \
    --no_init_row --solvers lcp,cml --sweepdir "$OUT/sweep" \
    --config.num_steps=$STEPS --out "$OUT/table3_gpu.md" > "$OUT/table3.log" 2>&1
  rm -rf "$OUT/runs"/*/checkpoints
fi
echo done | tee -a "$OUT/devices.txt"
