"""The stride-1 4x4 convolution by Winograd's minimal filtering F(2x2, 4x4).

Two outputs of a 4-tap correlation come from five inputs with five products
instead of eight, y = A^T [(G g) * (B^T d)] (Toom-Cook on the points 0, 1, -1,
2 and infinity). In 2-D a 2x2 output tile costs 25 products per channel pair
instead of 64, so the convolution is 25 matmuls [tiles, C_in] x [C_in, C_out]
between linear transforms of the input tiles, the kernel and the products,
and its hand-written VJP runs both gradients the same way.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from p2p_jax.ops import windows

Array = jax.Array

# The rows of B^T are scaled to integers (and those of G by the inverse), so
# the input transform adds no rounding of its own.
_WINOGRAD_BT = ((2, -1, -2, 1, 0), (0, 2, 1, -1, 0), (0, -2, 3, -1, 0), (0, -1, 0, 1, 0),
                (0, 2, -1, -2, 1))
_WINOGRAD_G = ((1 / 2, 0, 0, 0), (1 / 2, 1 / 2, 1 / 2, 1 / 2), (1 / 6, -1 / 6, 1 / 6, -1 / 6),
               (1 / 6, 1 / 3, 2 / 3, 4 / 3), (0, 0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 1, 0), (0, 1, -1, 2, 1))


def _combine(coefficients: Sequence[float], parts: Sequence[Array]) -> Array:
  """sum_i coefficients[i] * parts[i], without the zero terms."""
  total = None
  for coefficient, part in zip(coefficients, parts):
    if coefficient:
      term = part if coefficient == 1 else -part if coefficient == -1 else coefficient * part
      total = term if total is None else total + term
  return total


def _winograd_tiles(x: Array) -> list[Array]:
  """[N, H, W, C] -> the 25 transformed input tiles B^T d B, each [N, tiles_h, tiles_w, C]."""
  _, height, width, _ = x.shape
  # 2x2 tiles covering the output [H - 1, W - 1].
  tiles_h, tiles_w = height // 2, width // 2
  # Output tile (i, j) reads rows 2i..2i+4 and columns 2j..2j+4 of the input
  # padded by one (and by as many more zeros as the last tile needs).
  padded = jnp.pad(x, ((0, 0), (1, 2 * tiles_h + 2 - height), (1, 2 * tiles_w + 2 - width),
                       (0, 0)))
  rows = [padded[:, i:i + 2 * tiles_h - 1:2] for i in range(5)]
  tiles = []
  for bt_a in _WINOGRAD_BT:
    mix = _combine(bt_a, rows)
    cols = [mix[:, :, j:j + 2 * tiles_w - 1:2] for j in range(5)]
    tiles.extend(_combine(bt_b, cols) for bt_b in _WINOGRAD_BT)
  return tiles


def _winograd_untile(products: list[Array], out_h: int, out_w: int) -> Array:
  """The 25 products [N, tiles_h, tiles_w, C] -> the output A^T m A, [N, out_h, out_w, C]."""
  n, tiles_h, tiles_w, c = products[0].shape
  out_rows = []
  for at_p in _WINOGRAD_AT:
    mixed = [_combine(at_p, products[b::5]) for b in range(5)]
    out_rows.append(jnp.stack([_combine(at_q, mixed) for at_q in _WINOGRAD_AT], axis=3))
  y = jnp.stack(out_rows, axis=2).reshape(n, 2 * tiles_h, 2 * tiles_w, c)
  return y[:, :out_h, :out_w]


def _winograd_g2() -> Array:
  """G (x) G, [25, 16]: the kernel transform G g G^T on the flattened 4x4 taps."""
  g = jnp.asarray(_WINOGRAD_G, jnp.float32)
  return jnp.kron(g, g)


def _winograd_kernel(kernel: Array) -> Array:
  """[4, 4, C_in, C_out] -> G g G^T, [25, C_in, C_out]."""
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  taps = windows.dot(_winograd_g2(), kernel.reshape(16, c_in * c_out), ((1,), (0,)))
  return taps.reshape(25, c_in, c_out)


@jax.custom_vjp
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
  return _conv4x4_winograd_fwd(x, kernel)[0]


def _conv4x4_winograd_fwd(x, kernel):
  _, height, width, _ = x.shape
  tiles = [tile.astype(x.dtype) for tile in _winograd_tiles(x.astype(jnp.float32))]
  taps = _winograd_kernel(kernel).astype(kernel.dtype)
  products = [windows.dot(tile, tap, ((3,), (0,))) for tile, tap in zip(tiles, taps)]
  y = _winograd_untile(products, height - 1, width - 1).astype(x.dtype)
  return y, (tiles, taps, x.shape)


def _conv4x4_winograd_bwd(residuals, grad):
  tiles, taps, x_shape = residuals
  n, height, width, c_in = x_shape
  c_out = grad.shape[-1]
  product = jax.ShapeDtypeStruct(tiles[0].shape[:3] + (c_out,), jnp.float32)
  untile_t = jax.linear_transpose(lambda p: _winograd_untile(p, height - 1, width - 1),
                                  [product] * 25)
  (grad_products,) = untile_t(grad.astype(jnp.float32))
  grad_products = [g.astype(grad.dtype) for g in grad_products]
  grad_tiles = [windows.dot(g, tap, ((3,), (1,))) for g, tap in zip(grad_products, taps)]
  grad_taps = jnp.stack([windows.dot(tile, g, ((0, 1, 2), (0, 1, 2)))
                         for tile, g in zip(tiles, grad_products)])
  tiles_t = jax.linear_transpose(
      _winograd_tiles, jax.ShapeDtypeStruct((n, height, width, c_in), jnp.float32))
  (x_grad,) = tiles_t(grad_tiles)
  kernel_grad = windows.dot(_winograd_g2(), grad_taps.reshape(25, c_in * c_out), ((0,), (0,)))
  return (x_grad.astype(grad.dtype),
          kernel_grad.reshape(4, 4, c_in, c_out).astype(taps.dtype))


conv4x4_winograd.defvjp(_conv4x4_winograd_fwd, _conv4x4_winograd_bwd)

