"""Input pipeline: paired images from every source through tf.data, uint8 to the devices.

Sources (`config.data.source`):
  synthetic  rendered on the fly by `datasets.synthetic` at crop_size x crop_size;
             num_train_examples / num_eval_examples examples per split.
  folder     `datasets.folder`: DIR/{train,val,test}/ of A|B images, or DIR/SPLIT/{A,B}/.
  tfds       the `pix2pix` TFDS builder (`datasets.pix2pix_tfds`).

The host reads and decodes, in parallel tf.data maps (`datasets.sources` says
how each source decodes), and sends every pair as uint8 at one size per split,
the size of its first example (the wire size). An image of another size is
resized to it on the host (TensorFlow's antialiased bicubic) and counted in a
warning; nothing else is resized there. The rest of the paper's preprocessing,
the bicubic resize to load_size, the random crop and flip and the scaling to
[-1, 1], runs on the devices inside the compiled training step
(`Preprocess.train`, which `step.pmap_train_step` calls), and eval batches are
resized on the device too (`Preprocess.eval`). A uint8 pair is a quarter of the
bytes of a float32 one.

Order and the per-host split. Training epoch e visits the split in a
permutation fixed by (seed, e), a keyed Feistel bijection evaluated per
position in the TF graph, cut into global batches of `config.batch_size`;
process p of P takes the p-th contiguous slice of each. So P processes
together see, step for step, exactly the global batch one process with all the
devices would see, and no example twice in an epoch. The examples after the
last full global batch are dropped; the permutation changes every epoch, so a
different remainder is dropped each time. The tfds source is a stream: process
p reads every P-th record, shuffled per epoch in a buffer seeded by (seed, e);
reproducible and resumable the same way, but its batches depend on P. Crop
offsets and flips are drawn on the device from (seed, e, index): a run resumed
at `start_step` sees what an unbroken run saw.

Bad input. A file TensorFlow cannot decode stops the tf.data iterator at its
batch; the pipeline then reads that batch's files with PIL (`Source.load`). A
file PIL reads too (a CMYK JPEG, say) is decoded with PIL from then on; one it
cannot read raises a `DataError` naming it, or with `data.skip_bad_images` is
replaced by a good row of its batch and reported once per epoch. Either way the
pipeline is rebuilt at the batch it stopped at, so nothing is lost or repeated.

`data.cache`: "memory", or a file path, keeps the decoded uint8 pairs of the
train split once an epoch has read them; later epochs gather their batches
from it, in the order they would have had (tfds: the same seeded shuffle, of
the record indices alone). A file cache is written beside its path (one per
process when there are several) and renamed into place when complete, with a
key of the split's files and size, so a run killed while filling it, or a
changed dataset, starts it afresh.

`data.service_address`: batches are made by the workers of a tf.data service
(`python -m p2p_jax.data_service`) instead of by this host; each batch carries
its step, and this host puts them back in step order, so the batches are the
ones it would have made itself.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from p2p_jax import devices
from p2p_jax import hardware
from p2p_jax.datasets import sources
from p2p_jax.datasets.errors import DataError
from p2p_jax.datasets.preprocess import Preprocess

_MAX_STEP = 2 ** 62        # "forever": the training stream is cut by the loop, not by the data
_KEY_MASK = 0x7FFFFFFF
_MIN_GROUP_ROWS = 8        # rows per tf.data element at least (several small batches in one)
_MAX_WAITING = 1024        # batches a service may deliver ahead of a missing one
_SERVICE_AHEAD = 64        # steps searched for a bad file when the service reports one
_SIZE_SAMPLE = 64          # examples whose sizes choose a split's wire size


@dataclasses.dataclass(frozen=True)
class _HostPlan:
  process_index: int
  process_count: int
  global_batch: int
  local_batch: int     # this process's contiguous slice of each global batch


def create_train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0,
                          process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Endless training batches, placed on this process's devices.

  Yields {'image_a', 'image_b': uint8 [local_devices, per_device_batch, H, W, 3]
  (the source's A and B at the split's wire size), 'epoch', 'index': int32
  [local_devices, per_device_batch]}, sharded over `jax.local_devices()` on the
  mesh axis 'batch' (as `devices.shard`), `config.data.prefetch_to_device`
  batches ahead. `Preprocess.train` makes the networks' inputs from them. The
  n-th batch is global step `start_step + n`. `process_index`/`process_count`
  default to JAX's.
  """
  host_batches = _train_host_batches(config, start_step, process_index, process_count)
  return _prefetch_to_devices(host_batches, config.data.prefetch_to_device)


