"""The stride-1 4x4 convolution by Winograd's minimal filtering: F(2x2, 4x4), and
F(2x2, 2x2) nested over the kernel's four 2x2 quarters.

Two outputs of a 4-tap correlation come from five inputs with five products
instead of eight, y = A^T [(G g) * (B^T d)] (Toom-Cook on the points 0, 1, -1,
2 and infinity). In 2-D a 2x2 output tile costs 25 products per channel pair
instead of 64, so the convolution is 25 matmuls [tiles, C_in] x [C_in, C_out]
between linear transforms of the input tiles, the kernel and the products,
and its hand-written VJP runs both gradients the same way.

Nested, the 4 taps are two 2-tap halves, each F(2, 2) on the points 0, 1 and
infinity: six products for two outputs, 36 for a 2x2 tile in 2-D (1.8x fewer
than 64), from transforms whose coefficients are 0 and +-1. Rounded to bfloat16
for the matmuls, F(2x2, 4x4)'s transformed tiles and kernel (up to ten and two
times their inputs) carry errors nine times a direct convolution's (1.5% of
the output's RMS against 0.17%); the nested form's about twice (0.3-0.4%).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from p2p_jax.ops import windows

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A Winograd algorithm for two outputs of a 4-tap correlation from five inputs."""
  bt: tuple   # [points, 5]: the input tile transform B^T
  g: tuple    # [points, 4]: the kernel transform G
  at: tuple   # [2, points]: the output transform A^T

  @property
  def points(self) -> int:
    return len(self.bt)


# F(2x2, 4x4). The rows of B^T are scaled to integers (and those of G by the inverse), so
# the input transform adds no rounding of its own.
F2X2_4X4 = Algorithm(
    bt=((2, -1, -2, 1, 0), (0, 2, 1, -1, 0), (0, -2, 3, -1, 0), (0, -1, 0, 1, 0),
        (0, 2, -1, -2, 1)),
    g=((1 / 2, 0, 0, 0), (1 / 2, 1 / 2, 1 / 2, 1 / 2), (1 / 6, -1 / 6, 1 / 6, -1 / 6),
       (1 / 6, 1 / 3, 2 / 3, 4 / 3), (0, 0, 0, 1)),
    at=((1, 1, 1, 1, 0), (0, 1, -1, 2, 1)))

# F(2, 2) on taps 0-1 (inputs 0-2) and on taps 2-3 (inputs 2-4): m = (d0 - d1) g0,
# d1 (g0 + g1), (d2 - d1) g1; y0 = m0 + m1, y1 = m1 + m2; the halves' outputs add.
NESTED = Algorithm(
    bt=((1, -1, 0, 0, 0), (0, 1, 0, 0, 0), (0, -1, 1, 0, 0), (0, 0, 1, -1, 0), (0, 0, 0, 1, 0),
        (0, 0, 0, -1, 1)),
    g=((1, 0, 0, 0), (1, 1, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 0, 1)),
    at=((1, 1, 0, 1, 1, 0), (0, 1, 1, 0, 1, 1)))


def _combine(coefficients: Sequence[float], parts: Sequence[Array]) -> Array:
  """sum_i coefficients[i] * parts[i], without the zero terms."""
  total = None
  for coefficient, part in zip(coefficients, parts):
    if coefficient:
      term = part if coefficient == 1 else -part if coefficient == -1 else coefficient * part
      total = term if total is None else total + term
  return total


def _winograd_tiles(x: Array, algorithm: Algorithm) -> list[Array]:
  """[N, H, W, C] -> the transformed input tiles B^T d B, points**2 of [N, tiles_h, tiles_w, C]."""
  _, height, width, _ = x.shape
  # 2x2 tiles covering the output [H - 1, W - 1].
  tiles_h, tiles_w = height // 2, width // 2
  # Output tile (i, j) reads rows 2i..2i+4 and columns 2j..2j+4 of the input
  # padded by one (and by as many more zeros as the last tile needs).
  padded = jnp.pad(x, ((0, 0), (1, 2 * tiles_h + 2 - height), (1, 2 * tiles_w + 2 - width),
                       (0, 0)))
  rows = [padded[:, i:i + 2 * tiles_h - 1:2] for i in range(5)]
  tiles = []
  for bt_a in algorithm.bt:
    mix = _combine(bt_a, rows)
    cols = [mix[:, :, j:j + 2 * tiles_w - 1:2] for j in range(5)]
    tiles.extend(_combine(bt_b, cols) for bt_b in algorithm.bt)
  return tiles


