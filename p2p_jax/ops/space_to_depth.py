"""A stride-2 4x4 convolution as a stride-1 2x2 one over 2x2 blocks, and its adjoint.

The pair serves both directions: the adjoint is a transposed convolution
(`upsample_space_to_depth`), which is also the input gradient of a stride-2
convolution (`conv.conv4x4_s2`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from p2p_jax.ops import windows

Array = jax.Array


def space_to_depth_conv(x: Array, kernel: Array) -> Array:
  """The stride-2 convolution as a stride-1 2x2 convolution of the padded input's
  2x2 blocks (space-to-depth: [N, H/2 + 1, W/2 + 1, 4 * C]) with the kernel's
  taps regrouped the same way. Output row o reads padded rows 2o..2o+3, which
  are exactly blocks o and o + 1."""
  c = x.shape[-1]
  taps = kernel.reshape(2, 2, 2, 2, c, kernel.shape[-1]).transpose(0, 2, 1, 3, 4, 5)
  return lax.conv_general_dilated(windows.blocks(x), taps.reshape(2, 2, 4 * c, kernel.shape[-1]),
                                  (1, 1), "VALID", dimension_numbers=windows.NHWC)


def upsample_space_to_depth(x: Array, kernel: Array) -> Array:
  """ConvTranspose2d(4, stride 2, padding 1) as the adjoint of a stride-2
  convolution in its space-to-depth form (`space_to_depth_conv` with the
  kernel's channel axes swapped): one stride-1 2x2 convolution that writes all
  four phases of each output pixel's 2x2 block, then depth-to-space.
  [N, H, W, C_in], kernel [4, 4, C_in, C_out] -> [N, 2H, 2W, C_out]."""
  n, h, w, _ = x.shape
  kernel = kernel.astype(x.dtype)
  image = jax.ShapeDtypeStruct((n, 2 * h, 2 * w, kernel.shape[-1]), x.dtype)
  (y,) = jax.linear_transpose(lambda z: space_to_depth_conv(z, jnp.swapaxes(kernel, 2, 3)),
                              image)(x)
  return y
