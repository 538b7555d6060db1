"""BatchNorm's normalisation with the batch's statistics, and its hand-written VJP.

`batch_normalize` computes in float32 whatever the activations' dtype, and
rounds once, to that dtype, at the end. Its VJP sums float32 products too:
differentiated by XLA, the same function sums bfloat16 products over every
pixel, which XLA:CPU runs as slow windowed reductions (a tenth of the
bfloat16 step at 4x256), and rounds them to bfloat16 on the way.

With `axis_name`, the statistics are those of the batch across replicas, and
the input gradient carries the other replicas' share through them, as
autodiff of `lax.pmean` would: the gradient of the sum of every replica's
loss. The scale and bias gradients are this replica's alone (the train step
averages parameter gradients over replicas).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _pixels_sum(x: Array, axis_name: str | None) -> Array:
  """[N, H, W, C] float32 -> [C]: the sum over this replica's pixels, or every replica's."""
  total = jnp.sum(x, axis=(0, 1, 2))
  return total if axis_name is None else lax.psum(total, axis_name)


def pixel_count(x: Array, axis_name: str | None = None) -> Array | int:
  """How many pixels [N, H, W, C] x's statistics are over: this replica's, or every replica's."""
  count = x.shape[0] * x.shape[1] * x.shape[2]
  return count if axis_name is None else count * lax.psum(1, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_normalize(x: Array, scale: Array, bias: Array, epsilon: float,
                    axis_name: str | None = None) -> tuple[Array, Array, Array]:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over N, H, W.

  Args:
    x: [N, H, W, C], any float dtype.
    scale, bias: [C] float32.
    epsilon: added to the variance.
    axis_name: a pmap axis whose replicas' batches are normalised as one.
  Returns:
    The normalised x in x's dtype, and the batch's mean and (biased) variance, [C]
    float32, for the running statistics: no gradient flows back through these two.
  """
  return _batch_normalize_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_normalize_fwd(x, scale, bias, epsilon, axis_name):
  x32 = x.astype(jnp.float32)
  count = pixel_count(x, axis_name)
  mean = _pixels_sum(x32, axis_name) / count
  # Two passes (mean, then the mean square deviation) keep the variance
  # accurate where E[x^2] - E[x]^2 would cancel.
  var = _pixels_sum(jnp.square(x32 - mean), axis_name) / count
  inv = lax.rsqrt(var + epsilon)
  y = ((x32 - mean) * (scale * inv) + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _batch_normalize_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  grad = cotangents[0].astype(jnp.float32)     # the statistics' cotangents are not used
  normalized = (x.astype(jnp.float32) - mean) * inv
  grad_bias = jnp.sum(grad, axis=(0, 1, 2))
  grad_scale = jnp.sum(grad * normalized, axis=(0, 1, 2))
  if axis_name is None:
    total_bias, total_scale = grad_bias, grad_scale
  else:
    total_bias, total_scale = lax.psum((grad_bias, grad_scale), axis_name)
  count = pixel_count(x, axis_name)
  x_grad = (scale * inv) * (grad - (total_bias + normalized * total_scale) / count)
  return x_grad.astype(x.dtype), grad_scale, grad_bias


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)
