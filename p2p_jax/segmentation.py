"""FCN-score: how well a segmentation net trained on real photos reads generated ones.

The paper scores labels -> photo translations by running a segmentation
network (an FCN trained on real Cityscapes photos) over the generated photos
and comparing its class maps with the label maps the photos were generated
from: if the generated photos are realistic, the net recognises the classes
in them about as well as in real photos. Three numbers, as the paper's
Tables 1-3:

  per-pixel accuracy  pixels whose predicted class is right / all pixels
  per-class accuracy  the mean over classes of recall (right / that class's pixels),
                      over the classes that occur in the label maps
  class IoU           the mean over classes of |predicted & true| / |predicted | true|,
                      over the classes that occur in the label maps or the predictions

All three come from one confusion matrix summed over the whole split, as the
official evaluation script computes them.

Here the segmentation net is a small U-Net (`SegmentationNet`) trained on the
real photos (the generator's target images, `real_b`) of the train split of
a source with class maps (the synthetic labels2facades task), at the eval
resolution, for `eval.fcn_scorer_steps` steps (default 500, each of
16 * 64 * 64 pixels: a few minutes on a 2-core CPU at any image size). It is
trained once and cached in `eval.fcn_scorer_dir` (default WORKDIR/fcn_scorer),
keyed by the data and steps it was trained with, so every run evaluated
against the same directory is scored by the same net. Its scores on
the real test photos come out beside the generated ones (`fcn_real_*`): the
paper's "ground truth" row, the ceiling of what a generator can reach.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from p2p_jax import input_pipeline

DEFAULT_STEPS = 500          # scorer training steps when config.eval has no fcn_scorer_steps
_BATCH_PIXELS = 16 * 64 * 64  # pixels per training batch: 16 images at 64x64, 4 at 128x128
_LEARNING_RATE = 2e-3
_MAX_TRAIN_IMAGES = 1000     # real photos held in memory for the scorer's training
_WIDTH = 16                  # channels at full resolution, doubled at each level down
_VERSION = 1                 # part of the cache key: raise it when the net or its training change


# ----------------------------------------------------------------------------- the scores

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                     mask: np.ndarray | None = None) -> np.ndarray:
  """int64 [K, K]: entry [t, p] counts the pixels of true class t predicted as p.

  `labels`, `predictions`: int arrays of one shape with values in [0, K);
  `mask` (bool, broadcastable to them) selects the pixels that count.
  """
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape.")
  if mask is not None:
    mask = np.broadcast_to(np.asarray(mask, bool), labels.shape)
    labels, predictions = labels[mask], predictions[mask]
  labels, predictions = labels.ravel().astype(np.int64), predictions.ravel().astype(np.int64)
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{name} hold class ids outside [0, {num_classes}).")
  counts = np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
  return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, float]:
  """{'per_pixel_acc', 'per_class_acc', 'class_iou'}, each in [0, 1], of a [K, K] confusion matrix.

  Classes absent from both the labels and the predictions leave the class
  means (they would be 0 / 0); a class that is predicted but never occurs
  counts as IoU 0. An empty matrix gives NaN.
  """
  confusion = np.asarray(confusion, np.float64)
  right = np.diag(confusion)
  true_pixels, predicted_pixels = confusion.sum(axis=1), confusion.sum(axis=0)
  union = true_pixels + predicted_pixels - right
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.where(true_pixels > 0, right / true_pixels, np.nan)
    iou = np.where(union > 0, right / union, np.nan)
    per_pixel = right.sum() / confusion.sum()

  def mean(values):
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")
  return {"per_pixel_acc": float(per_pixel), "per_class_acc": mean(recall),
          "class_iou": mean(iou)}


# ----------------------------------------------------------------------------- the network

class SegmentationNet(nn.Module):
  """A small U-Net: images [N, H, W, C] in [-1, 1] -> class logits [N, H, W, num_classes].

  Two 3x3 convolutions with ReLU per level, 2x2 max-pooling down and nearest
  upsampling back, encoder features concatenated on the way up. No
  normalisation layers, so a prediction never depends on the rest of the batch.
  H and W must be multiples of 2**levels.
  """
  num_classes: int
  levels: int
  width: int = _WIDTH

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    def block(x, features):
      for _ in range(2):
        x = nn.relu(nn.Conv(features, (3, 3))(x))
      return x

    x, skips = images, []
    for level in range(self.levels):
      x = block(x, self.width * 2 ** level)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = block(x, self.width * 2 ** self.levels)
    for level in reversed(range(self.levels)):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = block(jnp.concatenate([skips[level], x], axis=-1), self.width * 2 ** level)
    return nn.Conv(self.num_classes, (1, 1))(x)


def _levels_for(height: int, width: int) -> int:
  # Down to about 8x8, so a pixel's class is read from most of the image at any size.
  return int(np.clip(np.log2(min(height, width)) - 3, 2, 5))


class Scorer:
  """A trained SegmentationNet: `predict` maps photos to class maps."""

  def __init__(self, num_classes: int, levels: int, params: Any, info: dict[str, Any]):
    self.num_classes, self.levels = num_classes, levels
    self.params = params
    self.info = info          # what it was trained on, and how
    net = SegmentationNet(num_classes, levels)
    self._predict = jax.jit(lambda params, images: jnp.argmax(net.apply(params, images), -1))

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, C] float in [-1, 1] -> int32 class maps [N, H, W]."""
    multiple = 2 ** self.levels
    if images.shape[1] % multiple or images.shape[2] % multiple:
      raise ValueError(f"The FCN scorer takes images whose sides are multiples of {multiple}; "
                       f"got {images.shape[2]}x{images.shape[1]} (WxH). Use "
                       "--config.data.preprocess=resize_and_crop or turn off eval.fcn_score.")
    return np.asarray(self._predict(self.params, jnp.asarray(images, jnp.float32)), np.int32)


