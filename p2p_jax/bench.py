"""Benchmark: the real pmapped train step on random data, or the input pipeline.

  python -m p2p_jax.bench --config=configs/edges2shoes.py --steps=20 --warmup=3
  python -m p2p_jax.bench --config=configs/default.py --config.model.dtype=bfloat16
  python -m p2p_jax.bench --config=configs/edges2shoes.py:smoke --mode=pipeline --steps=50

`step` mode builds G and D from the config, replicates the train state over all
local devices and times `step.pmap_train_step` (state donated, as in training)
on one fixed batch of uniform noise of the configured size. It reports compile
time, the median step time, images/s, XLA's FLOP count of the compiled step, the
FLOP rate that gives, and the same machine's dense float32 matmul rate measured
in the same run, so that runs on different or busy machines can be compared.
`pipeline` mode times the host input pipeline alone.

Progress goes to the log; the last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from p2p_jax import devices
from p2p_jax import input_pipeline
from p2p_jax import models
from p2p_jax import step as step_lib


_MATMUL_SIZE = 2048


def _peak_rss_mb() -> float:
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled program, as XLA's cost analysis counts them."""
  try:
    analysis = compiled.cost_analysis()
  except Exception as error:  # pylint: disable=broad-except  # backends may not implement it
    logging.warning("No cost analysis on this backend: %s", error)
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [a.get("flops") for a in analysis or [] if a]
  return float(sum(flops)) if flops and None not in flops else None


def matmul_gflops(device: Any = None, size: int = _MATMUL_SIZE, repeats: int = 10) -> float:
  """This device's dense float32 matmul rate in GFLOP/s (median of `repeats`)."""
  device = device or jax.local_devices()[0]
  keys = jax.random.split(jax.random.key(0))
  lhs, rhs = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32), device) for k in keys)
  matmul = jax.jit(jnp.matmul)
  matmul(lhs, rhs).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(lhs, rhs).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / statistics.median(times) / 1e9


def _device_memory_mb(local_devices: list[Any]) -> float | None:
  """Peak bytes in use, summed over devices, where the backend tracks it (GPU, TPU)."""
  peaks = []
  for device in local_devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  # CPU: not implemented
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(stats["peak_bytes_in_use"])
  return sum(peaks) / 2 ** 20


def run(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
  """Compiles and times the pmapped train step; returns the figures (see the module doc).

  Args:
    config: a training config (`configs/*.py`); its model, batch size, crop
      size and dtype are used. The global batch must divide by the number of
      local devices.
    steps: timed steps, at least 1.
    warmup: untimed steps run after compiling.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
  local_devices = jax.local_devices()
  devices.check_batch_divides(config.batch_size, len(local_devices))
  size = config.data.crop_size
  # A very long epoch keeps the learning rate constant: its schedule costs the same anyway.
  state = step_lib.create_train_state(jax.random.key(config.seed), config, steps_per_epoch=1e9)
  params_generator = models.count_params(state.generator.params)
  params_discriminator = models.count_params(state.discriminator.params)
  noise = np.random.default_rng(config.seed)
  batch = {
      "real_a": noise.uniform(-1, 1, (config.batch_size, size, size, config.model.input_nc)),
      "real_b": noise.uniform(-1, 1, (config.batch_size, size, size, config.model.output_nc)),
  }
  batch = devices.shard(jax.tree.map(lambda x: x.astype(np.float32), batch))
  state = devices.replicate(state)
  rng = jax.random.key(config.seed + 1)

  start = time.perf_counter()
  step = step_lib.pmap_train_step(donate=True).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  # The compiled program is one replica's; every device runs it.
  per_device_flops = _flops(step)
  flops_per_step = per_device_flops * len(local_devices) if per_device_flops is not None else None

  for _ in range(warmup):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready((state, metrics) if warmup else state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  losses = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
  if not all(np.isfinite(list(losses.values()))):
    raise FloatingPointError(f"The benchmarked step produced non-finite losses: {losses}")

  median = statistics.median(times)
  gflops = flops_per_step / median / 1e9 if flops_per_step else None
  matmul = matmul_gflops(local_devices[0]) * len(local_devices)
  return {
      "mode": "step",
      "sec_per_step_median": median,
      "sec_per_step_min": min(times),
      "images_per_sec": config.batch_size / median,
      "compile_s": compile_s,
      "flops_per_step": flops_per_step,
      "gflops_per_sec": gflops,
      "matmul_gflops_per_sec": matmul,
      "flops_fraction_of_matmul": gflops / matmul if gflops else None,
      "params_generator": params_generator,
      "params_discriminator": params_discriminator,
      "batch_size": config.batch_size,
      "image_size": size,
      "num_downs": config.model.num_downs,
      "dtype": config.model.dtype,
      "upconv_impl": config.model.upconv_impl,
      "conv_impl": config.model.conv_impl,
      "steps": steps,
      "warmup": warmup,
      "step_times": times,
      "losses": losses,
      "devices": len(local_devices),
      "device_kind": local_devices[0].device_kind,
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "peak_rss_mb": _peak_rss_mb(),
      "peak_device_memory_mb": _device_memory_mb(local_devices),
      "loadavg_1m": os.getloadavg()[0],
  }


def run_pipeline(config: ml_collections.ConfigDict, num_batches: int = 10) -> dict[str, Any]:
  """Images per second the host input pipeline delivers on its own."""
  images_per_sec = input_pipeline.pipeline_throughput(config, num_batches)
  return {
      "mode": "pipeline",
      "images_per_sec": images_per_sec,
      "batches": num_batches,
      "batch_size": config.batch_size,
      "image_size": config.data.crop_size,
      "source": config.data.source,
      "name": config.data.name,
      "peak_rss_mb": _peak_rss_mb(),
      "loadavg_1m": os.getloadavg()[0],
  }


def _summary(result: dict[str, Any]) -> str:
  if result["mode"] == "pipeline":
    return f"input pipeline: {result['images_per_sec']:.1f} images/s"
  rate = (f", {result['gflops_per_sec']:.1f} GFLOP/s "
          f"({100 * result['flops_fraction_of_matmul']:.0f}% of matmul)"
          if result["gflops_per_sec"] else "")
  return (f"{result['backend']} x{result['devices']}, batch {result['batch_size']} at "
          f"{result['image_size']}px: {result['sec_per_step_median']:.3f} s/step, "
          f"{result['images_per_sec']:.2f} images/s{rate}; compile {result['compile_s']:.1f} s")


FLAGS = flags.FLAGS   # the flags themselves are defined by `_define_flags`, run as a program


def _define_flags() -> None:
  # Defined only when run as a program, so that the module imports anywhere.
  flags.DEFINE_enum("mode", "step", ["step", "pipeline"],
                    "Time the train step, or the input pipeline alone.")
  flags.DEFINE_integer("steps", 10, "Timed steps (step mode) or batches (pipeline mode).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps run after compiling (step mode).")
  config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  devices.hide_accelerators_from_tensorflow()
  if FLAGS.mode == "step":
    result = run(FLAGS.config, FLAGS.steps, FLAGS.warmup)
  else:
    result = run_pipeline(FLAGS.config, FLAGS.steps)
  logging.info(_summary(result))
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
