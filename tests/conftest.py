"""Every test sees 8 simulated CPU devices, so each pmap path runs in CI."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # as p2p_jax/__init__.py, before NumPy loads
os.environ["CUDA_VISIBLE_DEVICES"] = ""      # TensorFlow must never take an accelerator

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_platforms", "cpu")
# Small nets on a CPU: compiling dominates, and XLA's heavier passes buy little here.
jax.config.update("jax_disable_most_optimizations", True)
assert jax.device_count() == 8, jax.devices()


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Each test file's compiled programs are dropped when it is done: a full session keeps
  its memory to one file's worth, not every file's."""
  yield
  jax.clear_caches()
  gc.collect()
