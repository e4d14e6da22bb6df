#!/usr/bin/env bash
# Every MNIST circuit timed ALONE on one accelerator (issue 13, item 5), in about
# 8 minutes. Prepared on CPU; not run by its author (no accelerator was lent).
#
#   OUT=/path/to/results bash benchmarks/mnist_gpu.sh          # preset paper
#   PRESETS=paper,fast OUT=... bash benchmarks/mnist_gpu.sh
#
# One process per (net, circuit), one after the other, so each has the device to
# itself (the H200 figures of issue 13 were taken with 11 processes sharing it).
# Each writes $OUT/speed_gpu_<net>_<circuit>.md with s/step, iterations, ms per
# iteration, the fused-iteration floor and the HLO op / fusion counts of every
# while-loop body (on GPU a fusion is about one kernel launch: launches per
# iteration x iterations is the launch-bound cost). Then $OUT/speed_gpu.md
# concatenates them; copy it to benchmarks/results/speed_gpu.md.
# Data: MNIST ships in problems/datasets/files/.
set -u
OUT=${OUT:-/tmp/mnist_gpu}
PRESETS=${PRESETS:-paper}
STEP_TIMEOUT=${STEP_TIMEOUT:-90}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >> "$OUT/devices.txt" 2>&1

for row in ff:bp ff:rbp ff:lcp_di ff:lcp_kp ff:lcp_ebd ff:lcp_lf \
           rnn:rbp rnn:lcp_di rnn:lcp_kp rnn:lcp_ebd rnn:lcp_lf; do
  net=${row%%:*}; solver=${row##*:}
  timeout "$STEP_TIMEOUT" python -m benchmarks.speed_mnist --nets "$net" --solvers "$solver" \
    --presets "$PRESETS" --warmup_steps 20 --steps 20 --rounds 2 --floor_steps 200 --hlo \
    --results "$OUT/speed_gpu_${net}_${solver}.md" >> "$OUT/run.log" 2>&1
  echo "$net $solver exit $?" | tee -a "$OUT/devices.txt"
done

{
  echo "# Speed on one accelerator: every MNIST circuit alone (benchmarks/mnist_gpu.sh)"
  echo
  cat "$OUT/devices.txt"
  for f in "$OUT"/speed_gpu_*_*.md; do echo; echo "## ${f##*/}"; sed 1,2d "$f"; done
} > "$OUT/speed_gpu.md"
echo "wrote $OUT/speed_gpu.md"
