"""The three sources of paired examples, behind one small interface.

A source is opened for one split and knows its length. Its pairs reach the
input pipeline's tf.data graph in one of two ways:

- `SyntheticSource` and `FolderSource` are random access: `decode(index)` is a
  TF function from an index in the split to the example's uint8 images, which
  the pipeline maps over the indices of an epoch. Folder images are read and
  decoded by TensorFlow (JPEG with the accurate integer DCT, as libjpeg
  decodes them for PIL; PNG at 16 bits and scaled as `folder.read_image`
  scales); files TensorFlow cannot decode (TIFF, WebP, PPM, and any it fails
  on, such as CMYK JPEGs) go through PIL, in `tf.numpy_function`. Synthetic
  pairs are rendered by numpy, in `tf.numpy_function`.
- `TfdsSource` is a tf.data stream of decoded records: `records(p, P)` gives
  process p of P every P-th record, from the p-th.

`load(index)` decodes one example with PIL and numpy, outside TensorFlow: the
pipeline uses it to name the file behind a failed decode, and to check the
first example when a split is opened.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

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


class _RandomAccessSource:
  """A source with `decode(index)` in TensorFlow and `load(index)` outside it."""
  random_access = True
  has_labels = False
  description: str     # what the split is, for messages and the cache's key

  def __len__(self) -> int:
    raise NotImplementedError

  def load(self, index: int) -> Example:
    raise NotImplementedError

  def names(self) -> list[str]:
    """Every example's name, in index order."""
    raise NotImplementedError

  def signature(self) -> list[Any]:
    """What the cache's key is made of: the examples' names (and files)."""
    return self.names()

  def size(self, index: int) -> tuple[int, int] | None:
    """(H, W) of example `index`'s A image from its header, or None if unreadable."""
    return tuple(self.load(index).image_a.shape[:2])

  def pil_only(self) -> np.ndarray:
    """bool [N]: the examples only `load` can decode (none, unless a source says otherwise)."""
    return np.zeros(len(self), bool)

  def decode(self, index: Any, use_pil: Any) -> dict[str, Any]:
    """TF: {'image_a', 'image_b': uint8 [H, W, 3]} (and 'labels' uint8 [H, W]) of `index`.

    `use_pil` (a bool tensor) routes the example through `load`, in
    `tf.numpy_function`, instead of TensorFlow's decoders.
    """
    raise NotImplementedError

  def _numpy_decode(self, index: Any) -> dict[str, Any]:
    """`load(index)` inside the TF graph (PIL and numpy run in tf.numpy_function)."""
    tf = tensorflow()
    outputs = (tf.uint8,) * (3 if self.has_labels else 2)

    def load(i):
      example = self.load(int(i))
      arrays = (example.image_a, example.image_b)
      return arrays + ((example.labels,) if self.has_labels else ())

    arrays = tf.numpy_function(load, [index], outputs, stateful=False)
    decoded = {"image_a": arrays[0], "image_b": arrays[1]}
    decoded["image_a"].set_shape([None, None, 3])
    decoded["image_b"].set_shape([None, None, 3])
    if self.has_labels:
      decoded["labels"] = arrays[2]
      decoded["labels"].set_shape([None, None])
    return decoded


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
    self.description = f"synthetic {self._task}/{split} (seed {self._seed}, {self._size} px)"
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

  def names(self) -> list[str]:
    return [f"{index:06d}" for index in range(self._count)]

  def size(self, index: int) -> tuple[int, int] | None:
    return (self._size, self._size)

  def decode(self, index: Any, use_pil: Any) -> dict[str, Any]:
    return self._numpy_decode(index)   # numpy draws the pairs