# ----------------------------------------------------------------------------- train or load

def scorer_key(config: ml_collections.ConfigDict, steps: int) -> str:
  """A file-name stem naming everything the scorer's training depends on."""
  data = config.data
  return (f"{data.source}-{data.name}-{data.direction}-{data.crop_size}px-seed{config.seed}"
          f"-{data.num_train_examples}ex-{steps}steps-v{_VERSION}")


def load_or_train_scorer(config: ml_collections.ConfigDict, directory: str, *,
                         steps: int = DEFAULT_STEPS) -> Scorer:
  """The scorer for `config`'s data, from `directory` if cached there, else trained and saved.

  Trained on up to 1,000 real target images (`real_b`) of `config.data.train_split`
  with their class maps, at the eval resolution; deterministic for the config's seed.
  """
  num_classes = _num_classes(config)
  stem = os.path.join(directory, scorer_key(config, steps))
  if os.path.exists(stem + ".msgpack"):
    with open(stem + ".json") as f:
      info = json.load(f)
    net = SegmentationNet(num_classes, info["levels"])
    with open(stem + ".msgpack", "rb") as f:
      params = flax.serialization.from_bytes(_init(net, config.model.output_nc), f.read())
    logging.info("FCN scorer loaded from %s.msgpack.", stem)
    return Scorer(num_classes, info["levels"], params, info)

  logging.info("Training the FCN scorer (%d steps, once; cached as %s.msgpack).", steps, stem)
  images, labels = _real_training_data(config)
  levels = _levels_for(*images.shape[1:3])
  net = SegmentationNet(num_classes, levels)
  params, final_loss = _train(net, _init(net, images.shape[-1]), images, labels, steps,
                              config.seed)
  info = {"key": os.path.basename(stem), "steps": steps, "train_images": len(images),
          "image_size": list(images.shape[1:3]), "num_classes": num_classes, "levels": levels,
          "final_loss": final_loss}
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    # The parameters last: their file is what marks the cache entry as complete.
    _write_atomically(stem + ".json", json.dumps(info, indent=2).encode())
    _write_atomically(stem + ".msgpack", flax.serialization.to_bytes(params))
  return Scorer(num_classes, levels, params, info)


def _init(net: SegmentationNet, channels: int) -> Any:
  size = 2 ** net.levels
  return net.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))


def has_class_maps(config: ml_collections.ConfigDict) -> bool:
  """Whether `config`'s data comes with per-pixel class maps (synthetic labels2facades)."""
  return _class_count(config) > 0


def _class_count(config: ml_collections.ConfigDict) -> int:
  if config.data.source != "synthetic":
    return 0
  from p2p_jax.datasets import synthetic   # pylint: disable=g-import-not-at-top
  return synthetic.num_classes(config.data.name)


