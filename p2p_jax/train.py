"""The training loop: `train_and_evaluate` trains pix2pix per a config, resuming from its workdir.

The step itself (`step.train_step`, both networks and their optimisers) is in
`p2p_jax.step`; this module feeds it batches from the input pipeline, logs
losses and sample images, runs validation, stops on NaN or a stop request and
saves checkpoints.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions

from p2p_jax import checkpoints
from p2p_jax import devices
from p2p_jax import evaluate as evaluate_lib
from p2p_jax import images
from p2p_jax import input_pipeline
from p2p_jax import monitoring
from p2p_jax import step as step_lib
from p2p_jax.datasets.preprocess import Preprocess


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int | None = None) -> int:
  """The step a run ends at: config.num_train_steps if set, else the epochs' steps.

  `steps_per_epoch` defaults to the input pipeline's count for the config.
  """
  if config.num_train_steps > 0:
    return config.num_train_steps
  if steps_per_epoch is None:
    steps_per_epoch = input_pipeline.steps_per_epoch(config)
  return steps_per_epoch * (config.optim.n_epochs + config.optim.n_epochs_decay)


def _schedule_steps_per_epoch(config: ml_collections.ConfigDict, steps_per_epoch: int) -> float:
  # With num_train_steps set, the schedule keeps its shape (constant, then linear
  # decay in the paper's proportions) stretched over the steps actually run.
  if config.num_train_steps > 0:
    return config.num_train_steps / (config.optim.n_epochs + config.optim.n_epochs_decay)
  return steps_per_epoch


@functools.lru_cache(maxsize=4)
def _pmapped_jitter(prep: Preprocess):
  return jax.pmap(prep.train)


def _write_samples(writer: metric_writers.MetricWriter, step: int, state: step_lib.TrainState,
                   batch: dict[str, jax.Array], prep: Preprocess, seed: int) -> None:
  """input | output | target of the batch just trained on, as the step saw it."""
  translate = evaluate_lib.pmapped_translate(False)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), jax.local_device_count())
  real_a, real_b = _pmapped_jitter(prep)(batch)
  fake_b, _ = translate(state, real_a, real_b, keys)
  host = jax.device_get({"real_a": real_a, "fake_b": fake_b, "real_b": real_b})
  flat = {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in host.items()}
  grid = images.sample_grid(flat["real_a"], flat["fake_b"], flat["real_b"])
  writer.write_images(step, {"samples/input_output_target": grid[None]})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       writer: metric_writers.MetricWriter | None = None) -> step_lib.TrainState:
  """Trains pix2pix per `config`, checkpointing into `workdir`; resumes if it holds a checkpoint.

  `writer` defaults to clu's TensorBoard + console writer (console only on
  processes other than 0). Returns the final state (unreplicated, on the host).
  """
  is_chief = jax.process_index() == 0
  if writer is None:
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  num_steps = num_train_steps(config, steps_per_epoch)
  state = step_lib.create_train_state(jax.random.key(config.seed), config,
                             _schedule_steps_per_epoch(config, steps_per_epoch))

  checkpointer = checkpoints.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                          keep=config.keep_checkpoints)
  if is_chief:
    checkpoints.check_same_run(config, workdir)
    checkpoints.save_config(config, workdir)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
    logging.info("Resuming from the checkpoint of step %d in %s.", int(state.step), workdir)
  initial_step = int(state.step)
  if initial_step == 0:
    parameter_overview.log_parameter_overview(state.generator.params, msg="Generator")
    parameter_overview.log_parameter_overview(state.discriminator.params, msg="Discriminator")
  logging.info("Training %d steps (%d per epoch, global batch %d on %d devices).", num_steps,
               steps_per_epoch, config.batch_size, jax.device_count())
  layers = step_lib.trace_layers(config, config.batch_size // jax.device_count())
  logging.info("Layer forms on %s (conv_impl=%s, upconv_impl=%s, dtype=%s): %s; %.1f GFLOP "
               "per step.", jax.default_backend(), config.model.conv_impl,
               config.model.upconv_impl, config.model.dtype,
               step_lib.describe_forms(layers),
               step_lib.model_flops(layers, config.loss.lambda_gan) * jax.device_count() / 1e9)

  state = devices.replicate(state)
  train_iter = input_pipeline.create_train_iterator(config, start_step=initial_step)
  prep = Preprocess.from_config(config)
  p_train_step = step_lib.pmap_train_step(prep=prep)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  window, unchecked = monitoring.MetricWindow(), monitoring.MetricWindow()
  stop = monitoring.StopRequest()
  try:
    for step in range(initial_step + 1, num_steps + 1):   # `step` counts updates done
      batch = next(train_iter)
      state, metrics = p_train_step(state, batch, step_rng)
      window.add(step, metrics)
      unchecked.add(step, metrics)
      report_progress(step)
      last_step = step == num_steps
      if step % config.log_every_steps == 0 or last_step:
        unchecked.check_finite(checkpointer.latest_step(), config.max_loss)
        unchecked = monitoring.MetricWindow()
        writer.write_scalars(step, {f"train/{k}": v for k, v in window.average().items()})
      if config.image_every_steps > 0 and (step % config.image_every_steps == 0 or last_step):
        _write_samples(writer, step, state, batch, prep, config.seed)
      if config.eval_every_steps > 0 and (step % config.eval_every_steps == 0 or last_step):
        result = evaluate_lib.evaluate_split(state, config, config.data.eval_split,
                                             deterministic=config.eval.deterministic,
                                             max_images=config.eval.num_images)
        writer.write_scalars(step, {f"val/{k}": result[k] for k in ("l1", "psnr", "ssim")})
      preempted = stop.requested or checkpointer.reached_preemption(step)
      if last_step or preempted or checkpointer.is_due(step):
        unchecked.check_finite(checkpointer.latest_step(), config.max_loss)   # never save it
        unchecked = monitoring.MetricWindow()
        checkpointer.save(step, state)
      if preempted:
        logging.warning("Stop requested at step %d: checkpoint saved, exiting.", step)
        break
  finally:
    stop.restore()
    checkpointer.close()
    writer.flush()
  return devices.unreplicate(state)
