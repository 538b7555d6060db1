"""Benchmark: the real pmapped train step on random data, the input pipeline, or the loop.

  python -m p2p_jax.bench --config=configs/edges2shoes.py --steps=20 --warmup=3
  python -m p2p_jax.bench --config=configs/default.py --config.model.dtype=bfloat16
  python -m p2p_jax.bench --config=configs/edges2shoes.py --mode=pipeline --steps=200 \\
      --config.data.source=folder --config.data.dir=DIR
  python -m p2p_jax.bench --config=configs/demo.py --mode=loop --steps=50

`step` mode builds G and D from the config, replicates the train state over all
local devices and times `step.pmap_train_step` (its state donated where training
donates it, `step.donates_state`, unless `--donate` says otherwise) on one fixed
batch of uniform noise of the configured size. It reports compile time, whether
the state was donated, the median step time, the time of its optimiser updates alone
(`time_optimizer`: Adam over float32 parameters and moments, which a bfloat16
model does not shorten), images/s, the forms each layer kind runs, the
model's FLOPs per step (`step.model_flops`: counted from the layer shapes, the
same for every form) with the rate and the MFU they give, XLA's own FLOP count
of the compiled program, device memory in use and at peak where the backend
reports it, and the machine's dense matmul rate in the compute dtype measured in
the same run. MFU divides by the vendor's peak for the device and dtype
(`hardware.PEAKS`), or on a CPU by that measured matmul rate. Step mode needs
only JAX, Flax, Optax, NumPy, ml_collections and absl (no TensorFlow, TFDS or
clu), so it runs on an accelerator host with JAX alone.
The step it times takes float images (the networks' step, as the PyTorch
reference's); the jitter the training step adds is timed by `loop` mode.
`pipeline` mode times the host input pipeline alone, against the rate tf.data
reaches when it only decodes the same files (`run_pipeline`). `loop` mode
times the training loop, pipeline and step, against the step alone
(`run_loop`). `check` mode is the accelerator check
(`launch/accelerator_check.sh`): see `run_check`.

Progress goes to the log; the last line printed is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
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
from p2p_jax import hardware
from p2p_jax import models
from p2p_jax import step as step_lib
from p2p_jax.ops import choose


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


def matmul_gflops(device: Any = None, size: int = _MATMUL_SIZE, repeats: int = 10,
                  dtype: str = "float32") -> float:
  """This device's dense matmul rate in GFLOP/s for `dtype` operands, float32 sums
  (median of `repeats`)."""
  device = device or jax.local_devices()[0]
  keys = jax.random.split(jax.random.key(0))
  lhs, rhs = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype),
                             device) for k in keys)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  matmul(lhs, rhs).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(lhs, rhs).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / statistics.median(times) / 1e9


def _random_batch(config: ml_collections.ConfigDict, noise: np.random.Generator
                  ) -> dict[str, np.ndarray]:
  """A global batch of uniform noise in [-1, 1], float32, of the config's sizes."""
  shape = (config.batch_size, config.data.crop_size, config.data.crop_size)
  return {"real_a": noise.uniform(-1, 1, shape + (config.model.input_nc,)).astype(np.float32),
          "real_b": noise.uniform(-1, 1, shape + (config.model.output_nc,)).astype(np.float32)}


def time_optimizer(state: step_lib.TrainState, repeats: int = 10, donate: bool | None = None
                   ) -> tuple[float, step_lib.NetState, step_lib.NetState]:
  """Median seconds of the step's optimiser updates alone: both networks' Adam, which
  reads and writes float32 parameters and moments whatever the compute dtype.

  Pmapped as in the step, its state donated where the step donates it (default:
  `step.donates_state`), on gradients of the parameters' shapes (every element 1e-3).
  `state` is replicated over the local devices; where donated, its networks' buffers
  can no longer be read. Returns the time and both networks' states after the
  `repeats` + 1 updates (the first one compiles).
  """
  settings = state.settings
  if donate is None:
    donate = step_lib.donates_state()

  def update(gen, disc, gen_grads, disc_grads):
    return (gen.apply_gradients(gen_grads, gen.batch_stats, settings.gen_tx),
            disc.apply_gradients(disc_grads, disc.batch_stats, settings.disc_tx))

  update = jax.pmap(update, axis_name=step_lib.AXIS_NAME, donate_argnums=(0, 1) if donate else ())
  gen_grads, disc_grads = devices.replicate(jax.tree.map(
      lambda p: np.full(p.shape[1:], 1e-3, p.dtype),
      (state.generator.params, state.discriminator.params)))
  gen, disc = update(state.generator, state.discriminator, gen_grads, disc_grads)
  jax.block_until_ready((gen, disc))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    gen, disc = update(gen, disc, gen_grads, disc_grads)
    jax.block_until_ready((gen, disc))
    times.append(time.perf_counter() - start)
  return statistics.median(times), gen, disc


