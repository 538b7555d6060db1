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


def as_bits(move):
  """`move`, a function that only moves values (pads, slices, stacks, transposes), run on
  the bit patterns of 16-bit floats. XLA:CPU widens bfloat16 to float32 for any
  elementwise work and may move a conversion across such a function, so that the
  windows are assembled at twice their size (2-5x slower)."""
  def moved(x: Array, *args):
    if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      return move(x, *args)
    return lax.bitcast_convert_type(move(lax.bitcast_convert_type(x, jnp.uint16), *args),
                                    x.dtype)
  return moved


@as_bits
def patches(x: Array, stride: int) -> Array:
  """[N, H, W, C] -> [N, H', W', 16 * C]: the 4x4 windows a padding-1 convolution reads,
  ordered (row tap, column tap, channel)."""
  n, height, width, c = x.shape
  if stride == 2 and height % 2 == 0 and width % 2 == 0:
    return _patches_from_blocks(x)
  out_h, out_w = (height + 2 - 4) // stride + 1, (width + 2 - 4) // stride + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [lax.slice(padded, (0, u, v, 0),
                    (n, u + stride * (out_h - 1) + 1, v + stride * (out_w - 1) + 1, c),
                    (1, stride, stride, 1))
          for u in range(4) for v in range(4)]
  return jnp.stack(taps, axis=3).reshape(n, out_h, out_w, 16 * c)


def _patches_from_blocks(x: Array) -> Array:
  """`patches(x, 2)` for even sides as four shifted views of the 2x2 blocks: tap
  u = 2a + p of output row i is phase p of block row i + a. Contiguous views, where
  sixteen strided slices are 2-20x slower on XLA:CPU (most in bfloat16)."""
  n, height, width, c = x.shape
  out_h, out_w = height // 2, width // 2
  phases = blocks(x).reshape(n, out_h + 1, out_w + 1, 2, 2, c)        # [.., p, q, C]
  rows = [jnp.stack([phases[:, a:a + out_h, b:b + out_w] for b in range(2)], axis=4)
          for a in range(2)]                                         # [.., p, b, q, C]
  return jnp.stack(rows, axis=3).reshape(n, out_h, out_w, 16 * c)   # [.., a, p, b, q, C]


def unpatch(cols: Array, x_shape: tuple, stride: int) -> Array:
  """The adjoint of `patches`: adds each window's 16 taps back where they were read.
  Sum float32 products here before any cast: XLA:CPU adds bfloat16 arrays several
  times slower than float32 ones."""
  n, height, width, c = x_shape
  _, out_h, out_w, _ = cols.shape
  if stride == 2 and height % 2 == 0 and width % 2 == 0:
    return overlap_add(cols.reshape(n, out_h, out_w, 4, 4, c))
  cols = cols.reshape(n, out_h, out_w, 4, 4, c)
  if stride == 1:   # one sum of sixteen shifted copies
    padded = sum(jnp.pad(cols[:, :, :, u, v], ((0, 0), (u, 3 - u), (v, 3 - v), (0, 0)))
                 for u in range(4) for v in range(4))
    return padded[:, 1:-1, 1:-1]
  padded = jnp.zeros((n, height + 2, width + 2, c), cols.dtype)
  for u in range(4):
    for v in range(4):
      padded = padded.at[:, u:u + stride * (out_h - 1) + 1:stride,
                         v:v + stride * (out_w - 1) + 1:stride].add(cols[:, :, :, u, v])
  return padded[:, 1:-1, 1:-1]


def dot_over_pixels(lhs: Array, rhs: Array) -> Array:
  """[N, H, W, A] x [N, H, W, B] -> [A, B] float32: products summed over every pixel
  (a weight gradient).

  XLA:CPU's bfloat16 dots take operands whose contracted axis is the last of the
  left one; it transposes one operand into that form first (a 2-D [pixels, A]
  contracted on its first axis it does not take at all: it converts both to
  float32 and runs 3-8x slower). The operand transposed is the one with fewer
  values, and the [B, A] product is then transposed back, where that costs less
  (the barrier keeps XLA from folding that transpose into the dot's output, which
  its bfloat16 dots do not take either).
  """
  pixels = lhs.size // lhs.shape[-1]
  a, b = lhs.shape[-1], rhs.shape[-1]
  if pixels * b + a * b < pixels * a:
    return lax.optimization_barrier(dot(rhs, lhs, ((0, 1, 2), (0, 1, 2)))).T
  return dot(lhs, rhs, ((0, 1, 2), (0, 1, 2)))


@as_bits
def _windows2x2(x: Array) -> Array:
  """[N, h, w, C] padded by one -> its 2x2 windows [N, h + 1, w + 1, (a', b', C)]."""
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([padded[:, a:a + h + 1, b:b + w + 1]
                          for a in range(2) for b in range(2)], axis=3)


def upsample_blocks(x: Array, kernel: Array) -> Array:
  """ConvTranspose2d(4, stride 2, padding 1), float32 sums: x [N, h, w, C_in], kernel
  [4, 4, C_in, C_out] -> [N, 2h, 2w, C_out] float32, as one matmul and depth-to-space.

  Output block (m, n) of the result padded by one (rows 2m - 1 and 2m, phase p)
  takes input pixels (m - 1 + a', n - 1 + b') through kernel tap
  (2(1 - a') + p, 2(1 - b') + q): each block is the input's 2x2 windows (padded
  by one) times a [4 C_in, 4 C_out] matrix. Its products are 4 C_out values a
  pixel, where the taps matmul of `overlap_add` writes 16 C_out.
  """
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  taps = kernel.reshape(2, 2, 2, 2, c_in, c_out)[::-1, :, ::-1]      # [a', p, b', q, C_in, C_out]
  taps = taps.transpose(0, 2, 4, 1, 3, 5).reshape(4 * c_in, 4 * c_out)
  out = dot(_windows2x2(x), taps, ((3,), (0,)))                       # [N, h + 1, w + 1, (p, q, C)]
  out = out.reshape(n, h + 1, w + 1, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(n, 2 * h + 2, 2 * w + 2, c_out)[:, 1:-1, 1:-1]


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

