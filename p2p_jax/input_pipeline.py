"""Input pipeline: paired images from every source, jittered, batched, split over hosts.

Sources (`config.data.source`):
  synthetic  rendered on the fly by `datasets.synthetic` at crop_size x crop_size
             (then preprocessed like any image, so the code path is the real one);
             num_train_examples / num_eval_examples examples per split.
  folder     `datasets.folder`: DIR/{train,val,test}/ of A|B images, or DIR/SPLIT/{A,B}/.
  tfds       the `pix2pix` TFDS builder (`datasets.pix2pix_tfds`), read with tf.data.

Images are decoded and jittered on the host, in a pool of threads (PIL and
numpy release the GIL), one example per task. Doing it in Python rather than in
TF ops keeps every failure a plain `DataError` naming the file, never a deep
TensorFlow traceback, and makes a bad file skippable (`data.skip_bad_images`).

Order and the per-host split are each source's own (`Source.epoch_items`):
synthetic and folder sources visit epoch e in the permutation
`np.random.default_rng((seed, e))`, cut into global batches of
`config.batch_size`, process p of P taking the p-th contiguous slice of each;
so P processes together see, step for step, exactly the global batch one
process with all the devices would see, and no example twice in an epoch. The
examples left over after the last full global batch (fewer than
config.batch_size) are dropped; the permutation changes every epoch, so a
different remainder is dropped each time. The tfds source is a stream: process
p reads every P-th record, shuffled per epoch in a seeded buffer; reproducible
and resumable the same way, but its batches depend on P. Crop offsets and
flips are drawn from `np.random.default_rng((seed, e, index, 1))`: a pure
function of the example and the epoch, so a run resumed at `start_step` sees
what an unbroken run saw.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from p2p_jax import devices
from p2p_jax.datasets import sources
from p2p_jax.datasets.errors import DataError
from p2p_jax.datasets.preprocess import Preprocess


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

  Yields {'real_a': [local_devices, per_device_batch, H, W, input_nc],
  'real_b': [local_devices, per_device_batch, H, W, output_nc]}, float32 in
  [-1, 1], sharded over `jax.local_devices()` on the mesh axis 'batch' (as
  `devices.shard`), `config.data.prefetch_to_device` batches ahead. The n-th
  batch is global step `start_step + n`. `process_index`/`process_count`
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
  Images are resized to crop_size x crop_size (other modes: see
  `datasets.preprocess`), never cropped or flipped.
  """
  split = config.data.eval_split if split is None else split
  prep = Preprocess.from_config(config)
  source = sources.open_source(config, split)
  process_index, process_count = _process(process_index, process_count)
  batch_size = config.eval.batch_size
  if batch_size <= 0:
    raise ValueError(f"config.eval.batch_size={batch_size} must be positive.")
  # Every process makes as many batches as the largest part needs (padded).
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  items = source.epoch_items(None, process_index, process_count)
  specs = (_Spec(items=list(itertools.islice(items, batch_size)), epoch=0,
                 last=n == num_batches - 1) for n in range(num_batches))

  def work(spec, item):
    example = item[1] or source.load(item[0])
    real_a, real_b, labels = prep.eval(example.where, example.image_a, example.image_b,
                                       example.labels)
    return example, real_a, real_b, labels

  assemble = _EvalAssembler(config, split, batch_size, source.has_labels)
  return (assemble(spec, results) for spec, results in _run_parallel(specs, work, batch_size))


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

  The first batch (thread start-up) is not timed.
  """
  batches = _train_host_batches(config, 0, 0, 1)
  try:
    next(batches)
    start, count = time.perf_counter(), 0
    for batch in itertools.islice(batches, num_batches):
      count += len(batch["real_a"])
    return count / (time.perf_counter() - start)
  finally:
    batches.close()


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One host batch to make: (index, decoded example or None to load it) per row."""
  items: list[tuple[int, sources.Example | None]]
  epoch: int
  last: bool           # the last batch of its epoch (or of the eval pass)


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
  seed = config.seed

  def work(spec, item):
    index, example = item
    example = example or source.load(index)
    rng = np.random.default_rng((seed, spec.epoch, index, 1))
    real_a, real_b = prep.train(example.where, example.image_a, example.image_b, rng)
    return example, real_a, real_b

  specs = _train_specs(source, plan, start_step, steps)
  assemble = _TrainAssembler(config)
  return (assemble(spec, rows) for spec, rows in
          _run_parallel(specs, work, plan.local_batch))


def _train_specs(source: sources.Source, plan: _HostPlan, start_step: int, steps: int
                 ) -> Iterator[_Spec]:
  """This process's rows of global steps start_step, start_step + 1, ... (forever)."""
  epoch, first_step = divmod(start_step, steps)
  while True:
    items = source.epoch_items(epoch, plan.process_index, plan.process_count,
                               batch_size=plan.global_batch, skip_batches=first_step)
    for step in range(first_step, steps):
      yield _Spec(items=list(itertools.islice(items, plan.local_batch)), epoch=epoch,
                  last=step == steps - 1)
    epoch, first_step = epoch + 1, 0


