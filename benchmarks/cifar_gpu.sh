#!/usr/bin/env bash
# Paper-scale speed of the Table-2 problems on one accelerator, in under 4 minutes
# (prepared for an H200; not run by its author, who had no accelerator).
#
#   OUT=/path/to/results bash benchmarks/cifar_gpu.sh
#
# Writes under $OUT:
#   devices.txt            what jax sees, and each part's exit status
#   speed_cifar_micro.md   conv in straight-line code vs in a while-loop body, forward
#                          and input-VJP (jax's rule vs the HWIO custom rule), batch 64
#   speed_cifar_gpu_*.md   s/step (median of 3) and fixed-point iterations per solver at
#                          PAPER SCALE (configs' defaults): cifar10_ff bp/rbp/lcp_di/lcp_kp,
#                          cifar10_deq rbp/lcp_di, inr rbp/lcp_di, with and without
#                          Anderson (ff/deq) -- multiply by 782 steps/epoch x epochs for
#                          a full run's cost
#   run.log                everything printed
# Data: CIFAR-10 from $BILEVEL_DATA_DIR, else ./shared/data, else a folder data_cifar/
# carried next to the repo (cifar10_jpeg_{train,test}.npz, 56 MB); with none of them
# the speed rows use SYNTHETIC random inputs (labelled as such; timing only). The INR
# image needs scikit-image, else it falls back to synthetic too.
# Every part has its own timeout so a slow compile cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/cifar_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for d in "${BILEVEL_DATA_DIR:-}" shared/data data_cifar; do
  if [ -n "$d" ] && [ -f "$d/cifar10_jpeg_train.npz" -o -d "$d/cifar-10-batches-py" ]; then
    export BILEVEL_DATA_DIR=$d; break
  fi
done
SYN=""
[ -z "${BILEVEL_DATA_DIR:-}" ] && SYN="--synthetic 4096"
python -c "import skimage" 2>/dev/null || SYN_INR="--synthetic 4096"

python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
echo "data: ${BILEVEL_DATA_DIR:-none (synthetic timing inputs)}" | tee -a "$OUT/devices.txt"

timeout 35 python -m benchmarks.speed_cifar --part micro --micro_batch 64 --micro_n 20 \
  --out "$OUT/speed_cifar_micro.md" >> "$OUT/run.log" 2>&1
echo "micro: exit $?" | tee -a "$OUT/devices.txt"

timeout 80 python -m benchmarks.speed_cifar --part solvers --preset "" --no_variants \
  --problems cifar10_ff --steps 3 $SYN --out "$OUT/speed_cifar_gpu_ff.md" >> "$OUT/run.log" 2>&1
echo "ff: exit $?" | tee -a "$OUT/devices.txt"

timeout 70 python -m benchmarks.speed_cifar --part solvers --preset "" --no_variants \
  --problems cifar10_deq --steps 3 $SYN --out "$OUT/speed_cifar_gpu_deq.md" >> "$OUT/run.log" 2>&1
echo "deq: exit $?" | tee -a "$OUT/devices.txt"

timeout 40 python -m benchmarks.speed_cifar --part solvers --preset "" --no_variants \
  --no_anderson --problems inr --steps 3 ${SYN_INR:-} --out "$OUT/speed_cifar_gpu_inr.md" \
  >> "$OUT/run.log" 2>&1
echo "inr: exit $?" | tee -a "$OUT/devices.txt"
echo done | tee -a "$OUT/devices.txt"
