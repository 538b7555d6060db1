"""The training loop: `train_and_evaluate` trains pix2pix per a config, resuming from its workdir.

The step itself (`step.train_step`, both networks and their optimisers) is in
`p2p_jax.step`; this module feeds it batches from the input pipeline, logs
losses and sample images, runs validation, stops on NaN or a stop request and
saves checkpoints.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from jax.experimental import multihost_utils

from p2p_jax import checkpoints
from p2p_jax import config_checks
from p2p_jax import devices
from p2p_jax import evaluate as evaluate_lib
from p2p_jax import hardware
from p2p_jax import images
from p2p_jax import input_pipeline
from p2p_jax import monitoring
from p2p_jax import step as step_lib
from p2p_jax import workdir as workdir_lib
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
  The workdir is locked for the whole run (`workdir.TrainLock`, held by process 0).
  """
  config_checks.check_config(config)      # before anything is written
  lock = _lock_workdir(workdir)
  try:
    return _train(config, workdir, writer)
  finally:
    if lock is not None:
      lock.release()


def _lock_workdir(workdir: str) -> workdir_lib.TrainLock | None:
  """Process 0 takes the workdir's lock; every process learns whether it did."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = workdir_lib.TrainLock(workdir)
    try:
      lock.acquire()
    except Exception as refused:  # pylint: disable=broad-except  # the others must hear of it
      lock, error = None, refused
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not held and error is None:
      error = workdir_lib.WorkdirError(f"Process 0 could not lock {workdir}; its log says why.")
  if error is not None:
    raise error
  return lock


def _restore(checkpointer: checkpoints.Checkpointer, state: step_lib.TrainState,
             config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """The newest checkpoint that verifies, after checking it is this run's; damaged and
  incomplete checkpoints are moved aside. `state` itself when there is none."""
  if not checkpointer.all_steps():
    checkpointer.set_aside()
    return state
  fallback = workdir_lib.load_config(workdir).to_dict() if workdir_lib.has_config(workdir) else None

  def template_for(saved: ml_collections.ConfigDict | None) -> step_lib.TrainState:
    workdir_lib.check_same_run(config, saved.to_dict() if saved else fallback, workdir)
    return state

  restored = checkpointer.restore(template_for)
  checkpointer.set_aside(restored.damaged)
  logging.info("Resuming from the checkpoint of step %d in %s.", restored.step, workdir)
  changes = workdir_lib.compute_changes(
      config, workdir_lib.as_dict(restored.config) if restored.config else fallback)
  if changes:
    logging.warning("Resuming in other settings than step %d was trained in: %s.",
                    restored.step, workdir_lib.describe_changes(changes))
  return restored.state


def _train(config: ml_collections.ConfigDict, workdir: str,
           writer: metric_writers.MetricWriter | None) -> step_lib.TrainState:
  is_chief = jax.process_index() == 0
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  num_steps = num_train_steps(config, steps_per_epoch)
  state = step_lib.create_train_state(jax.random.key(config.seed), config,
                             _schedule_steps_per_epoch(config, steps_per_epoch))
  checkpointer = checkpoints.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                          keep=config.keep_checkpoints)
  try:
    state = _restore(checkpointer, state, config, workdir)
    if writer is None:
      writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    return _loop(config, workdir, writer, checkpointer, state, num_steps, steps_per_epoch)
  finally:
    checkpointer.close()
    if writer is not None:
      writer.flush()


def _loop(config: ml_collections.ConfigDict, workdir: str, writer: metric_writers.MetricWriter,
          checkpointer: checkpoints.Checkpointer, state: step_lib.TrainState, num_steps: int,
          steps_per_epoch: int) -> step_lib.TrainState:
  initial_step = int(state.step)
  logging.info("%s", describe_run(config, state, workdir, num_steps, steps_per_epoch))
  if logging.vlog_is_on(1):          # --verbosity=1: every parameter's shape and size
    for name, params in (("Generator", state.generator.params),
                         ("Discriminator", state.discriminator.params)):
      logging.info("%s parameters:\n%s", name, parameter_overview.get_parameter_overview(params))
  logging.info("%s", describe_layer_forms(config))

  state = devices.replicate(state)
  train_iter = input_pipeline.create_train_iterator(config, start_step=initial_step)
  prep = Preprocess.from_config(config)
  p_train_step = step_lib.pmap_train_step(prep=prep)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  progress = monitoring.Progress(initial_step, num_steps, config.batch_size, writer)
  losses: dict[str, float] = {}
  window, unchecked = monitoring.MetricWindow(), monitoring.MetricWindow()
  stop = monitoring.StopRequest()
  config_saved = False
  try:
    for step in range(initial_step + 1, num_steps + 1):   # `step` counts updates done
      batch = next(train_iter)
      state, metrics = p_train_step(state, batch, step_rng)
      window.add(step, metrics)
      unchecked.add(step, metrics)
      progress(step)
      last_step = step == num_steps
      if step % config.log_every_steps == 0 or last_step:
        unchecked.check_finite(checkpointer.latest_step(), config.max_loss)
        unchecked = monitoring.MetricWindow()
        losses = window.average()
        writer.write_scalars(step, {f"train/{k}": v for k, v in losses.items()})
      if config.image_every_steps > 0 and (step % config.image_every_steps == 0 or last_step):
        _write_samples(writer, step, state, batch, prep, config.seed)
      if config.eval_every_steps > 0 and (step % config.eval_every_steps == 0 or last_step):
        result = evaluate_lib.evaluate_split(state, config, config.data.eval_split,
                                             deterministic=config.eval.deterministic,
                                             max_images=config.eval.num_images)
        writer.write_scalars(step, {f"val/{k}": result[k] for k in ("l1", "psnr", "ssim", "lpips")
                                    if k in result})
      preempted = stop.requested or checkpointer.reached_preemption(step)
      if last_step or preempted or checkpointer.is_due(step):
        unchecked.check_finite(checkpointer.latest_step(), config.max_loss)   # never save it
        unchecked = monitoring.MetricWindow()
        checkpointer.save(step, state, config)
        if not config_saved:
          # Only once this run's first checkpoint is written: the workdir's config then
          # describes its checkpoints, and a run that stopped earlier left it as it was.
          checkpointer.wait_until_finished()
          if jax.process_index() == 0:
            _save_config(config, workdir, initial_step)
          config_saved = True
      if preempted:
        logging.warning("Stop requested at step %d: checkpoint saved, exiting. Run the same "
                        "command again to resume.", step)
        break
  finally:
    stop.restore()
  final = devices.unreplicate(state)
  if int(final.step) == num_steps and num_steps > initial_step:
    checkpointer.wait_until_finished()
    logging.info("%s", closing_line(workdir, num_steps, initial_step, progress, losses))
  return final


def describe_layer_forms(config: ml_collections.ConfigDict) -> str:
  """The line naming the form each layer kind runs, and why where the CPU decides it."""
  layers = step_lib.trace_layers(config, config.batch_size // jax.device_count())
  backend, dtype = jax.default_backend(), config.model.dtype
  why = ""
  if backend == "cpu" and dtype == "bfloat16":
    why = (" This CPU has bfloat16 units, so by_shape runs every layer as dots (and the "
           "innermost ones, whose kernels are most of what they read, in float32)."
           if hardware.cpu_bfloat16_units() else
           " This CPU has no bfloat16 units, so by_shape keeps float32's forms (and float32 "
           "is faster here).")
  gflops = step_lib.model_flops(layers, config.loss.lambda_gan) * jax.device_count() / 1e9
  return (f"Layer forms on {backend} (conv_impl={config.model.conv_impl}, "
          f"upconv_impl={config.model.upconv_impl}, dtype={dtype}): "
          f"{step_lib.describe_forms(layers)}; {gflops:.1f} GFLOP per step.{why}")


def describe_run(config: ml_collections.ConfigDict, state: step_lib.TrainState, workdir: str,
                 num_steps: int, steps_per_epoch: int) -> str:
  """The line that opens a training: what is trained on what data, how long, and where."""
  model, data = config.model, config.data
  count = parameter_overview.count_parameters
  kind = "U-Net" if model.skip_connections else "encoder-decoder"
  generator = (f"{kind} generator ({model.num_downs} levels, ngf {model.ngf}, "
               f"{count(state.generator.params) / 1e6:.1f}M parameters)")
  if model.disc_type == "pixel":
    patch = "1x1 PixelGAN"
  else:
    field = 16
    for _ in range(model.n_layers_d - 1):
      field = 2 * field + 2
    patch = f"{field}x{field} PatchGAN" if model.n_layers_d else "PatchGAN"
  discriminator = (f"{'conditional ' if model.conditional_d else ''}{patch} (ndf {model.ndf}, "
                   f"{count(state.discriminator.params) / 1e6:.1f}M)")
  where = {"synthetic": f"synthetic {data.name}", "folder": f"the images in {data.dir}",
           "tfds": f"pix2pix/{data.name} from TFDS"}.get(data.source, data.source)
  start = int(state.step)
  begin = f"resuming at step {start:,}" if start else "from scratch"
  return (f"Training pix2pix: a {generator} against a {discriminator}, "
          f"{config.loss.gan_mode} GAN + {config.loss.lambda_l1:g} x L1. Data: {where}, "
          f"{steps_per_epoch * config.batch_size:,} pairs per epoch, {data.direction}, "
          f"{data.crop_size}x{data.crop_size} crops. {num_steps:,} steps "
          f"({num_steps / steps_per_epoch:.1f} epochs) of global batch {config.batch_size} on "
          f"{jax.device_count()} {jax.default_backend()} device(s), {begin}. Workdir: {workdir}.")


def closing_line(workdir: str, num_steps: int, initial_step: int, progress: monitoring.Progress,
                 losses: dict[str, float]) -> str:
  """The line that ends a training: how it went, where its results are, what to run next."""
  rate = progress.rate(num_steps)
  speed = f" at {rate:.2f} steps/s" if rate else ""
  shown = ", ".join(f"{name} {losses[name]:.3g}" for name in ("G_GAN", "G_L1", "D_real", "D_fake")
                    if name in losses)
  return (f"Done: trained steps {initial_step + 1:,}-{num_steps:,}{speed}; last losses {shown}. "
          f"Checkpoint: {os.path.join(workdir, 'checkpoints', str(num_steps))}; TensorBoard: "
          f"tensorboard --logdir {workdir}. Next: evaluate with `python -m p2p_jax.main "
          f"--workdir={workdir} --mode=eval`, translate your own images with `python -m "
          f"p2p_jax.predict --workdir={workdir} --input=IMAGES --output=OUT`.")


def _save_config(config: ml_collections.ConfigDict, workdir: str, start_step: int) -> None:
  """config.json and its history; a failure is a warning, since every checkpoint carries its
  own config (and the other processes go on into the next step's collectives)."""
  try:
    workdir_lib.save_config(config, workdir, start_step=start_step)
  except OSError as error:
    logging.warning("Could not write the config files of %s: %s", workdir,
                    workdir_lib.describe_write_error(error, workdir) or error)
