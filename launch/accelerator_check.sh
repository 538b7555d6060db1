#!/usr/bin/env bash
# One accelerator check: every speed and memory figure of this machine's first device(s),
# as one JSON object printed last; exits non-zero if any run failed.
#
#   launch/accelerator_check.sh                      # a GPU box or a TPU VM, from the checkout
#   ACCEL_CHECK_SMOKE=1 launch/accelerator_check.sh  # the same code at small sizes, on a CPU
#
# Full: unet_256 with the 70x70 PatchGAN at 256x256 (configs/default.py), the step benchmark
# at batch 1, 4 and 16 (halved until it fits), float32 and bfloat16, the CPU-tuned forms and
# XLA's own, then 200 training steps on random data with every loss checked finite.
# Smoke: configs/default.py:smoke (32x32, a 5-level U-Net, ngf = ndf = 8), batch 1, 10
# training steps, with XLA's heavier optimisations off (compiling dominates at that size).
# Needs only JAX, Flax, Optax, NumPy, ml_collections and absl.
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/default.py
smoke=()
if [ "${ACCEL_CHECK_SMOKE:-0}" = "1" ]; then
  config=configs/default.py:smoke
  smoke=(--smoke)
  export JAX_DISABLE_MOST_OPTIMIZATIONS=1
fi
exec "${PYTHON:-python3}" -m p2p_jax.bench --mode=check --config="$config" "${smoke[@]}" "$@"