def _run_parallel(specs: Iterator[_Spec], work: Callable[[_Spec, Any], Any],
                  rows_per_batch: int) -> Iterator[tuple[_Spec, list[Any]]]:
  """(spec, [work(spec, item) or its DataError per item]), in order, computed by a thread pool.

  Enough batches are in flight to keep every worker busy.
  """
  workers = _num_workers()
  depth = max(2, math.ceil(4 * workers / max(1, rows_per_batch)))
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="p2p_input")
  pending = collections.deque()
  is_finalizing = sys.is_finalizing   # kept: an unclosed iterator is closed after sys is gone
  try:
    for spec in specs:
      pending.append((spec, [pool.submit(_guarded, work, spec, item) for item in spec.items]))
      if len(pending) >= depth:
        spec, futures = pending.popleft()
        yield spec, [future.result() for future in futures]
    while pending:
      spec, futures = pending.popleft()
      yield spec, [future.result() for future in futures]
  finally:
    if not is_finalizing():   # at exit, modules are being torn down and threads end anyway
      pool.shutdown(wait=False, cancel_futures=True)


def _guarded(work: Callable[[_Spec, Any], Any], spec: _Spec, item: Any) -> Any:
  try:
    return work(spec, item)
  except DataError as error:   # returned, so the batch decides: raise it or skip the image
    return error


class _TrainAssembler:
  """Stacks a training batch; raises or skips its bad images; reports skips per epoch."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._skip = config.data.skip_bad_images
    self._split = config.data.train_split
    self._preprocess = config.data.preprocess
    self._size = None        # (H, W) of the first image: every batch must have it
    self._skipped = []

  def __call__(self, spec: _Spec, rows: list[Any]) -> dict[str, np.ndarray]:
    bad = [row for row in rows if isinstance(row, DataError)]
    if bad:
      if not self._skip:
        raise _with_skip_hint(bad[0])
      self._skipped += bad
      good = [row for row in rows if not isinstance(row, DataError)]
      if not good:
        raise DataError(bad[0].path, f"{bad[0].reason}; every image of a batch is bad, so "
                        "there is none to stand in for them")
      # A bad row takes a copy of a good one of the same batch: every process keeps
      # its batch size and its number of steps, which the collective step needs.
      rows = [good[i % len(good)] if isinstance(row, DataError) else row
              for i, row in enumerate(rows)]
    for example, real_a, _ in rows:
      self._size = _check_same_size(self._size, example, real_a, self._preprocess)
    if spec.last and self._skipped:
      sources.report_skipped(
          self._skipped, f"bad images skipped in epoch {spec.epoch} of split {self._split!r}; "
          "each was replaced by another image of its batch")
      self._skipped = []
    return {"real_a": np.stack([row[1] for row in rows]),
            "real_b": np.stack([row[2] for row in rows])}


class _EvalAssembler:
  """Pads an eval batch to full size with a mask; raises or skips (masks) bad images."""

  def __init__(self, config: ml_collections.ConfigDict, split: str, batch_size: int,
               has_labels: bool):
    self._skip = config.data.skip_bad_images
    self._split, self._batch_size, self._has_labels = split, batch_size, has_labels
    self._preprocess = config.data.preprocess
    self._channels = (config.model.input_nc, config.model.output_nc)
    self._size = None
    self._default_size = (config.data.crop_size,) * 2
    self._skipped = []

  def __call__(self, spec: _Spec, rows: list[Any]) -> dict[str, np.ndarray]:
    for row in rows:
      if isinstance(row, DataError):
        if not self._skip:
          raise _with_skip_hint(row)
        self._skipped.append(row)
      else:
        self._size = _check_same_size(self._size, row[0], row[1], self._preprocess)
    height, width = self._size or self._default_size
    size = self._batch_size
    batch = {"real_a": np.zeros((size, height, width, self._channels[0]), np.float32),
             "real_b": np.zeros((size, height, width, self._channels[1]), np.float32),
             "mask": np.zeros((size,), bool)}
    names = [""] * size
    if self._has_labels:
      batch["labels"] = np.zeros((size, height, width), np.int32)
    for i, row in enumerate(rows):
      if not isinstance(row, DataError):
        example, batch["real_a"][i], batch["real_b"][i], labels = row
        names[i], batch["mask"][i] = example.name, True
        if self._has_labels:
          batch["labels"][i] = labels
    batch["name"] = np.array(names, dtype=str)
    if spec.last and self._skipped:
      sources.report_skipped(self._skipped,
                             f"bad images skipped (masked out) in split {self._split!r}")
      self._skipped = []
    return batch


def _check_same_size(size: tuple[int, int] | None, example: sources.Example, image: np.ndarray,
                     preprocess: str) -> tuple[int, int]:
  """The (H, W) every batch must share: the first image's; raises on any other."""
  if size is None or tuple(image.shape[:2]) == size:
    return tuple(image.shape[:2])
  raise DataError(example.where, (
      f"becomes a {image.shape[1]}x{image.shape[0]} (WxH) image under preprocess={preprocess}, "
      f"but the images before it became {size[1]}x{size[0]}: all batches need one size. Use "
      "--config.data.preprocess=resize_and_crop or scale_width_and_crop, or images of one size"))


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


def _num_workers() -> int:
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    cores = os.cpu_count() or 1
  return max(2, min(32, cores))


def _with_skip_hint(error: DataError) -> DataError:
  # A fresh exception: the worker thread's traceback would only hide the message.
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
