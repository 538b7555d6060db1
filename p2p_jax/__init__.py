"""p2p_jax: pix2pix (Isola et al., CVPR 2017) in JAX and Flax, for CPUs, GPUs and TPU pods."""

import os
import platform
import sys

# The input pipeline decodes and renders examples in a pool of threads. NumPy's
# BLAS starting its own threads inside each of them only oversubscribes the
# cores (the synthetic data runs about 3x slower). This takes effect when
# p2p_jax is imported before NumPy, as by `python -m p2p_jax.main`; an
# explicit OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# TensorFlow (which only reads data here) and XLA print INFO lines from C++ when they
# load, e.g. TensorFlow's oneDNN notice; keep their warnings and errors. An explicit
# TF_CPP_MIN_LOG_LEVEL wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# TensorFlow announces on import that its oneDNN kernels are on, unless the
# variable says so: on x86-64, where they are on by default, say so.
if platform.machine().lower() in ("x86_64", "amd64"):
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# A program of the package (`python -m p2p_jax.main`, `.bench`, ...) is being found: the
# package imports before the program's module, before any thread starts. On a CPU-only
# Linux host glibc then keeps the step's freed scratch memory for the next step
# (`hardware.keep_freed_memory`, which says why; P2P_JAX_KEEP_FREED_MEMORY=0 opts out).
# Imported as a library (a notebook, the tests), malloc is left as it is.
if sys.argv[:1] == ["-m"] and "p2p_jax.hardware" not in getattr(sys, "orig_argv", ()):
  from p2p_jax import hardware as _hardware   # standard library only
  _hardware.keep_freed_memory()
