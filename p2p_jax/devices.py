"""Where arrays live: the pmap axis, and moving trees between the host and the local devices.

Everything that places data imports this module (the step, the training loop,
evaluation, the input pipeline, checkpoints, the benchmark), so the mesh axis
name and the layout of a replicated or sharded tree are defined once.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from typing import Any

import jax
import numpy as np
from jax import lax

from p2p_jax import validation

AXIS_NAME = "batch"   # the pmap axis; BatchNorm and gradients average over it
PyTree = Any


def check_batch_divides(batch_size: int, num_devices: int, detail: str = "") -> None:
  """Raises a ConfigError with a fitting value unless `batch_size` splits over the devices.

  `batch_size` is config.batch_size, the global batch; `detail` says where the
  devices are (e.g. "2 process(es) x 4 local devices").
  """
  if batch_size > 0 and batch_size % num_devices == 0:
    return
  where = f" ({detail})" if detail else ""
  suggestion = num_devices * max(1, batch_size // num_devices)
  raise validation.ConfigError(
      f"config.batch_size={batch_size} does not split evenly over {num_devices} "
      f"device(s){where}: it is the global batch, so use a positive multiple of "
      f"{num_devices}, e.g. --config.batch_size={suggestion}.")


def replica_mean(tree: PyTree) -> PyTree:
  """Inside pmap: the mean over the replicas; on one device, the tree as it is (XLA
  would still copy every array through a one-device all-reduce)."""
  if lax.axis_size(AXIS_NAME) == 1:
    return tree
  return lax.pmean(tree, AXIS_NAME)


def _device_sharding(devices: list[jax.Device] | None = None) -> jax.sharding.NamedSharding:
  # The mesh axis is named like pmap's own outputs, so a state placed here and
  # the state a step returns have the same sharding and the step never recompiles.
  mesh = jax.sharding.Mesh(np.array(devices or jax.local_devices()), (AXIS_NAME,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))


def replicate(tree: PyTree, devices: list[jax.Device] | None = None) -> PyTree:
  """One copy of `tree` on each local device (default: all), as pmap's replicated input."""
  sharding = _device_sharding(devices)
  count = len(sharding.mesh.devices.flat)
  return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * count), sharding), tree)


def shard(batch: PyTree, devices: list[jax.Device] | None = None) -> PyTree:
  """Splits host arrays [B, ...] into [local_devices, B / local_devices, ...] on the devices."""
  sharding = _device_sharding(devices)
  count = len(sharding.mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % count:
      raise ValueError(f"A batch of {x.shape[0]} does not split over {count} local devices; "
                       f"make config.batch_size a multiple of the device count.")
    return jax.device_put(x.reshape((count, x.shape[0] // count) + x.shape[1:]), sharding)
  return jax.tree.map(put, batch)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a replicated tree, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data[0]
                                           if isinstance(x, jax.Array) else x[0]), tree)


def to_global(x: jax.Array) -> jax.Array:
  """A pmap-replicated array [local_devices, ...] as one fully replicated global array
  (what Orbax saves when several processes hold copies).

  Orbax's `fully_replicated_host_local_array_to_global_array` does this too, but
  with one local device it cannot tell the replica axis from the array's own
  and keeps it; here the leading axis is always the replicas'.
  """
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
  return jax.make_array_from_single_device_arrays(x.shape[1:], sharding,
                                                  [s.data[0] for s in shards])


@functools.cache
def hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow, which only reads data, off the GPUs and TPUs (it would reserve
  their memory). Called once at start-up by the programs, and by the input
  pipeline before it first uses TensorFlow; later calls do nothing."""
  tf = _import_tensorflow_quietly()
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):   # TF already initialised, or no such device type
      pass


# What TensorFlow prints from C++ as it loads, before its logging reads
# TF_CPP_MIN_LOG_LEVEL: notices, twice (two of its libraries print them).
_TF_LOAD_NOTICES = ("oneDNN custom operations are on",
                    "All log messages before absl::InitializeLog() is called")


def _import_tensorflow_quietly():
  """`import tensorflow`, with its load-time notices kept off the console (anything else it
  prints comes through, and everything does if the import fails)."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  sys.stderr.flush()
  console = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    failed = True
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      failed = False
    finally:
      os.dup2(console, 2)
      os.close(console)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if failed or not any(
          notice in line for notice in _TF_LOAD_NOTICES)))
  return tf