def run(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2,
        donate: bool | None = None) -> dict[str, Any]:
  """Compiles and times the pmapped train step; returns the figures (see the module doc).

  Args:
    config: a training config (`configs/*.py`); its model, batch size, crop
      size and dtype are used. The global batch must divide by the number of
      local devices.
    steps: timed steps, at least 1.
    warmup: untimed steps run after compiling.
    donate: whether the step donates its state; default: as training does
      (`step.donates_state`).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
  local_devices = jax.local_devices()
  devices.check_batch_divides(config.batch_size, len(local_devices))
  size = config.data.crop_size
  layers = step_lib.trace_layers(config, config.batch_size // len(local_devices))
  model_flops = step_lib.model_flops(layers, config.loss.lambda_gan) * len(local_devices)
  # A very long epoch keeps the learning rate constant: its schedule costs the same anyway.
  state = step_lib.create_train_state(jax.random.key(config.seed), config, steps_per_epoch=1e9)
  params_generator = models.count_params(state.generator.params)
  params_discriminator = models.count_params(state.discriminator.params)
  batch = devices.shard(_random_batch(config, np.random.default_rng(config.seed)))
  state = devices.replicate(state)
  rng = jax.random.key(config.seed + 1)

  if donate is None:
    donate = step_lib.donates_state(local_devices)
  start = time.perf_counter()
  step = step_lib.pmap_train_step(donate=bool(donate)).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  # What the compiled program does: its outputs alias its inputs only where donated.
  donated = "input_output_alias" in step.as_text()
  # The compiled program is one replica's; every device runs it.
  per_device_flops = _flops(step)
  flops_per_step = per_device_flops * len(local_devices) if per_device_flops is not None else None

  for _ in range(warmup):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready((state, metrics) if warmup else state)
  times = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
  losses = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
  if not all(np.isfinite(list(losses.values()))):
    raise FloatingPointError(f"The benchmarked step produced non-finite losses: {losses}")

  median = statistics.median(times)
  memory = hardware.memory_mb(local_devices)      # while the state is alive
  optimizer_s, _, _ = time_optimizer(state, donate=donated)   # the last use of `state`
  gflops = flops_per_step / median / 1e9 if flops_per_step else None
  dtype = config.model.dtype
  matmul = matmul_gflops(local_devices[0], dtype=dtype) * len(local_devices)
  peak = hardware.vendor_peak(local_devices[0].device_kind)
  if peak is None:
    peak_gflops, peak_source = matmul, f"dense {dtype} matmul measured in this run"
  else:
    peak_gflops = hardware.peak_flops(peak, dtype) / 1e9 * len(local_devices)
    peak_source = peak.source
  model_gflops = model_flops / median / 1e9
  return {
      "mode": "step",
      "sec_per_step_median": median,
      "sec_per_step_min": min(times),
      "images_per_sec": config.batch_size / median,
      "optimizer_sec": optimizer_s,
      "donated": donated,
      "compile_s": compile_s,
      "flops_per_step": flops_per_step,
      "gflops_per_sec": gflops,
      "matmul_gflops_per_sec": matmul,
      "flops_fraction_of_matmul": gflops / matmul if gflops else None,
      "model_flops_per_step": model_flops,
      "model_gflops_per_sec": model_gflops,
      "mfu": model_gflops / peak_gflops,
      "peak_gflops_per_sec": peak_gflops,
      "peak_source": peak_source,
      "forms": step_lib.describe_forms(layers),
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
      "page_faults_per_step": faults,
      "malloc": hardware.freed_memory_policy,
      "device_memory_in_use_mb": memory["in_use"],
      "peak_device_memory_mb": memory["peak"],
      "loadavg_1m": os.getloadavg()[0],
  }


def run_pipeline(config: ml_collections.ConfigDict, num_batches: int = 10) -> dict[str, Any]:
  """Pairs per second the host input pipeline delivers on its own, against its ceiling.

  The ceiling is the rate tf.data reaches on the same split when it only
  decodes (`input_pipeline.decode_throughput`), measured in the same run; the
  two are timed alternately, twice each, and the better of each is reported.
  """
  from p2p_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow's side
  pairs = max(64, num_batches * config.batch_size)
  rates, ceilings = [], []
  for _ in range(2):
    ceilings.append(input_pipeline.decode_throughput(config, pairs))
    rates.append(input_pipeline.pipeline_throughput(config, num_batches))
  cores = hardware.num_cores()
  rate, ceiling = max(rates), max(ceilings)
  return {
      "mode": "pipeline",
      "pairs_per_sec": rate,
      "pairs_per_sec_per_core": rate / cores,
      "decode_only_pairs_per_sec": ceiling,
      "fraction_of_decode_only": rate / ceiling,
      "rounds": {"pipeline": rates, "decode_only": ceilings},
      "cores": cores,
      "batches": num_batches,
      "batch_size": config.batch_size,
      "image_size": config.data.crop_size,
      "source": config.data.source,
      "name": config.data.name,
      "cache": config.data.cache,
      "peak_rss_mb": _peak_rss_mb(),
      "loadavg_1m": os.getloadavg()[0],
  }


def run_loop(config: ml_collections.ConfigDict, steps: int = 20, warmup: int = 3
             ) -> dict[str, Any]:
  """The training loop's pace (input pipeline and step) against the step alone.

  Both run the step as training does (`step.pmap_train_step` with the
  on-device jitter): alone, on one batch of the pipeline kept on the devices;
  in the loop, on each batch the pipeline delivers. The two are timed
  alternately, twice each; the fraction of the loop's time spent waiting for
  data is 1 - step / loop, from the better round of each. With `data.cache`,
  one epoch is read first, so the loop is timed as later epochs run.
  """
  from p2p_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow's side
  from p2p_jax.datasets.preprocess import Preprocess  # pylint: disable=g-import-not-at-top
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  state = devices.replicate(step_lib.create_train_state(jax.random.key(config.seed), config,
                                                        steps_per_epoch))
  train_step = step_lib.pmap_train_step(prep=Preprocess.from_config(config))
  rng = jax.random.key(config.seed + 1)
  batches = input_pipeline.create_train_iterator(config)
  fixed = next(batches)
  if config.data.cache:   # the cache is complete after one epoch: time what training then sees
    for _ in range(steps_per_epoch):
      next(batches)
  for _ in range(warmup + 1):
    state, metrics = train_step(state, fixed, rng)
  jax.block_until_ready(metrics)

  def timed(next_batch):
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = train_step(state, next_batch(), rng)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps

  alone, loop = [], []
  for _ in range(2):
    alone.append(timed(lambda: fixed))
    loop.append(timed(lambda: next(batches)))
  step_s, loop_s = min(alone), min(loop)
  return {
      "mode": "loop",
      "sec_per_step_alone": step_s,
      "sec_per_step_loop": loop_s,
      "waiting_fraction": max(0.0, 1 - step_s / loop_s),
      "rounds": {"alone": alone, "loop": loop},
      "images_per_sec": config.batch_size / loop_s,
      "steps": steps,
      "batch_size": config.batch_size,
      "image_size": config.data.crop_size,
      "source": config.data.source,
      "cache": config.data.cache,
      "devices": jax.local_device_count(),
      "backend": jax.default_backend(),
      "cores": hardware.num_cores(),
      "malloc": hardware.freed_memory_policy,
      "loadavg_1m": os.getloadavg()[0],
  }



# The forms the layers mode times for each layer kind (and stride).
_LAYER_CANDIDATES = {("conv4x4", 2): ("xla", "matmul", "s2"),
                     ("conv4x4", 1): ("xla", "matmul", "taps", "winograd", "nested"),
                     ("conv_transpose4x4", 2): choose.CONV_TRANSPOSE_FORMS + ("dilated",)}
# A form whose largest intermediate would pass this many bytes is not timed.
_LAYER_BYTES_LIMIT = 2 ** 31


def _layer_form(layer: choose.Layer, form: str) -> Any:
  """The layer in `form`; `float32`: `by_shape` on its input cast up, its output cast
  back (how a bfloat16 layer `choose.in_float32` names runs)."""
  from p2p_jax.ops import conv, conv_transpose  # pylint: disable=g-import-not-at-top
  if form == "float32":
    if layer.kind == "conv4x4":
      by_shape = lambda x, kernel: conv.conv4x4(x, kernel, layer.stride, "by_shape")
    else:
      by_shape = lambda x, kernel: conv_transpose.conv_transpose4x4(x, kernel, "by_shape")
    return lambda x, kernel: by_shape(x.astype(jnp.float32), kernel).astype(x.dtype)
  if layer.kind == "conv4x4":
    return lambda x, kernel: conv.FORMS[form](x, kernel, layer.stride)
  return conv_transpose.FORMS[form]


def _largest_bytes(layer: choose.Layer, form: str) -> int:
  """A bound on a form's largest intermediate: 16 copies of its larger side's activations,
  once for the windows forms, sixteen-fold for `kernel_major`'s broadcast taps."""
  n, height, width, c_in = layer.x_shape
  c_out = layer.kernel_shape[3]
  scale = 4 if layer.kind == "conv_transpose4x4" else 1
  values = 16 * n * height * width * scale * max(c_in, c_out)
  return values * 4 * (16 if form == "kernel_major" else 1)


