"""p2p_jax: pix2pix (Isola et al., CVPR 2017) in JAX and Flax, for CPUs, GPUs and TPU pods."""

import os

# The input pipeline decodes and renders examples in a pool of threads. NumPy's
# BLAS starting its own threads inside each of them only oversubscribes the
# cores (the synthetic data runs about 3x slower). This takes effect when
# p2p_jax is imported before NumPy, as by `python -m p2p_jax.main`; an
# explicit OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
