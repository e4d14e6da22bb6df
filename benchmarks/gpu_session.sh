#!/usr/bin/env bash
# One prepared accelerator session (the device tool's H100/H200 image: Python 3.12,
# jax with CUDA, optax, chex, orbax; dm-haiku, ml-collections and jmp come as
# wheels in .whl/). Runs concurrently, each part under its own timeout:
#   * MNIST Table 1: 5 circuits x {FF, RNN}, seed 0, $MNIST_EPOCHS epochs of the
#     `fast` preset, evaluated on the 10k test set after every epoch;
#   * Omniglot: benchmarks/omniglot_gpu.sh (speed at paper scale + LCP and CML
#     paper-scale runs for a few hundred meta-steps).
# Everything lands in $OUT/gpu_results.tar.gz (plus a short log).
set -u
OUT=${OUT:-/tmp/gpu_out}
MNIST_EPOCHS=${MNIST_EPOCHS:-4}
BUDGET=${BUDGET:-500}
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
R=/tmp/gpu_results; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/machine.txt
python3 -c "import jax, haiku, optax; print('jax', jax.__version__, jax.devices())" >> $R/machine.txt 2>&1
cat $R/machine.txt

pids=()
for net in mnist_ff mnist_rnn; do
  for solver in lcp_lf lcp_di lcp_kp lcp_ebd $([ $net = mnist_ff ] && echo bp || echo rbp); do
    mkdir -p $R/mnist/$net/$solver
    timeout $BUDGET python3 launch/run.py --config $net:fast --config.solver=$solver \
      --config.num_epochs=$MNIST_EPOCHS --config.eval_every_epochs=1 \
      --config.checkpoint_every_steps=0 --workdir $R/mnist/$net/$solver/seed0 --no_progress \
      > $R/mnist/$net/$solver/log.txt 2>&1 &
    pids+=($!)
  done
done
OUT=$R/omniglot STEPS=${OMNIGLOT_STEPS:-150} timeout $BUDGET bash benchmarks/omniglot_gpu.sh \
  > $R/omniglot.log 2>&1 &
pids+=($!)
for p in "${pids[@]}"; do wait $p; done
find $R -name checkpoints -type d -prune -exec rm -rf {} +
tail -n 3 $R/mnist/*/*/log.txt > $OUT/mnist_tails.txt 2>&1
tar czf $OUT/gpu_results.tar.gz -C /tmp gpu_results
ls -la $OUT