def time_layer(layer: choose.Layer, form: str, repeats: int = 5) -> float:
  """Median seconds of one layer's forward pass and both gradients in `form`, its input in
  the layer's dtype and its kernel in float32, as the networks store it (a bfloat16 form's
  time includes the kernel's cast)."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], layer.x_shape, jnp.float32).astype(layer.dtype)
  kernel = 0.02 * jax.random.normal(keys[1], layer.kernel_shape, jnp.float32)
  apply = _layer_form(layer, form)
  out = jax.eval_shape(apply, x, kernel)
  cotangent = jax.random.normal(keys[2], out.shape, jnp.float32).astype(out.dtype)

  @jax.jit
  def forward_and_gradients(x, kernel, cotangent):
    y, pullback = jax.vjp(apply, x, kernel)
    return y, pullback(cotangent)

  jax.block_until_ready(forward_and_gradients(x, kernel, cotangent))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(forward_and_gradients(x, kernel, cotangent))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_layers(config: ml_collections.ConfigDict, repeats: int = 5) -> dict[str, Any]:
  """Each distinct linear layer of G and D, timed (forward and both gradients) in every
  form that applies, against the form `by_shape` picks for it: the measurements behind
  `choose.conv_form` and `choose.conv_transpose_form`, for the config's per-device batch,
  image size and dtype on this backend. In bfloat16 where the CPU has bfloat16 units,
  each layer is also timed in float32 (form `float32`, the choice of `choose.in_float32`)."""
  per_device = config.batch_size // jax.local_device_count()
  devices.check_batch_divides(config.batch_size, jax.local_device_count())
  by_shape = _with(config, batch_size=config.batch_size, conv_impl="by_shape",
                   upconv_impl="by_shape")
  traced = step_lib.trace_layers(by_shape, per_device)
  rows, seen = [], set()
  dtype = jnp.dtype(config.model.dtype)
  for network, layers in traced.items():
    for traced_layer in layers:
      # A layer that runs in float32 under a bfloat16 model is timed in the model's dtype,
      # its forms and float32 side by side.
      layer = dataclasses.replace(traced_layer, dtype=str(dtype))
      chosen = "float32" if traced_layer.dtype != layer.dtype else traced_layer.form
      key = (layer.kind, layer.x_shape, layer.kernel_shape, layer.stride)
      candidates = _LAYER_CANDIDATES.get((layer.kind, layer.stride))
      if candidates is None or key in seen:
        continue
      seen.add(key)
      if choose.dots_only(dtype):
        candidates += ("float32",)
      times = {form: time_layer(layer, form, repeats) for form in candidates
               if _largest_bytes(layer, form) <= _LAYER_BYTES_LIMIT}
      fastest = min(times, key=times.get)
      rows.append({"network": network, "kind": layer.kind, "x_shape": list(layer.x_shape),
                   "kernel_shape": list(layer.kernel_shape), "stride": layer.stride,
                   "dtype": layer.dtype, "chosen": chosen, "fastest": fastest,
                   "ms": {form: 1e3 * t for form, t in times.items()},
                   "chosen_over_fastest": times[chosen] / times[fastest]})
      logging.info("%s %s %s: chosen %s %.1f ms, fastest %s %.1f ms", network, layer.kind,
                   layer.x_shape, chosen, 1e3 * times[chosen], fastest, 1e3 * times[fastest])
  chosen = sum(row["ms"][row["chosen"]] for row in rows)
  fastest = sum(row["ms"][row["fastest"]] for row in rows)
  return {
      "mode": "layers",
      "layers": rows,
      "chosen_ms": chosen,
      "fastest_ms": fastest,
      "per_device_batch": per_device,
      "image_size": config.data.crop_size,
      "dtype": config.model.dtype,
      "cpu_bfloat16_units": hardware.cpu_bfloat16_units(),
      "backend": jax.default_backend(),
      "device_kind": jax.local_devices()[0].device_kind,
      "repeats": repeats,
      "peak_rss_mb": _peak_rss_mb(),
      "loadavg_1m": os.getloadavg()[0],
  }


# The accelerator check: (batch sizes, steps timed per run, steps of the training run).
_CHECK = {"full": ((1, 4, 16), 10, 200), "smoke": ((1,), 2, 10)}
# Forms compared: the CPU-tuned per-layer forms and XLA's own. `auto` is one of them.
_CHECK_FORMS = {"by_shape": ("by_shape", "by_shape"), "xla": ("xla", "dilated")}


def run_check(config: ml_collections.ConfigDict, *, smoke: bool = False) -> dict[str, Any]:
  """The accelerator check: every figure of one device in one JSON object.

  For `config`'s networks and image size (launch/accelerator_check.sh passes
  unet_256 with the 70x70 PatchGAN at 256x256): the step benchmark at batch 1,
  4 and 16 (halved until it fits in memory), in float32 and bfloat16, with the
  CPU-tuned forms (`by_shape`) and XLA's own; then a run of training steps on
  random data with every step's losses checked finite. `smoke` runs the same
  code with smaller batches and fewer steps (for the CPU). 'failures' lists
  what failed; the caller exits non-zero if any did.
  """
  batches, timed, train_steps = _CHECK["smoke" if smoke else "full"]
  local_devices = jax.local_devices()
  runs, failures = [], []
  for batch_per_device in batches:
    for dtype in ("float32", "bfloat16"):
      for forms, (conv_impl, upconv_impl) in _CHECK_FORMS.items():
        label = f"batch {batch_per_device * len(local_devices)}, {dtype}, {forms}"
        batch = batch_per_device
        while True:
          variant = _with(config, batch_size=batch * len(local_devices), dtype=dtype,
                          conv_impl=conv_impl, upconv_impl=upconv_impl)
          try:
            result = run(variant, steps=timed, warmup=1)
            break
          except Exception as error:  # pylint: disable=broad-except  # reported, not raised
            if "RESOURCE_EXHAUSTED" in str(error) and batch > 1:
              batch //= 2                 # the largest batch that fits
              continue
            failures.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
            result = None
            break
        if result is not None:
          runs.append({key: result[key] for key in (
              "batch_size", "dtype", "conv_impl", "upconv_impl", "sec_per_step_median",
              "images_per_sec", "model_gflops_per_sec", "mfu", "compile_s",
              "peak_device_memory_mb", "forms")} | {"forms_name": forms})
  training = None
  try:
    training = _checked_training(_with(config, batch_size=len(local_devices)), train_steps)
  except Exception as error:  # pylint: disable=broad-except
    failures.append(f"training steps: {type(error).__name__}: {str(error)[:300]}")
  backend = jax.default_backend()
  return {
      "mode": "check",
      "smoke": smoke,
      "backend": backend,
      "device_kind": local_devices[0].device_kind,
      "devices": len(local_devices),
      "jax_version": jax.__version__,
      "auto_is": choose.conv_impl_for("auto", backend),
      "image_size": config.data.crop_size,
      "num_downs": config.model.num_downs,
      "runs": runs,
      "training": training,
      "device_jitter_images_per_sec": None,   # the jitter still runs on the host
      "failures": failures,
  }


def _with(config: ml_collections.ConfigDict, *, batch_size: int, **model
          ) -> ml_collections.ConfigDict:
  variant = ml_collections.ConfigDict(config.to_dict())
  variant.batch_size = batch_size
  variant.model.update(model)
  return variant


def _checked_training(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  """`steps` real train steps on fresh random batches; raises unless every loss is finite."""
  state = devices.replicate(step_lib.create_train_state(jax.random.key(0), config,
                                                        steps_per_epoch=1e9))
  train_step = step_lib.pmap_train_step()
  noise = np.random.default_rng(0)
  history = []
  start = time.perf_counter()
  for index in range(steps):
    batch = devices.shard(_random_batch(config, noise))
    state, metrics = train_step(state, batch, jax.random.key(index))
    history.append(metrics)
  history = jax.device_get(history)
  seconds = time.perf_counter() - start
  bad = [(index, name) for index, metrics in enumerate(history)
         for name, value in metrics.items() if not np.all(np.isfinite(value))]
  if bad:
    raise FloatingPointError(f"non-finite losses at (step, loss) {bad[:5]}")
  return {"steps": steps, "batch_size": config.batch_size, "seconds": seconds,
          "final_losses": {name: float(np.mean(value)) for name, value in history[-1].items()}}


def _summary(result: dict[str, Any]) -> str:
  if result["mode"] == "pipeline":
    return (f"input pipeline: {result['pairs_per_sec']:.0f} pairs/s "
            f"({result['pairs_per_sec_per_core']:.0f} per core), "
            f"{result['fraction_of_decode_only']:.2f} of decoding alone "
            f"({result['decode_only_pairs_per_sec']:.0f} pairs/s)")
  if result["mode"] == "loop":
    return (f"training loop: {result['sec_per_step_loop']:.4f} s/step against "
            f"{result['sec_per_step_alone']:.4f} for the step alone; waiting for data "
            f"{100 * result['waiting_fraction']:.1f}% of the time")
  if result["mode"] == "layers":
    return (f"layers: the chosen forms {result['chosen_ms']:.1f} ms, the fastest "
            f"{result['fastest_ms']:.1f} ms over {len(result['layers'])} layers (forward and "
            "both gradients)")
  if result["mode"] == "check":
    return (f"accelerator check on {result['device_kind']}: {len(result['runs'])} runs, "
            f"{len(result['failures'])} failure(s)")
  rate = (f", model {result['model_gflops_per_sec']:.1f} GFLOP/s, "
          f"MFU {100 * result['mfu']:.1f}%")
  return (f"{result['backend']} x{result['devices']}, batch {result['batch_size']} at "
          f"{result['image_size']}px: {result['sec_per_step_median']:.3f} s/step "
          f"({result['optimizer_sec']:.3f} of it the optimiser alone), "
          f"{result['images_per_sec']:.2f} images/s{rate}; compile {result['compile_s']:.1f} s; "
          f"state {'donated' if result['donated'] else 'not donated'}")


FLAGS = flags.FLAGS   # the flags themselves are defined by `_define_flags`, run as a program


def _define_flags() -> None:
  # Defined only when run as a program, so that the module imports anywhere.
  flags.DEFINE_enum("mode", "step", ["step", "pipeline", "loop", "check", "layers"],
                    "Time the train step, the input pipeline alone, the training loop against "
                    "the step, run the accelerator check, or time each layer in every form.")
  flags.DEFINE_bool("smoke", False, "check mode: smaller batches and fewer steps (for a CPU).")
  flags.DEFINE_integer("steps", 10, "Timed steps (step, loop) or batches (pipeline mode).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps run after compiling (step, loop).")
  flags.DEFINE_enum("donate", "auto", ["auto", "yes", "no"],
                    "step mode: donate the state to the step (yes), or not (no); auto does "
                    "as training does (step.donates_state: on accelerators, not on CPUs).")
  config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.mode == "step":
    result = run(FLAGS.config, FLAGS.steps, FLAGS.warmup,
                 donate={"auto": None, "yes": True, "no": False}[FLAGS.donate])
  elif FLAGS.mode == "check":
    result = run_check(FLAGS.config, smoke=FLAGS.smoke)
  elif FLAGS.mode == "layers":
    result = run_layers(FLAGS.config, FLAGS.steps)
  elif FLAGS.mode == "loop":
    devices.hide_accelerators_from_tensorflow()   # the pipeline reads through TensorFlow
    result = run_loop(FLAGS.config, FLAGS.steps, FLAGS.warmup)
  else:
    devices.hide_accelerators_from_tensorflow()
    result = run_pipeline(FLAGS.config, FLAGS.steps)
  logging.info(_summary(result))
  print(json.dumps(result), flush=True)
  if result.get("failures"):
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
