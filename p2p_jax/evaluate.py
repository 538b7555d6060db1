"""Evaluation: translate a split with a trained generator and score it.

`python -m p2p_jax.main --config=... --workdir=DIR --mode=eval` restores the
latest (or `config.eval.step`) checkpoint on whatever devices this machine has
and writes `DIR/eval/step_<N>/metrics.json`, `images/<name>_{real_a,fake_b,
real_b}.png` and `index.html`.

Besides L1, PSNR and SSIM, metrics.json holds the paper's own scores where
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
from p2p_jax import devices
from p2p_jax import images
from p2p_jax import input_pipeline
from p2p_jax import metrics as metrics_lib
from p2p_jax import segmentation
from p2p_jax import step as step_lib

_METRICS = ("l1", "psnr", "ssim")


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
  totals = {name: 0.0 for name in _METRICS}
  count, saved_names = 0, []
  if out_dir:
    epath.Path(out_dir, "images").mkdir(parents=True, exist_ok=True)
  for batch, fake_b, scores in translate_split(replicated_state, config, split,
                                               deterministic=deterministic, seed=config.seed):
    keep = batch["mask"].copy()
    if max_images >= 0:
      keep &= np.cumsum(keep) + count <= max_images
    for name in _METRICS:
      totals[name] += float(np.sum(scores[name][keep]))
    for score in extra_scores:
      score.add(batch, fake_b, keep)
    if out_dir and jax.process_index() == 0:
      for i in np.flatnonzero(keep):
        if save_images >= 0 and len(saved_names) >= save_images:
          break
        name = images.safe_name(batch["name"][i])
        for kind, image in (("real_a", batch["real_a"][i]), ("fake_b", fake_b[i]),
                            ("real_b", batch["real_b"][i])):
          images.save_png(os.path.join(out_dir, "images", f"{name}_{kind}.png"), image)
        saved_names.append(name)
    count += int(keep.sum())
    if 0 <= max_images <= count:
      break
  sums = np.array([count] + [totals[n] for n in _METRICS], np.float64)
  if jax.process_count() > 1:
    sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
  num_images = int(sums[0])
  if num_images == 0:
    raise ValueError(f"The {split!r} split of {config.data.source}:{config.data.name} is empty.")
  result = {name: float(sums[i + 1] / num_images) for i, name in enumerate(_METRICS)}
  for score in extra_scores:
    result.update(score.result())
  result.update(num_images=num_images, split=split, deterministic=deterministic,
                test_mode=describe_test_mode(deterministic))
  if out_dir and jax.process_index() == 0:
    images.write_index_html(os.path.join(out_dir, "index.html"),
                            f"{os.path.basename(out_dir)}: {split}", saved_names, result)
  return result


def restore_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None
                  ) -> step_lib.TrainState:
  """The unreplicated TrainState of `workdir`'s checkpoint `step` (default: the latest)."""
  template = step_lib.create_train_state(jax.random.key(0), config, steps_per_epoch=1)
  checkpointer = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.restore(template, step)
  finally:
    checkpointer.close()


def with_saved_model(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config` with the architecture and image size of the run saved in `workdir`."""
  saved = checkpoints.load_config(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = saved.model
  for field in ("crop_size", "direction"):
    config.data[field] = saved.data[field]
  return config


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores a checkpoint of `workdir`, evaluates `config.data.eval_split`, writes the results."""
  config = with_saved_model(config, workdir)
  step = None if config.eval.step < 0 else config.eval.step
  state = restore_state(config, workdir, step)
  step = int(state.step)
  logging.info("Evaluating step %d of %s on %d device(s), %s.", step, workdir,
               jax.device_count(), describe_test_mode(config.eval.deterministic))
  out_dir = os.path.join(workdir, "eval", f"step_{step}")
  result = evaluate_split(devices.replicate(state), config, config.data.eval_split,
                          deterministic=config.eval.deterministic, out_dir=out_dir,
                          max_images=config.eval.num_images, save_images=config.eval.save_images,
                          extra_scores=_extra_scores(config, workdir))
  result["step"] = step
  if jax.process_index() == 0:
    epath.Path(out_dir, "metrics.json").write_text(json.dumps(result, indent=2))
  logging.info("Eval step %d: %s", step, json.dumps(result))
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


def translate_images(state: step_lib.TrainState, real_a: jax.Array, rng: jax.Array, *,
                     deterministic: bool) -> jax.Array:
  """Translates one batch [B, H, W, C] on the default device (any H, W the net accepts)."""
  return _jit_translate(deterministic)(state, jnp.asarray(real_a), rng)


@functools.lru_cache(maxsize=None)
def _jit_translate(deterministic: bool):
  return jax.jit(functools.partial(step_lib.eval_step, deterministic=deterministic))