def _num_classes(config: ml_collections.ConfigDict) -> int:
  count = _class_count(config)
  if count:
    return count
  raise ValueError(f"{config.data.source} data {config.data.name!r} has no class maps, so there "
                   "is nothing to compute an FCN-score against: set --config.eval.fcn_score=False "
                   "or use --config.data.name=labels2facades.")


def _real_training_data(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(real_b [N, H, W, C] float32 in [-1, 1], labels int32 [N, H, W]) of the train split."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.batch_size = 64
  config.data.skip_bad_images = True
  images, labels, count = [], [], 0
  # One pass over the train split as eval sees images: resized, never cropped or flipped.
  for batch in input_pipeline.create_eval_iterator(config, config.data.train_split,
                                                   process_index=0, process_count=1):
    keep = batch["mask"]
    images.append(batch["real_b"][keep])
    labels.append(batch["labels"][keep])
    count += int(keep.sum())
    if count >= _MAX_TRAIN_IMAGES:
      break
  return np.concatenate(images)[:_MAX_TRAIN_IMAGES], np.concatenate(labels)[:_MAX_TRAIN_IMAGES]


def _train(net: SegmentationNet, params: Any, images: np.ndarray, labels: np.ndarray,
           steps: int, seed: int) -> tuple[Any, float]:
  """Adam on the pixels' mean cross-entropy, random batches with random horizontal flips."""
  schedule = optax.cosine_decay_schedule(_LEARNING_RATE, max(steps, 1), alpha=0.05)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = net.apply(params, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng((seed, 7))
  batch_size = int(np.clip(_BATCH_PIXELS // (images.shape[1] * images.shape[2]), 1, len(images)))
  loss = jnp.zeros(())
  for index in range(steps):
    rows = rng.choice(len(images), batch_size, replace=False)
    batch_images, batch_labels = images[rows], labels[rows]
    flip = rng.random(batch_size) < 0.5
    batch_images[flip] = batch_images[flip, :, ::-1]
    batch_labels[flip] = batch_labels[flip, :, ::-1]
    params, opt_state, loss = step(params, opt_state, batch_images, batch_labels)
    if (index + 1) % 100 == 0:
      logging.info("FCN scorer step %d of %d: loss %.4f", index + 1, steps, float(loss))
  return params, float(loss)


def _write_atomically(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- eval hook

class FcnScore:
  """Accumulates the FCN-score of generated and of real photos over an eval pass.

  `add` takes what `evaluate.evaluate_split` sees per batch; `result` gives
  `fcn_{per_pixel_acc,per_class_acc,class_iou}` of the generated photos and
  `fcn_real_*` of the real ones, summed over all processes.
  """

  def __init__(self, scorer: Scorer):
    self._scorer = scorer
    k = scorer.num_classes
    self._confusion = {"fake": np.zeros((k, k), np.int64), "real": np.zeros((k, k), np.int64)}

  def add(self, batch: dict[str, np.ndarray], fake_b: np.ndarray, keep: np.ndarray) -> None:
    """batch: the eval iterator's ('labels' int32 [B, H, W], 'real_b'); fake_b [B, H, W, C]."""
    if "labels" not in batch:
      raise ValueError("The FCN-score needs eval batches with 'labels' (class maps).")
    for kind, images in (("fake", fake_b), ("real", batch["real_b"])):
      predictions = self._scorer.predict(images)
      self._confusion[kind] += confusion_matrix(batch["labels"], predictions,
                                                self._scorer.num_classes, keep[:, None, None])

  def result(self) -> dict[str, float]:
    out = {}
    for kind, prefix in (("fake", "fcn_"), ("real", "fcn_real_")):
      confusion = self._confusion[kind]
      if jax.process_count() > 1:
        confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
      out.update({prefix + name: value for name, value in scores_from_confusion(confusion).items()})
    return out


def create_fcn_score(config: ml_collections.ConfigDict, workdir: str) -> FcnScore | None:
  """The FCN-score hook for an eval of `workdir`, or None when `config.eval.fcn_score` is off.

  Reads `config.eval.fcn_scorer_dir` ('' = WORKDIR/fcn_scorer) and
  `config.eval.fcn_scorer_steps`; raises if the data has no class maps.
  """
  if not config.eval.get("fcn_score", False):
    return None
  directory = config.eval.get("fcn_scorer_dir", "") or os.path.join(workdir, "fcn_scorer")
  steps = int(config.eval.get("fcn_scorer_steps", DEFAULT_STEPS))
  return FcnScore(load_or_train_scorer(config, directory, steps=steps))