def _winograd_untile(products: list[Array], out_h: int, out_w: int,
                     algorithm: Algorithm) -> Array:
  """The products [N, tiles_h, tiles_w, C] -> the output A^T m A, [N, out_h, out_w, C]."""
  n, tiles_h, tiles_w, c = products[0].shape
  points = algorithm.points
  out_rows = []
  for at_p in algorithm.at:
    mixed = [_combine(at_p, products[b::points]) for b in range(points)]
    out_rows.append(jnp.stack([_combine(at_q, mixed) for at_q in algorithm.at], axis=3))
  y = jnp.stack(out_rows, axis=2).reshape(n, 2 * tiles_h, 2 * tiles_w, c)
  return y[:, :out_h, :out_w]


def _winograd_g2(algorithm: Algorithm) -> Array:
  """G (x) G, [points**2, 16]: the kernel transform G g G^T on the flattened 4x4 taps."""
  g = jnp.asarray(algorithm.g, jnp.float32)
  return jnp.kron(g, g)


def _winograd_kernel(kernel: Array, algorithm: Algorithm) -> Array:
  """[4, 4, C_in, C_out] -> G g G^T, [points**2, C_in, C_out] float32."""
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  taps = windows.dot(_winograd_g2(algorithm), kernel.astype(jnp.float32).reshape(16, c_in * c_out),
                     ((1,), (0,)))
  return taps.reshape(algorithm.points ** 2, c_in, c_out)


def conv4x4_winograd(x: Array, kernel: Array) -> Array:
  """The stride-1 convolution by Winograd's F(2x2, 4x4): 2.56x fewer multiplies.

  The gradients reuse the algorithm: the output gradient is transformed once
  (A^T's adjoint); 25 matmuls with the transformed kernel give the transformed
  input gradient (then B^T's adjoint), and 25 with the saved input tiles the
  transformed kernel gradient (then G's adjoint). The transforms run in
  float32 whatever the compute dtype (only the matmuls' operands take it).
  Float32 results differ from the direct convolution by about twice its own
  rounding error.
  """
  return winograd_conv(x, kernel, F2X2_4X4)


def conv4x4_nested(x: Array, kernel: Array) -> Array:
  """The stride-1 convolution by F(2x2, 2x2) on each 2x2 quarter of the kernel: 1.8x
  fewer multiplies, 36 matmuls, and in bfloat16 about twice a direct convolution's
  rounding error (see the module's doc). Gradients as `conv4x4_winograd`'s."""
  return winograd_conv(x, kernel, NESTED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv(x: Array, kernel: Array, algorithm: Algorithm) -> Array:
  """Conv2d(kernel 4, padding 1, stride 1) of x [N, H, W, C_in] with a [4, 4, C_in, C_out]
  kernel by `algorithm`, in x's dtype: [N, H - 1, W - 1, C_out]."""
  return _winograd_conv_fwd(x, kernel, algorithm)[0]


def _winograd_conv_fwd(x, kernel, algorithm):
  _, height, width, _ = x.shape
  tiles = [tile.astype(x.dtype) for tile in _winograd_tiles(x.astype(jnp.float32), algorithm)]
  taps = _winograd_kernel(kernel, algorithm).astype(x.dtype)
  products = [windows.dot(tile, tap, ((3,), (0,))) for tile, tap in zip(tiles, taps)]
  y = _winograd_untile(products, height - 1, width - 1, algorithm).astype(x.dtype)
  return y, (tiles, taps, x.shape, kernel)


def _winograd_conv_bwd(algorithm, residuals, grad):
  tiles, taps, x_shape, stored_kernel = residuals
  n, height, width, c_in = x_shape
  c_out = grad.shape[-1]
  product = jax.ShapeDtypeStruct(tiles[0].shape[:3] + (c_out,), jnp.float32)
  untile_t = jax.linear_transpose(
      lambda p: _winograd_untile(p, height - 1, width - 1, algorithm), [product] * len(taps))
  (grad_products,) = untile_t(grad.astype(jnp.float32))
  grad_products = [g.astype(grad.dtype) for g in grad_products]
  grad_tiles = [windows.dot(g, tap, ((3,), (1,))) for g, tap in zip(grad_products, taps)]
  grad_taps = jnp.stack([windows.dot_over_pixels(tile, g)
                         for tile, g in zip(tiles, grad_products)])
  tiles_t = jax.linear_transpose(
      lambda x: _winograd_tiles(x, algorithm),
      jax.ShapeDtypeStruct((n, height, width, c_in), jnp.float32))
  (x_grad,) = tiles_t(grad_tiles)
  kernel_grad = windows.dot(_winograd_g2(algorithm), grad_taps.reshape(len(taps), c_in * c_out),
                            ((0,), (0,)))
  return (x_grad.astype(grad.dtype),
          kernel_grad.reshape(4, 4, c_in, c_out).astype(stored_kernel.dtype))


winograd_conv.defvjp(_winograd_conv_fwd, _winograd_conv_bwd)