def create_eval_iterator(config: ml_collections.ConfigDict, split: str | None = None, *,
                         process_index: int | None = None, process_count: int | None = None
                         ) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over `split` (default `config.data.eval_split`), as host arrays.

  Process p of P reads the p-th contiguous part of the split (tfds: every
  P-th record). Every process yields the same number of batches of
  `config.eval.batch_size`, the last ones padded:
    'real_a': float32 [B, H, W, input_nc] in [-1, 1]; 'real_b': [B, H, W, output_nc];
    'name':   str [B], the file name (synthetic: the index), '' for padding;
    'mask':   bool [B], False for padding rows and skipped bad images;
    'labels': int32 [B, H, W] class ids, only for sources with class maps.
  The uint8 pairs are resized on the default device (`Preprocess.eval`): to
  crop_size x crop_size (other modes: see `datasets.preprocess`), never cropped
  or flipped.
  """
  split = config.data.eval_split if split is None else split
  prep = Preprocess.from_config(config)
  source = sources.open_source(config, split)
  process_index, process_count = _process(process_index, process_count)
  batch_size = config.eval.batch_size
  if batch_size <= 0:
    raise ValueError(f"config.eval.batch_size={batch_size} must be positive.")
  reader = _Reader(config, source, split, prep, train=False)
  resized, _ = prep.sizes(reader.first.where, reader.wire, train=False)
  # Every process makes as many batches as the largest part needs (padded).
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  return _eval_batches(reader, reader.eval_rows(process_index, process_count), num_batches,
                       batch_size, resized, _eval_function(prep))


def _eval_batches(reader: "_Reader", rows: Iterator[dict[str, Any]], num_batches: int,
                  batch_size: int, resized: tuple[int, int], to_float: Any
                  ) -> Iterator[dict[str, np.ndarray]]:
  skipped = []
  for number in range(num_batches):
    chunk = list(itertools.islice(rows, batch_size))
    batch = _eval_batch(chunk, batch_size, reader, resized, skipped)
    for key, images in zip(("real_a", "real_b"),
                           to_float(batch.pop("image_a"), batch.pop("image_b"))):
      batch[key] = np.array(images)
      batch[key][~batch["mask"]] = 0      # padding and skipped rows hold zeros
    if number == num_batches - 1 and skipped:
      sources.report_skipped(skipped,
                             f"bad images skipped (masked out) in split {reader.split!r}")
    yield batch


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` of the configured source (folder: pairs that have both images)."""
  return len(sources.open_source(config, split))


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Global steps in one epoch: train examples // config.batch_size.

  The remainder (fewer than one global batch) is dropped each epoch; which
  examples it holds changes from epoch to epoch with the shuffle.
  """
  return _steps_per_epoch(config, num_examples(config, config.data.train_split))


def pipeline_throughput(config: ml_collections.ConfigDict, num_batches: int) -> float:
  """Training pairs per second the host pipeline alone delivers (one process, no devices).

  The first batch (start-up) is not timed; with `data.cache`, nor is the first
  epoch, which fills the cache: the rate is that of the epochs after it.
  """
  batches = _train_host_batches(config, 0, 0, 1)
  try:
    untimed = steps_per_epoch(config) + 1 if config.data.cache else 1   # the +1 fills it
    for _ in range(untimed):
      next(batches)
    start, count = time.perf_counter(), 0
    for batch in itertools.islice(batches, num_batches):
      count += len(batch["image_a"])
    return count / (time.perf_counter() - start)
  finally:
    batches.close()


def decode_throughput(config: ml_collections.ConfigDict, num_pairs: int) -> float:
  """Pairs per second tf.data reaches when it only decodes the train split (the ceiling).

  The same decoders as training, in one parallel map, with nothing after them:
  no size check, no batching, no copy to numpy beyond the iterator's.
  """
  tf = sources.tensorflow()
  source = sources.open_source(config, config.data.train_split)
  if source.random_access:
    pil = tf.constant(source.pil_only())
    dataset = tf.data.Dataset.range(len(source)).repeat().map(
        lambda index: source.decode(index, tf.gather(pil, index)),
        num_parallel_calls=tf.data.AUTOTUNE)
  else:
    dataset = source.records(0, 1).repeat()
  dataset = dataset.map(lambda row: tf.shape(row["image_a"])).prefetch(tf.data.AUTOTUNE)
  iterator = iter(dataset)
  for _ in range(min(32, num_pairs)):   # start-up: threads, first files
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_pairs):
    next(iterator)
  return num_pairs / (time.perf_counter() - start)


def _train_host_batches(config: ml_collections.ConfigDict, start_step: int,
                        process_index: int | None, process_count: int | None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Checks everything now, then returns the lazy stream of host batches [local_batch, ...]."""
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  plan = _host_plan(config, *_process(process_index, process_count))
  prep = Preprocess.from_config(config)
  source = sources.open_source(config, config.data.train_split)
  steps = _steps_per_epoch(config, len(source))
  reader = _Reader(config, source, config.data.train_split, prep, train=True)
  prep.sizes(reader.first.where, reader.wire, train=True)
  cache = _Cache.open(config, reader, plan) if config.data.cache else None
  return reader.train_batches(plan, start_step, steps, cache)


