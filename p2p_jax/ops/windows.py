"""Shared pieces of the convolution forms: float32-accumulating dots and the
ways a 4x4, padding-1 layer's input is cut into windows, blocks and taps.

All arrays are NHWC; kernels are [4, 4, C_in, C_out] (HWIO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Dimension numbers of every NHWC convolution with an HWIO kernel.
NHWC = ("NHWC", "HWIO", "NHWC")


def dot(lhs: Array, rhs: Array, contract: tuple, batch: tuple = ((), ())) -> Array:
  # Products are summed in float32 even for bfloat16 inputs, as a convolution's are.
  return lax.dot_general(lhs, rhs, (contract, batch), preferred_element_type=jnp.float32)


def patches(x: Array, stride: int) -> Array:
  """[N, H, W, C] -> [N, H', W', 16 * C]: the 4x4 windows a padding-1 convolution reads."""
  n, height, width, c = x.shape
  out_h, out_w = (height + 2 - 4) // stride + 1, (width + 2 - 4) // stride + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [lax.slice(padded, (0, u, v, 0),
                    (n, u + stride * (out_h - 1) + 1, v + stride * (out_w - 1) + 1, c),
                    (1, stride, stride, 1))
          for u in range(4) for v in range(4)]
  return jnp.stack(taps, axis=3).reshape(n, out_h, out_w, 16 * c)


def unpatch(cols: Array, x_shape: tuple, stride: int) -> Array:
  """The adjoint of `patches`: adds each window's 16 taps back where they were read."""
  n, height, width, c = x_shape
  _, out_h, out_w, _ = cols.shape
  cols = cols.reshape(n, out_h, out_w, 4, 4, c)
  padded = jnp.zeros((n, height + 2, width + 2, c), cols.dtype)
  for u in range(4):
    for v in range(4):
      padded = padded.at[:, u:u + stride * (out_h - 1) + 1:stride,
                         v:v + stride * (out_w - 1) + 1:stride].add(cols[:, :, :, u, v])
  return padded[:, 1:-1, 1:-1]


def blocks(x: Array) -> Array:
  """[N, H, W, C] padded by one -> its 2x2 blocks [N, H/2 + 1, W/2 + 1, (row, col, C)]."""
  n, height, width, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  blocks = padded.reshape(n, height // 2 + 1, 2, width // 2 + 1, 2, c)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, height // 2 + 1, width // 2 + 1, 4 * c)


def taps_matrix(kernel: Array) -> Array:
  """[4, 4, C_in, C_out] -> [C_in, (u, v, C_out)]: every input channel times the 16 taps."""
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  return kernel.transpose(2, 0, 1, 3).reshape(c_in, 16 * c_out)


def overlap_add(cols: Array) -> Array:
  """[N, h, w, 4, 4, C] -> [N, 2h, 2w, C]: out[2i - 1 + u, 2j - 1 + v] += cols[i, j, u, v].

  The adjoint of `patches(., 2)`. With u = 2a + p, tap (a, p) lands on row
  2(i + a) + p of the output padded by one, so each (a, b) is one shifted block.
  """
  n, h, w, _, _, c = cols.shape
  cols = cols.reshape(n, h, w, 2, 2, 2, 2, c)                  # [.., a, p, b, q, C]
  total = 0
  for a in range(2):
    for b in range(2):
      total = total + jnp.pad(cols[:, :, :, a, :, b], ((0, 0), (a, 1 - a), (b, 1 - b),
                                                        (0, 0), (0, 0), (0, 0)))
  out = total.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h + 2, 2 * w + 2, c)
  return out[:, 1:-1, 1:-1]