class FolderSource(_RandomAccessSource):
  """Random access to the pairs of one split of an image folder."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    self.description = f"folder {os.path.abspath(config.data.dir)}, split {split!r}"
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

  def names(self) -> list[str]:
    return [pair.name for pair in self._pairs]

  def signature(self) -> list[Any]:
    """(name, bytes, mtime) of every file: changes whenever a file does (the cache's key)."""
    def stat(path):
      if path is None:
        return None
      info = os.stat(path)
      return [info.st_size, info.st_mtime_ns]
    return [[pair.name, stat(pair.path_a), stat(pair.path_b)] for pair in self._pairs]

  def size(self, index: int) -> tuple[int, int] | None:
    pair = self._pairs[index]
    try:
      with Image.open(pair.path_a) as image:   # the header only
        width, height = image.size
    except Exception:  # pylint: disable=broad-except  # the decode will name what is wrong
      return None
    return (height, width // 2 if pair.path_b is None else width)

  def pil_only(self) -> np.ndarray:
    """bool [N]: the examples with a file TensorFlow has no decoder for."""
    def foreign(path):
      return path is not None and not path.lower().endswith(folder.TF_EXTENSIONS)
    return np.array([foreign(pair.path_a) or foreign(pair.path_b) for pair in self._pairs],
                    bool)

  def decode(self, index: Any, use_pil: Any) -> dict[str, Any]:
    tf = tensorflow()
    paths_a = tf.constant([pair.path_a for pair in self._pairs])
    aligned = self._pairs[0].path_b is None   # one layout per split

    def by_tensorflow():
      if aligned:
        image = folder.tf_decode(tf.io.read_file(tf.gather(paths_a, index)))
        tf.debugging.assert_equal(tf.shape(image)[1] % 2, 0, message="an odd width")
        half = tf.shape(image)[1] // 2
        return {"image_a": image[:, :half], "image_b": image[:, half:]}
      paths_b = tf.constant([pair.path_b for pair in self._pairs])
      image_a = folder.tf_decode(tf.io.read_file(tf.gather(paths_a, index)))
      image_b = folder.tf_decode(tf.io.read_file(tf.gather(paths_b, index)))
      tf.debugging.assert_equal(tf.shape(image_a), tf.shape(image_b),
                                message="A and B differ in size")
      return {"image_a": image_a, "image_b": image_b}

    return tf.cond(use_pil, lambda: self._numpy_decode(index), by_tensorflow)


class TfdsSource:
  """A split of the `pix2pix` TFDS builder, read as a tf.data stream."""
  random_access = False
  has_labels = False
  _sizes: dict[tuple[str, str, str], int] = {}   # counting a split can take a full pass

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    tf = tensorflow()
    from p2p_jax.datasets import pix2pix_tfds   # loads TFDS only when this source is used
    self._seed, self._shuffle_buffer = config.seed, config.data.shuffle_buffer
    self._key = (config.data.name, split, config.data.tfds_data_dir)
    self._where = f"tfds pix2pix/{config.data.name}, split {split!r}"
    self.description = f"{self._where} in {config.data.tfds_data_dir or 'the TFDS default'}"
    try:
      self._dataset = pix2pix_tfds.load_split(config.data.name, split,
                                              config.data.tfds_data_dir or None,
                                              manual_dir=config.data.tfds_manual_dir or None)
    except tf.errors.OpError as error:
      raise DataError(self._where, first_line(error.message)) from None

  def __len__(self) -> int:
    if self._key not in self._sizes:
      count = int(self._dataset.cardinality())
      if count < 0:   # unknown: count the records once
        count = int(self._dataset.reduce(np.int64(0), lambda total, _: total + 1))
      self._sizes[self._key] = count
    return self._sizes[self._key]

  @property
  def where(self) -> str:
    return self._where

  def records(self, process_index: int, process_count: int) -> Any:
    """tf.data: {'index' int64, 'image_a', 'image_b' uint8 [H, W, 3], 'name' string} of
    this process's records, every P-th from the p-th, in file order."""
    tf = tensorflow()
    dataset = self._dataset.shard(process_count, process_index).enumerate()
    return dataset.map(lambda position, features: {
        "index": position * process_count + process_index,
        "image_a": features["image_a"], "image_b": features["image_b"],
        "name": features["file_name"]}, num_parallel_calls=tf.data.AUTOTUNE)

  def first(self) -> Example:
    """The split's first record, decoded."""
    tf = tensorflow()
    try:
      features = next(iter(self._dataset.take(1).as_numpy_iterator()))
    except StopIteration:
      raise DataError(self._where, "is empty") from None
    except tf.errors.OpError as error:
      raise DataError(self._where, first_line(error.message)) from None
    name = features["file_name"].decode()
    return Example(where=f"{self._where}, {name}", name=name, image_a=features["image_a"],
                   image_b=features["image_b"])


Source = SyntheticSource | FolderSource | TfdsSource


def tensorflow():
  """The `tensorflow` module, imported after hiding the accelerators from it."""
  from p2p_jax import devices
  devices.hide_accelerators_from_tensorflow()   # before TensorFlow's first use
  import tensorflow as tf
  return tf


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


def first_line(message: str) -> str:
  """A TensorFlow error's first line: its message without the graph's traceback."""
  return (message or "").strip().splitlines()[0] if (message or "").strip() else "read error"
