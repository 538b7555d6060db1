"""The three sources of paired examples, behind one small interface.

A source is opened for one split and knows its length; `epoch_items` yields
this process's examples of one pass over it, as (index in the split, Example
or None), and `load(index)` gives the Example of an index that came as None.
Each source decides how a pass is ordered and split over processes:

- `SyntheticSource` and `FolderSource` are random access. A training epoch
  visits the split in the permutation `np.random.default_rng((seed, epoch))`,
  cut into global batches; process p of P takes the p-th contiguous slice of
  each. The items come without their images (None): the pipeline's workers
  load them in parallel.
- `TfdsSource` is a tf.data stream: process p reads every P-th record,
  shuffled per epoch in a seeded buffer, and yields decoded Examples.

An evaluation pass (`epoch=None`) is in order: random-access sources give
process p the p-th contiguous part of the split, tfds every P-th record.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import ml_collections
import numpy as np
from absl import logging

from p2p_jax.datasets.errors import DataError
from p2p_jax.datasets import folder

SOURCES = ("synthetic", "folder", "tfds")
_MAX_REPORTED = 50    # bad files listed one by one in a report


@dataclasses.dataclass(frozen=True)
class Example:
  """One decoded example: uint8 [H, W, 3] images (labels: uint8 [H, W] or None)."""
  where: str          # the file or record, for error messages
  name: str           # file name, or the synthetic index
  image_a: np.ndarray
  image_b: np.ndarray
  labels: np.ndarray | None = None


Item = tuple[int, "Example | None"]   # (index in the split, the example or None: load it)


class _RandomAccessSource:
  """A source with `load(index)`: passes are orders of indices, loaded by the pipeline."""
  _seed: int

  def __len__(self) -> int:
    raise NotImplementedError

  def load(self, index: int) -> Example:
    raise NotImplementedError

  def epoch_items(self, epoch: int | None, process_index: int, process_count: int, *,
                  batch_size: int = 1, skip_batches: int = 0) -> Iterator[Item]:
    """This process's (index, None) items of training `epoch`, or of an evaluation pass.

    Training: the seeded permutation of the epoch, cut into global batches of
    `batch_size` (the remainder dropped), `skip_batches` of them skipped; this
    process's contiguous batch_size / process_count slice of each.
    Evaluation (`epoch=None`): the p-th contiguous part of the split, in order.
    """
    if epoch is None:
      part = math.ceil(len(self) / process_count)
      first = min(len(self), process_index * part)
      yield from ((index, None) for index in range(first, min(len(self), first + part)))
      return
    order = np.random.default_rng((self._seed, epoch)).permutation(len(self))
    local = batch_size // process_count
    end = len(self) // batch_size * batch_size
    for start in range(skip_batches * batch_size + process_index * local, end, batch_size):
      yield from ((int(index), None) for index in order[start:start + local])


class SyntheticSource(_RandomAccessSource):
  """Random access to a synthetic task, rendered at crop_size x crop_size."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    from p2p_jax.datasets import synthetic   # numpy only; imported with its source
    if config.data.name not in synthetic.TASKS:
      raise ValueError(f"config.data.name={config.data.name!r} is not a synthetic task; "
                       f"choose one of {', '.join(synthetic.TASKS)}.")
    self._render = synthetic.render_pair
    self._task, self._split = config.data.name, split
    self._seed, self._size = config.seed, config.data.crop_size
    train = split == config.data.train_split
    self._count = config.data.num_train_examples if train else config.data.num_eval_examples
    self.has_labels = synthetic.num_classes(self._task) > 0
    if self._count <= 0:
      field = "num_train_examples" if train else "num_eval_examples"
      raise ValueError(f"Synthetic split {split!r} is empty: config.data.{field}={self._count}.")
    self.load(0)   # fails now, with the renderer's message, on an unknown split or bad seed

  def __len__(self) -> int:
    return self._count

  def load(self, index: int) -> Example:
    pair = self._render(self._task, index, split=self._split, seed=self._seed, size=self._size)
    return Example(where=f"synthetic {self._task}/{self._split} example {index}",
                   name=f"{index:06d}", image_a=pair["image_a"], image_b=pair["image_b"],
                   labels=pair.get("labels"))


class FolderSource(_RandomAccessSource):
  """Random access to the pairs of one split of an image folder."""
  has_labels = False

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    self._seed = config.seed
    self._pairs, unpaired = folder.list_pairs(config.data.dir, split)
    if unpaired and not config.data.skip_bad_images:
      more = f" ({len(unpaired) - 1} more unpaired images)" if len(unpaired) > 1 else ""
      raise DataError(unpaired[0].path, unpaired[0].reason + more + "; or set "
                      "--config.data.skip_bad_images=True to leave unpaired images out")
    if unpaired:
      report_skipped(unpaired, f"unpaired images in split {split!r} left out")
    if not self._pairs:
      raise DataError(os.path.join(config.data.dir, split), "no image has a partner in A/ and B/")

  def __len__(self) -> int:
    return len(self._pairs)

  def load(self, index: int) -> Example:
    pair = self._pairs[index]
    image_a, image_b = folder.load_pair(pair)
    return Example(where=pair.path_a, name=pair.name, image_a=image_a, image_b=image_b)