class _Reader:
  """One split's pairs through tf.data: decode, fit to the wire size, route around bad files."""

  def __init__(self, config: ml_collections.ConfigDict, source: sources.Source, split: str,
               prep: Preprocess, train: bool):
    self.source, self.split = source, split
    self.skip = config.data.skip_bad_images
    self.seed = int(config.seed) & _KEY_MASK
    self.shuffle_buffer = config.data.shuffle_buffer
    self.service = config.data.service_address
    if self.service and not source.random_access:
      raise ValueError("config.data.service_address is set, but the tfds source is a stream "
                       "the service cannot split by step; use --config.data.source=folder "
                       "with the split's images, or unset --config.data.service_address.")
    self.errors: dict[int, DataError] = {}
    if source.random_access:
      self.bad = np.zeros(len(source), bool)
      self.pil = source.pil_only()
      self.first = self._first_good()
    else:
      self.first = source.first()
    self.wire = self._wire_size(prep.fixed_size(train))

  def _wire_size(self, fixed: tuple[int, int] | None) -> tuple[int, int]:
    """The one size this split's pairs cross to the devices at.

    The first example's size, when a sample of the split shares it (the device
    resizes, as PIL would). When the sample's sizes differ: the size preprocessing
    resizes every image to, if there is one (each image is then resized once, on
    the host), else the sample's most common size.
    """
    first = tuple(self.first.image_a.shape[:2])
    if not self.source.random_access:
      return first          # the official TFDS datasets each have one size
    count = len(self.source)
    sample = np.unique(np.linspace(0, count - 1, min(count, _SIZE_SAMPLE)).astype(int))
    sizes = [size for size in map(self.source.size, sample) if size is not None]
    if all(size == first for size in sizes):
      return first
    if fixed is not None:
      wire = fixed
    else:
      wire = max(set(sizes), key=sizes.count)
    logging.warning("Split %r holds images of several sizes (%s, ...): they cross to the "
                    "devices at %dx%d (WxH), resized on the host where they differ.", self.split,
                    ", ".join(f"{w}x{h}" for h, w in sorted(set(sizes))[:3]), wire[1], wire[0])
    return tuple(wire)

  def _first_good(self) -> sources.Example:
    for index in range(len(self.source)):
      try:
        return self.source.load(index)
      except DataError as error:
        self._mark_bad(index, error)
    raise DataError(self.source.description, "has no image that can be read")

  def _mark_bad(self, index: int, error: DataError) -> None:
    if not self.skip:
      raise _with_skip_hint(error) from None
    self.bad[index] = True
    self.errors[index] = error

  # -- the graph ---------------------------------------------------------------------------

  def _decode_row(self, index: Any, bad: Any, pil: Any) -> dict[str, Any]:
    """TF: {'image_a', 'image_b' uint8 at the wire size, 'resized' bool, ['labels']} of `index`."""
    tf = sources.tensorflow()

    def blank():
      row = {"image_a": tf.zeros(self.wire + (3,), tf.uint8),
             "image_b": tf.zeros(self.wire + (3,), tf.uint8), "resized": tf.constant(False)}
      if self.source.has_labels:
        row["labels"] = tf.zeros(self.wire, tf.uint8)
      return row

    def decoded():
      return self._fit(self.source.decode(index, tf.gather(pil, index)))

    return tf.cond(tf.gather(bad, index), blank, decoded)

  def _fit(self, pair: dict[str, Any]) -> dict[str, Any]:
    """TF: the pair at the wire size; 'resized' says whether it had to be resized."""
    tf = sources.tensorflow()
    height, width = self.wire
    off_size = tf.reduce_any(tf.shape(pair["image_a"])[:2] != tf.constant([height, width]))

    def resized(image, method):
      image = tf.image.resize(image, (height, width), method=method, antialias=True)
      return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    row = {"resized": off_size}
    for key in ("image_a", "image_b"):
      image = pair[key]
      row[key] = tf.cond(off_size, lambda image=image: resized(image, "bicubic"),
                         lambda image=image: image)
      row[key].set_shape((height, width, 3))
    if "labels" in pair:
      labels = pair["labels"][..., None]
      labels = tf.cond(off_size, lambda: resized(labels, "nearest"), lambda: labels)
      row["labels"] = tf.reshape(labels, (height, width))
    return row

  def _index_fn(self, plan: _HostPlan, steps: int):
    """TF (step, row) -> (index in the split, epoch) of this process's row of a global step."""
    tf = sources.tensorflow()
    count, local = len(self.source), plan.local_batch

    def index_of(step, row):
      epoch = step // steps
      position = (step % steps) * plan.global_batch + plan.process_index * local + row
      return _permuted(tf, position, count, self.seed, epoch), epoch
    return index_of

  def train_dataset(self, plan: _HostPlan, start_step: int, steps: int, decode: bool = True):
    """tf.data: one element per global step from `start_step`, this process's rows of it.

    {'image_a', 'image_b' [local, H, W, 3] uint8, 'index', 'epoch' int32 [local],
    'step' int64 [local], 'resized' bool [local]}; with `decode=False` only the
    indices. Each step's rows are made together (an interleave with blocks of
    one step), so a tf.data service can split the stream by steps.
    """
    tf = sources.tensorflow()
    local, index_of = plan.local_batch, self._index_fn(plan, steps)
    bad, pil = tf.constant(self.bad), tf.constant(self.pil)

    def row(step, number):
      index, epoch = index_of(step, number)
      out = {"index": tf.cast(index, tf.int32), "epoch": tf.cast(epoch, tf.int32), "step": step}
      if decode:
        out.update(self._decode_row(index, bad, pil))
        out.pop("labels", None)      # class maps are for scores, not for training
      return out

    def rows_of(step):
      return tf.data.Dataset.range(local).map(lambda number: row(step, number),
                                              num_parallel_calls=tf.data.AUTOTUNE)

    if self.service and decode:
      # Each step's rows made together (an interleave in blocks of one step), so the
      # service can hand whole steps to its workers.
      cycle = max(1, math.ceil(2 * hardware.num_cores() / local))
      dataset = tf.data.Dataset.range(start_step, _MAX_STEP).interleave(
          rows_of, cycle_length=cycle, block_length=local, num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True).batch(local, drop_remainder=True)
      return dataset.apply(tf.data.experimental.service.distribute(
          processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
          service=self.service)).batch(1).prefetch(tf.data.AUTOTUNE)
    dataset = tf.data.Dataset.range(start_step * local, _MAX_STEP).map(
        lambda k: row(k // local, k % local), num_parallel_calls=tf.data.AUTOTUNE)
    # Several steps per element when batches are small: fewer trips through the iterator.
    group = max(1, _MIN_GROUP_ROWS // local)
    dataset = dataset.batch(local, drop_remainder=True).batch(group, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)

  def _tfds_train_dataset(self, plan: _HostPlan, start_step: int, steps: int,
                          decode: bool = True):
    """As `train_dataset`, for the tfds stream. With `decode=False`, the same shuffle of
    this process's record indices alone: a seeded shuffle orders any stream of one length
    alike, so these are the indices of the records the decoded stream yields."""
    tf = sources.tensorflow()
    local, p, count = plan.local_batch, plan.process_index, plan.process_count
    first_epoch, first_step = divmod(start_step, steps)
    if decode:
      records = self.source.records(p, count)
    else:
      mine = len(range(p, len(self.source), count))
      records = tf.data.Dataset.range(mine).map(lambda position: {"index": position * count + p})

    def epoch_rows(epoch):
      seed = (self.seed * 1_000_003 + epoch) & _KEY_MASK
      skip = tf.where(epoch == first_epoch, tf.constant(first_step * local, tf.int64),
                      tf.constant(0, tf.int64))
      rows = records.shuffle(max(1, self.shuffle_buffer), seed=seed,
                             reshuffle_each_iteration=False)
      rows = rows.take(steps * local).enumerate().skip(skip)

      def row(number, record):
        out = {"index": tf.cast(record["index"], tf.int32), "epoch": tf.cast(epoch, tf.int32),
               "step": epoch * steps + number // local}
        if decode:
          out.update(self._fit(record))
        return out
      return rows.map(row)

    dataset = tf.data.Dataset.range(first_epoch, _MAX_STEP).flat_map(epoch_rows)
    group = max(1, _MIN_GROUP_ROWS // local)
    return dataset.batch(local, drop_remainder=True).batch(group).prefetch(tf.data.AUTOTUNE)

  def _dataset(self, plan: _HostPlan, start_step: int, steps: int, decode: bool = True):
    if self.source.random_access:
      return self.train_dataset(plan, start_step, steps, decode)
    return self._tfds_train_dataset(plan, start_step, steps, decode)

  # -- the host side -----------------------------------------------------------------------

  def train_batches(self, plan: _HostPlan, start_step: int, steps: int,
                    cache: "_Cache | None") -> Iterator[dict[str, np.ndarray]]:
    """Host batches from `start_step` on, forever; rebuilt after a file is found bad."""
    op_error = sources.tensorflow().errors.OpError   # held: a generator may close after tf is gone
    step, epoch_errors, resized = start_step, {}, 0
    while True:
      if cache is not None and cache.complete:
        yield from self._cached_batches(plan, step, steps, cache)
        return
      dataset = self._dataset(plan, step, steps)
      try:
        for batch in _in_step_order(_ungrouped(dataset.as_numpy_iterator()), step):
          batch = self._replace_bad_rows(batch, epoch_errors)
          resized += int(batch.pop("resized").sum())
          if cache is not None:
            cache.put(batch)
          last = step % steps == steps - 1
          epoch = step // steps
          step += 1
          yield batch
          if last:
            self._report_epoch(epoch, epoch_errors, resized)
            epoch_errors, resized = {}, 0
            if cache is not None and cache.fill(self, plan):
              break                # complete: the next epochs come from it
      except op_error as error:
        if not self.source.random_access:
          raise DataError(self.source.where, sources.first_line(error.message)) from None
        # The failed batch is the next one; with the service, any of those in flight.
        ahead = _SERVICE_AHEAD if self.service else 1
        rows = self._dataset(plan, step, steps, decode=False).take(ahead)
        self.diagnose(np.concatenate([group["index"].ravel()
                                      for group in rows.as_numpy_iterator()]), error)

  def _cached_batches(self, plan: _HostPlan, step: int, steps: int, cache: "_Cache"
                      ) -> Iterator[dict[str, np.ndarray]]:
    epoch_errors = {}
    for rows in _ungrouped(self._dataset(plan, step, steps, decode=False).as_numpy_iterator()):
      image_a, image_b = cache.get(rows["index"])
      batch = {"image_a": image_a, "image_b": image_b, "index": rows["index"],
               "epoch": rows["epoch"], "step": rows["step"]}
      yield self._replace_bad_rows(batch, epoch_errors)
      if step % steps == steps - 1:
        self._report_epoch(step // steps, epoch_errors, 0)
        epoch_errors = {}
      step += 1

  def _replace_bad_rows(self, batch: dict[str, np.ndarray], epoch_errors: dict[int, DataError]
                        ) -> dict[str, np.ndarray]:
    """The batch without 'step'; a bad row takes a copy of a good row of the same batch.

    Every process keeps its batch size and its number of steps, which the
    collective step needs.
    """
    del batch["step"]
    bad = self.bad[batch["index"]] if self.source.random_access else np.zeros(0, bool)
    if not bad.any():
      return batch
    for index in batch["index"][bad]:
      epoch_errors[int(index)] = self.errors[int(index)]
    good = np.flatnonzero(~bad)
    if not len(good):
      error = self.errors[int(batch["index"][0])]
      raise DataError(error.path, f"{error.reason}; every image of a batch is bad, so there is "
                      "none to stand in for them")
    stand_ins = good[np.arange(int(bad.sum())) % len(good)]
    batch = {key: value.copy() for key, value in batch.items()}
    for value in batch.values():
      value[np.flatnonzero(bad)] = value[stand_ins]
    return batch

  def _report_epoch(self, epoch: int, errors: dict[int, DataError], resized: int) -> None:
    if errors:
      sources.report_skipped(
          list(errors.values()), f"bad images skipped in epoch {epoch} of split {self.split!r}; "
          "each was replaced by another image of its batch")
    if resized:
      logging.warning("Epoch %d of split %r: %d image(s) were not %dx%d (WxH), the size of "
                      "the split's first image, and were resized to it on the host.", epoch,
                      self.split, resized, self.wire[1], self.wire[0])

  def diagnose(self, indices: np.ndarray, error: Exception) -> None:
    """Finds the examples among `indices` behind a failed decode: bad ones, or PIL-only ones.

    Raises DataError for a bad file (unless skipped), and when no example of
    the batch explains the failure.
    """
    tf = sources.tensorflow()
    found = False
    for index in sorted(set(int(i) for i in indices)):
      if self.bad[index]:
        continue
      try:
        self.source.load(index)
      except DataError as bad:
        self._mark_bad(index, bad)
        found = True
        continue
      if not self.pil[index]:
        try:
          self._fit(self.source.decode(tf.constant(index, tf.int64), tf.constant(False)))
        except tf.errors.OpError as tf_error:
          logging.info("Decoding example %d of %s with PIL: TensorFlow cannot (%s).", index,
                       self.source.description, sources.first_line(tf_error.message))
          self.pil[index] = True
          found = True
    if not found:
      raise DataError(self.source.description, "could not be read: "
                      + sources.first_line(getattr(error, "message", str(error)))) from None

  def eval_rows(self, process_index: int, process_count: int) -> Iterator[dict[str, Any]]:
    """This process's decoded rows of an evaluation pass, in order, as numpy."""
    tf = sources.tensorflow()
    op_error = tf.errors.OpError   # held: a generator may close after tf is gone
    if not self.source.random_access:
      dataset = self.source.records(process_index, process_count).map(
          lambda record: dict(self._fit(record), index=record["index"], name=record["name"]))
      try:
        for row in dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
          yield dict(row, name=row["name"].decode(), bad=False)
      except op_error as error:
        raise DataError(self.source.where, sources.first_line(error.message)) from None
      return
    count = len(self.source)
    part = math.ceil(count / process_count)
    position, end = min(count, process_index * part), min(count, (process_index + 1) * part)
    names = self.source.names()
    while position < end:
      bad, pil = tf.constant(self.bad), tf.constant(self.pil)
      dataset = tf.data.Dataset.range(position, end).map(
          lambda index: dict(self._decode_row(index, bad, pil), index=index),
          num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
      try:
        for row in dataset.as_numpy_iterator():
          index = int(row["index"])
          yield dict(row, name=names[index], bad=bool(self.bad[index]))
          position += 1
      except op_error as error:
        self.diagnose(np.array([position]), error)


def _permuted(tf: Any, position: Any, count: int, seed: int, epoch: Any) -> Any:
  """TF: `position` of [0, count) under epoch's permutation, a keyed Feistel network.

  Four rounds on 2 * half bits, with cycle walking back into [0, count): a
  bijection of [0, count), computed per position, the same on every host.
  """
  half = max(1, ((count - 1).bit_length() + 1) // 2)
  mask = tf.constant((1 << half) - 1, tf.int64)
  bits = tf.bitwise
  epoch = tf.cast(epoch, tf.int64)
  keys = [bits.bitwise_and(bits.bitwise_xor(epoch * 0x85EBCA77,
                                            (seed * 0x9E3779B1) ^ (r * 0xC2B2AE3D + 0x27D4EB2F)),
                           _KEY_MASK) for r in range(4)]

  def encrypt(x):
    left, right = bits.right_shift(x, half), bits.bitwise_and(x, mask)
    for key in keys:
      mixed = bits.bitwise_xor(right, key) * 0x2545F491      # < 2**62: no int64 overflow
      mixed = bits.bitwise_xor(mixed, bits.right_shift(mixed, 29))
      left, right = right, bits.bitwise_xor(left, bits.bitwise_and(mixed, mask))
    return bits.bitwise_or(bits.left_shift(left, half), right)

  position = encrypt(tf.cast(position, tf.int64))
  return tf.while_loop(lambda x: x >= count, lambda x: (encrypt(x),), (position,))[0]


def _ungrouped(groups: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """The batches of elements that hold several steps ([group, local, ...]), one by one."""
  for group in groups:
    for j in range(len(group["step"])):
      yield {key: value[j] for key, value in group.items()}


def _in_step_order(batches: Iterator[dict[str, np.ndarray]], step: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """`batches` by their 'step', from `step` on (a service's workers may finish out of order)."""
  waiting = {}
  for batch in batches:
    waiting[int(batch["step"][0])] = batch
    while step in waiting:
      yield waiting.pop(step)
      step += 1
    if len(waiting) > _MAX_WAITING:
      raise RuntimeError(
          f"The tf.data service sent {len(waiting)} batches after step {step} but not step "
          f"{step} itself (a worker that failed loses its batches). Restart the run: it "
          "resumes from its last checkpoint with the same batches.")


def _eval_batch(rows: list[dict[str, Any]], size: int, reader: _Reader,
                resized: tuple[int, int], skipped: list[DataError]) -> dict[str, np.ndarray]:
  """uint8 rows padded to `size`, with 'name', 'mask' and (with class maps) 'labels'."""
  height, width = reader.wire
  batch = {"image_a": np.zeros((size, height, width, 3), np.uint8),
           "image_b": np.zeros((size, height, width, 3), np.uint8),
           "mask": np.zeros((size,), bool)}
  names = [""] * size
  if reader.source.has_labels:
    batch["labels"] = np.zeros((size,) + tuple(resized), np.int32)
  for i, row in enumerate(rows):
    if row["bad"]:
      skipped.append(reader.errors[int(row["index"])])
      continue
    batch["image_a"][i], batch["image_b"][i] = row["image_a"], row["image_b"]
    names[i], batch["mask"][i] = row["name"], True
    if "labels" in batch:
      batch["labels"][i] = _nearest(row["labels"], resized)
  batch["name"] = np.array(names, dtype=str)
  return batch


def _nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A class map resized by nearest neighbour, sampling as PIL's NEAREST does."""
  rows = np.minimum(((np.arange(size[0]) + 0.5) * labels.shape[0] / size[0]).astype(int),
                    labels.shape[0] - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * labels.shape[1] / size[1]).astype(int),
                    labels.shape[1] - 1)
  return labels[rows][:, cols].astype(np.int32)


@functools.lru_cache(maxsize=8)
def _eval_function(prep: Preprocess):
  return jax.jit(prep.eval)


class _Cache:
  """The train split's decoded uint8 pairs by index, in memory or in a file."""

  def __init__(self, path: str, pairs: np.ndarray, filled: np.ndarray, key: str,
               complete: bool, mine: np.ndarray):
    self.path, self.pairs, self.filled, self.key, self.complete = (path, pairs, filled, key,
                                                                   complete)
    self.mine = mine     # the indices this process reads

  @classmethod
  def open(cls, config: ml_collections.ConfigDict, reader: _Reader, plan: _HostPlan
           ) -> "_Cache":
    if reader.service:
      raise ValueError("config.data.cache and config.data.service_address exclude each other: "
                       "the service's workers decode, so there is nothing here to keep. Unset "
                       "one of them.")
    count, (height, width) = len(reader.source), reader.wire
    shape = (count, 2, height, width, 3)
    size_mb = np.prod(shape) / 2 ** 20
    # A random-access process reads every example over its epochs; a tfds process, its shard.
    if reader.source.random_access:
      names, mine = reader.source.signature(), np.arange(count)
    else:
      names, mine = count, np.arange(plan.process_index, count, plan.process_count)
    key = hashlib.sha256(json.dumps([reader.source.description, names, list(reader.wire)]
                                    ).encode()).hexdigest()
    spec = config.data.cache
    if spec == "memory":
      logging.info("data.cache: %d pairs of %dx%d, %.0f MB in memory.", count, width, height,
                   size_mb)
      return cls("", np.empty(shape, np.uint8), np.zeros(count, bool), key, False, mine)
    path = os.path.abspath(os.path.expanduser(spec))
    if plan.process_count > 1:   # each process writes its own file: no two write one
      path += f".process{plan.process_index}of{plan.process_count}"
    meta = _read_json(path + ".json")
    if meta.get("key") == key and os.path.exists(path):
      for index, (where, reason) in meta.get("bad", {}).items():
        reader._mark_bad(int(index), DataError(where, reason))
      logging.info("data.cache: reading %d pairs from %s.", count, path)
      return cls(path, np.load(path, mmap_mode="r"), np.ones(count, bool), key, True, mine)
    if meta:
      logging.warning("data.cache: %s was made from other data; making it again.", path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    logging.info("data.cache: %d pairs of %dx%d, %.0f MB, written to %s during the first "
                 "epoch.", count, width, height, size_mb, path)
    pairs = np.lib.format.open_memmap(path + ".partial", mode="w+", dtype=np.uint8, shape=shape)
    return cls(path, pairs, np.zeros(count, bool), key, False, mine)

  def _missing(self, bad: np.ndarray | None = None) -> np.ndarray:
    missing = ~self.filled[self.mine]
    if bad is not None:
      missing &= ~bad[self.mine]
    return self.mine[missing]

  def _store(self, rows: Any) -> None:
    for row in rows.as_numpy_iterator():
      if not self.filled[row["index"]]:
        self.pairs[row["index"], 0], self.pairs[row["index"], 1] = (row["image_a"],
                                                                    row["image_b"])
        self.filled[row["index"]] = True

  def put(self, batch: dict[str, np.ndarray]) -> None:
    index = batch["index"]
    self.pairs[index, 0], self.pairs[index, 1] = batch["image_a"], batch["image_b"]
    self.filled[index] = True

  def get(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.pairs[index, 0], self.pairs[index, 1]

  def fill(self, reader: _Reader, plan: _HostPlan) -> bool:
    """Decodes the pairs no epoch has read yet (the dropped remainders); True when complete."""
    tf = sources.tensorflow()
    if reader.source.random_access:
      missing = self._missing(reader.bad)
      while len(missing):
        bad, pil = tf.constant(reader.bad), tf.constant(reader.pil)
        dataset = tf.data.Dataset.from_tensor_slices(missing.astype(np.int64)).map(
            lambda index: dict(reader._decode_row(index, bad, pil), index=index),
            num_parallel_calls=tf.data.AUTOTUNE)
        try:
          self._store(dataset)
        except tf.errors.OpError as error:
          reader.diagnose(self._missing(reader.bad)[:64], error)
        missing = self._missing(reader.bad)
    elif len(self._missing()):
      records = reader.source.records(plan.process_index, plan.process_count)
      try:
        self._store(records.map(lambda record: dict(reader._fit(record), index=record["index"]),
                                num_parallel_calls=tf.data.AUTOTUNE))
      except tf.errors.OpError as error:
        raise DataError(reader.source.where, sources.first_line(error.message)) from None
    if self.path:
      self.pairs.flush()
      if os.path.exists(self.path + ".json"):
        os.remove(self.path + ".json")     # the old key must never name the new file
      os.replace(self.path + ".partial", self.path)
      bad = {str(i): [e.path, e.reason] for i, e in reader.errors.items()}
      _write_json(self.path + ".json", {"key": self.key, "bad": bad})
      self.pairs = np.load(self.path, mmap_mode="r")
    self.complete = True
    return True


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f)
  os.replace(path + ".tmp", path)


def _prefetch_to_devices(batches: Iterator[dict[str, np.ndarray]], size: int
                         ) -> Iterator[dict[str, jax.Array]]:
  """`batches` sharded over the local devices by `devices.shard`, `size` batches ahead."""
  queue = collections.deque()

  def enqueue(count):
    for batch in itertools.islice(batches, count):
      queue.append(devices.shard(batch))   # device_put is asynchronous: copies overlap the step

  enqueue(max(1, size))
  while queue:
    yield queue.popleft()
    enqueue(1)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is not in [0, process_count={count}).")
  return index, count


def _host_plan(config: ml_collections.ConfigDict, process_index: int, process_count: int
               ) -> _HostPlan:
  local_devices = jax.local_device_count()
  devices.check_batch_divides(
      config.batch_size, local_devices * process_count,
      f"{process_count} process(es) x {local_devices} local devices")
  return _HostPlan(process_index=process_index, process_count=process_count,
                   global_batch=config.batch_size,
                   local_batch=config.batch_size // process_count)



def _with_skip_hint(error: DataError) -> DataError:
  return DataError(error.path, f"{error.reason} (or set --config.data.skip_bad_images=True "
                   "to skip bad images)")


def _steps_per_epoch(config: ml_collections.ConfigDict, count: int) -> int:
  if count < config.batch_size:
    where = (f"folder {config.data.dir!r}" if config.data.source == "folder"
             else f"{config.data.source} data {config.data.name!r}")
    raise ValueError(f"Split {config.data.train_split!r} of {where} has {count} examples, "
                     f"fewer than one global batch (config.batch_size={config.batch_size}); "
                     "lower --config.batch_size or add data.")
  return count // config.batch_size
