"""Evaluation: translate a split with a trained generator and score it.

`python -m p2p_jax.main --workdir=DIR --mode=eval` restores the newest checkpoint
that verifies (or `config.eval.step`) on whatever devices this machine has, with
the config it was trained with (or a `--config` that changes what is evaluated,
or the dtype and forms it runs in, not the architecture), and writes into
`DIR/eval/step_<N>/<split>_<mode>/` (mode: `paper` or `deterministic`; with
`_<dtype>_<conv_impl>_<upconv_impl>` added where those differ from the
checkpoint's) `metrics.json`, `images/<name>_{real_a,
fake_b,real_b}.png` and `index.html`, the images with their scores, worst first;
`DIR/eval/step_<N>/index.html` links the modes and splits evaluated.

Besides L1, PSNR, SSIM and LPIPS (`perceptual`, where its package is installed),
metrics.json holds the paper's own scores where
the data allows them: the colour statistics of Figure 7 for RGB outputs
(`color_stats`: Lab histogram intersections and distance, mean chroma), and,
with `config.eval.fcn_score` on data with class maps (synthetic
labels2facades), the FCN-score of Tables 1-3 (`segmentation`).

Test-time behaviour follows the paper by default: each image is normalised
with its own BatchNorm statistics and dropout stays on.
`config.eval.deterministic=True` uses the running statistics and no dropout.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from absl import logging
from jax.experimental import multihost_utils

from p2p_jax import checkpoints
from p2p_jax import color_stats
from p2p_jax import config_checks
from p2p_jax import devices
from p2p_jax import images
from p2p_jax import input_pipeline
from p2p_jax import metrics as metrics_lib
from p2p_jax import perceptual
from p2p_jax import segmentation
from p2p_jax import step as step_lib
from p2p_jax import workdir as workdir_lib
from p2p_jax.datasets.errors import DataError

_METRICS = ("l1", "psnr", "ssim")
_WORST = 10          # metrics.json names this many images of the split with the highest L1


def mode_name(deterministic: bool) -> str:
  """'paper' or 'deterministic': the test mode, as a directory and metrics.json name it."""
  return "deterministic" if deterministic else "paper"


def result_dir(workdir: str, step: int, split: str, deterministic: bool,
               compute: tuple[str, ...] = ()) -> str:
  """Where eval writes one test mode of one split: eval/step_N/<split>_<mode>/, or
  eval/step_N/<split>_<mode>_<compute...>/ for a dtype and forms other than the
  checkpoint's (`compute`: their values), beside the checkpoint's own."""
  name = "_".join((split, mode_name(deterministic)) + tuple(compute))
  return os.path.join(workdir, "eval", f"step_{step}", name)


def describe_data(config: ml_collections.ConfigDict) -> str:
  """'synthetic:labels2facades', 'folder:/data/facades' or 'tfds:facades'."""
  where = config.data.dir if config.data.source == "folder" else config.data.name
  return f"{config.data.source}:{where}"


def describe_test_mode(deterministic: bool) -> str:
  """One line saying how the generator runs at test time, for logs and metrics.json."""
  if deterministic:
    return "deterministic: running BatchNorm statistics, dropout off (official --eval)"
  return "paper: each image normalised with its own BatchNorm statistics, dropout on"


@functools.lru_cache(maxsize=None)
def pmapped_translate(deterministic: bool):
  """(state, real_a, real_b, rngs) -> (fake_b, per-image metrics), pmapped over local devices."""
  def translate(state, real_a, real_b, rng):
    fake_b = step_lib.eval_step(state, real_a, rng, deterministic=deterministic)
    return fake_b, metrics_lib.image_metrics(fake_b, real_b)
  return jax.pmap(translate, axis_name=devices.AXIS_NAME)


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
  if array.shape[0] == size:
    return array
  pad = np.zeros((size - array.shape[0],) + array.shape[1:], array.dtype)
  return np.concatenate([array, pad])


def translate_split(replicated_state: step_lib.TrainState, config: ml_collections.ConfigDict,
                    split: str, *, deterministic: bool, seed: int = 0
                    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]]:
  """Yields (batch, fake_b, per-image metrics) over this process's part of `split`.

  The batch is the eval iterator's (with 'mask' False on padding rows); fake_b
  is [B, H, W, C_out] in [-1, 1] on the host.
  """
  translate = pmapped_translate(deterministic)
  count = jax.local_device_count()
  for index, batch in enumerate(input_pipeline.create_eval_iterator(config, split)):
    size = batch["real_a"].shape[0]
    padded = -(-size // count) * count
    sharded = devices.shard({k: _pad_to(batch[k], padded) for k in ("real_a", "real_b")})
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), index), count)
    fake_b, scores = translate(replicated_state, sharded["real_a"], sharded["real_b"], keys)
    fake_b = np.asarray(fake_b).reshape((padded,) + fake_b.shape[2:])[:size]
    scores = {k: np.asarray(v).reshape(-1)[:size] for k, v in scores.items()}
    yield batch, fake_b, scores


def evaluate_split(replicated_state: step_lib.TrainState, config: ml_collections.ConfigDict,
                   split: str, *, deterministic: bool, out_dir: str | None = None,
                   max_images: int = -1, save_images: int = 0,
                   extra_scores: Sequence[Any] = ()) -> dict[str, Any]:
  """Mean L1 / PSNR / SSIM over `split` (all processes together); writes images if `out_dir`.

  `extra_scores`: split-level statistics (`color_stats.ColorStats`,
  `segmentation.FcnScore`), each fed `add(batch, fake_b, keep)` per batch and
  asked for `result()`, a dict merged into the returned one, at the end.
  """
  if max_images >= 0 and jax.process_count() > 1:
    # The limit is global; each process evaluates its own contiguous part of the split.
    part = -(-input_pipeline.num_examples(config, split) // jax.process_count())
    max_images = min(part, max(0, max_images - jax.process_index() * part))
  metrics = _METRICS + ("lpips",)
  totals = {name: 0.0 for name in metrics}
  count, saved = 0, {}            # saved: name -> its per-image metrics
  worst: list[tuple[float, str]] = []
  lpips, lpips_checked = None, False
  if out_dir:
    epath.Path(out_dir, "images").mkdir(parents=True, exist_ok=True)
  for batch, fake_b, scores in translate_split(replicated_state, config, split,
                                               deterministic=deterministic, seed=config.seed):
    keep = batch["mask"].copy()
    if max_images >= 0:
      keep &= np.cumsum(keep) + count <= max_images
    if not lpips_checked:
      lpips, lpips_checked = perceptual.create(config.eval.get("lpips", ""),
                                               fake_b.shape[1:3]), True
    if lpips is not None:
      scores["lpips"] = lpips(fake_b, batch["real_b"])
    for name in metrics:
      if name in scores:
        totals[name] += float(np.sum(scores[name][keep]))
    for score in extra_scores:
      score.add(batch, fake_b, keep)
    for i in np.flatnonzero(keep):
      worst = sorted(worst + [(float(scores["l1"][i]), str(batch["name"][i]))])[-_WORST:]
    if out_dir and jax.process_index() == 0:
      for i in np.flatnonzero(keep):
        if save_images >= 0 and len(saved) >= save_images:
          break
        name = images.safe_name(batch["name"][i])
        for kind, image in (("real_a", batch["real_a"][i]), ("fake_b", fake_b[i]),
                            ("real_b", batch["real_b"][i])):
          images.save_png(os.path.join(out_dir, "images", f"{name}_{kind}.png"), image)
        saved[name] = {metric: float(scores[metric][i]) for metric in metrics if metric in scores}
    count += int(keep.sum())
    if 0 <= max_images <= count:
      break
  sums = np.array([count] + [totals[n] for n in metrics], np.float64)
  if jax.process_count() > 1:
    sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
  num_images = int(sums[0])
  if num_images == 0:
    raise DataError(f"the {split!r} split of {describe_data(config)}",
                    "is empty; pick another with --config.data.eval_split")
  result = {name: float(sums[i + 1] / num_images) for i, name in enumerate(metrics)
            if name != "lpips" or lpips is not None}
  if lpips is not None:
    result["lpips_net"] = lpips.net
  for score in extra_scores:
    result.update(score.result())
  result.update(num_images=num_images, split=split, deterministic=deterministic,
                test_mode=describe_test_mode(deterministic),
                mode=mode_name(deterministic), data=describe_data(config),
                # With several processes: the worst of process 0's part of the split.
                worst_l1=[{"name": name, "l1": l1} for l1, name in reversed(worst)])
  if out_dir and jax.process_index() == 0:
    images.write_index_html(os.path.join(out_dir, "index.html"),
                            f"{os.path.basename(out_dir)}: {split}", saved, result)
  return result


def restore_checkpoint(workdir: str, step: int | None = None) -> checkpoints.Restored:
  """`workdir`'s checkpoint `step` (default: the newest that verifies), verified, on the host.

  Its `config` is the one it was trained with (for checkpoints saved without one,
  the workdir's config.json).
  """
  fallback = workdir_lib.load_config(workdir) if workdir_lib.has_config(workdir) else None
  templates = {}

  def template_for(saved: ml_collections.ConfigDict | None) -> step_lib.TrainState:
    model_config = saved or fallback or workdir_lib.load_config(workdir)   # raises: no run
    key = model_config.to_json(sort_keys=True)
    if key not in templates:
      templates[key] = step_lib.create_train_state(jax.random.key(0), model_config,
                                                   steps_per_epoch=1)
    return templates[key]

  checkpointer = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    restored = checkpointer.restore(template_for, step)
  finally:
    checkpointer.close()
  return restored._replace(config=restored.config or fallback)


def restore_state(workdir: str, step: int | None = None) -> step_lib.TrainState:
  """The unreplicated TrainState of `workdir`'s checkpoint `step` (default: the newest)."""
  return restore_checkpoint(workdir, step).state


EVAL_FIXED_FIELDS = ("model.", "data.crop_size", "data.direction")   # the checkpoint's own


def evaluate(config: ml_collections.ConfigDict | None, workdir: str) -> dict[str, Any]:
  """Restores a checkpoint of `workdir`, evaluates `config.data.eval_split`, writes the results.

  `config` None: the checkpoint's own config, as it was trained. A config may
  change what evaluation reads and how (split, data, batch size, number of
  images, test mode, step), and how the generator computes
  (`workdir.COMPUTE_FIELDS`: a bfloat16 run evaluated in float32, say), not the
  architecture: a field of EVAL_FIXED_FIELDS that differs from the checkpoint's
  is a ConfigError naming it.
  """
  if config is not None:
    config_checks.check_config(config, train=False)
  step = None if config is None or config.eval.step < 0 else config.eval.step
  restored = restore_checkpoint(workdir, step)
  # Every process, so that all stop together; before the evaluation, not after it.
  workdir_lib.check_writable(os.path.join(workdir, "eval"))
  state, compute = restored.state, ()
  if config is None:
    config = restored.config
  else:
    saved = workdir_lib.as_dict(restored.config)
    workdir_lib.check_same_run(
        config, saved, workdir, fields=EVAL_FIXED_FIELDS,
        hint="Evaluation uses the checkpoint's architecture: drop that override (eval needs "
             "no --config at all).")
    changes = workdir_lib.compute_changes(config, saved)
    if changes:
      # The checkpoint's arrays in the config's networks, its results in their own directory.
      state = state.replace(settings=step_lib.create_settings(config, steps_per_epoch=1))
      compute = tuple(str(config.model[field.removeprefix("model.")])
                      for field in workdir_lib.COMPUTE_FIELDS)
      logging.warning("Evaluating in other settings than step %d was trained in: %s.",
                      restored.step, workdir_lib.describe_changes(changes))
  step = restored.step
  split = config.data.eval_split
  logging.info("Evaluating step %d of %s on %d device(s) in %s, %s.", step, workdir,
               jax.device_count(), config.model.dtype,
               describe_test_mode(config.eval.deterministic))
  out_dir = result_dir(workdir, step, split, config.eval.deterministic, compute)
  result = evaluate_split(devices.replicate(state), config, split,
                          deterministic=config.eval.deterministic, out_dir=out_dir,
                          max_images=config.eval.num_images, save_images=config.eval.save_images,
                          extra_scores=_extra_scores(config, workdir))
  result["step"] = step
  result["dtype"] = config.model.dtype
  if jax.process_index() == 0:
    epath.Path(out_dir, "metrics.json").write_text(json.dumps(result, indent=2))
    images.write_step_index(os.path.dirname(out_dir), f"step {step} of {workdir}")
  logging.info("Eval of step %d, %s split, %s test mode, %d images: L1 %.4f, PSNR %.2f dB, "
               "SSIM %.3f. Wrote %s and %s (the images with their scores, worst first).", step,
               split, result["mode"], result["num_images"], result["l1"], result["psnr"],
               result["ssim"], os.path.join(out_dir, "metrics.json"),
               os.path.join(out_dir, "index.html"))
  return result


def _extra_scores(config: ml_collections.ConfigDict, workdir: str) -> list[Any]:
  """The paper's scores this config's data allows, beyond L1 / PSNR / SSIM."""
  scores = []
  if config.model.output_nc == 3 and config.eval.get("color_stats", True):
    scores.append(color_stats.ColorStats())
  fcn_score = segmentation.create_fcn_score(config, workdir)   # None unless eval.fcn_score
  if fcn_score is not None:
    scores.append(fcn_score)
  return scores


def translate_images(state: step_lib.TrainState, real_a: jax.Array, rng: jax.Array | None, *,
                     deterministic: bool, dropout: bool = True) -> jax.Array:
  """Translates one batch [B, H, W, C] on the default device (any H, W the net accepts).

  `step.eval_step`'s test modes; `rng` seeds the dropout (unused without it)."""
  return _jit_translate(deterministic, dropout)(state, jnp.asarray(real_a), rng)


@functools.lru_cache(maxsize=None)
def _jit_translate(deterministic: bool, dropout: bool):
  return jax.jit(functools.partial(step_lib.eval_step, deterministic=deterministic,
                                   dropout=dropout))