class TfdsSource:
  """A split of the `pix2pix` TFDS builder, read as a tf.data stream."""
  has_labels = False
  _sizes: dict[tuple[str, str, str], int] = {}   # counting a split can take a full pass

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    from p2p_jax import devices
    devices.hide_accelerators_from_tensorflow()   # before TensorFlow's first use
    import tensorflow as tf
    from p2p_jax.datasets import pix2pix_tfds   # loads TFDS only when this source is used
    self._seed, self._shuffle_buffer = config.seed, config.data.shuffle_buffer
    self._key = (config.data.name, split, config.data.tfds_data_dir)
    self._where = f"tfds pix2pix/{config.data.name}, split {split!r}"
    try:
      self._dataset = pix2pix_tfds.load_split(config.data.name, split,
                                              config.data.tfds_data_dir or None,
                                              manual_dir=config.data.tfds_manual_dir or None)
    except tf.errors.OpError as error:
      raise DataError(self._where, _first_line(error.message)) from None

  def __len__(self) -> int:
    if self._key not in self._sizes:
      count = int(self._dataset.cardinality())
      if count < 0:   # unknown: count the records once
        count = int(self._dataset.reduce(np.int64(0), lambda total, _: total + 1))
      self._sizes[self._key] = count
    return self._sizes[self._key]

  def load(self, index: int) -> Example:
    raise TypeError("A tfds source is a stream: its items come with their examples.")

  def epoch_items(self, epoch: int | None, process_index: int, process_count: int, *,
                  batch_size: int = 1, skip_batches: int = 0) -> Iterator[Item]:
    """This process's (index, Example) items of training `epoch`, or of an evaluation pass.

    Training: every P-th record from the p-th, shuffled in a buffer of
    data.shuffle_buffer with a seed fixed by (seed, epoch), as many as
    len // batch_size local batches of batch_size / process_count take, the
    first `skip_batches` of them skipped. Evaluation (`epoch=None`): every P-th
    record, in order.
    """
    if epoch is None:
      yield from self.stream(process_index, process_count)
      return
    local = batch_size // process_count
    shuffle_seed = int(np.random.default_rng((self._seed, epoch)).integers(2 ** 31))
    yield from self.stream(process_index, process_count, shuffle_seed=shuffle_seed,
                           shuffle_buffer=self._shuffle_buffer, skip=skip_batches * local,
                           take=len(self) // batch_size * local)

  def stream(self, process_index: int, process_count: int, *, shuffle_seed: int | None = None,
             shuffle_buffer: int = 1, skip: int = 0, take: int = -1
             ) -> Iterator[tuple[int, Example]]:
    """(index in the split, example) of this process's records: every P-th, from the p-th.

    With `shuffle_seed`, the records are shuffled (in a buffer of `shuffle_buffer`)
    in an order fixed by the seed; `take`, then `skip`, apply after the shuffle.
    """
    import tensorflow as tf
    dataset = self._dataset.shard(process_count, process_index).enumerate()
    if shuffle_seed is not None:
      dataset = dataset.shuffle(max(1, shuffle_buffer), seed=shuffle_seed,
                                reshuffle_each_iteration=False)
    dataset = dataset.take(take).skip(skip).prefetch(tf.data.AUTOTUNE)
    op_error = tf.errors.OpError   # held here: an unclosed stream is closed at exit, after tf
    try:
      for position, features in dataset.as_numpy_iterator():
        name = features["file_name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        yield int(position) * process_count + process_index, Example(
            where=f"{self._where}, {name}", name=name, image_a=features["image_a"],
            image_b=features["image_b"])
    except op_error as error:
      raise DataError(self._where, _first_line(error.message)) from None


Source = SyntheticSource | FolderSource | TfdsSource


def open_source(config: ml_collections.ConfigDict, split: str) -> Source:
  """The configured source (`config.data.source`) for `split`; raises if it cannot be read."""
  sources = {"synthetic": SyntheticSource, "folder": FolderSource, "tfds": TfdsSource}
  if config.data.source not in sources:
    raise ValueError(f"config.data.source={config.data.source!r} is not one of {SOURCES}.")
  return sources[config.data.source](config, split)


def report_skipped(errors: list[DataError], what: str) -> None:
  """Logs, as one warning, how many inputs were left out, which, and why."""
  listed = "\n  ".join(str(error) for error in errors[:_MAX_REPORTED])
  more = f"\n  ... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
  logging.warning("%d %s:\n  %s%s", len(errors), what, listed, more)


def _first_line(message: str) -> str:
  return (message or "").strip().splitlines()[0] if (message or "").strip() else "read error"
