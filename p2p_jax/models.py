"""The pix2pix networks: a U-Net generator and a PatchGAN discriminator.

Flax linen modules on NHWC images. Layer widths, bias rules and initialisation
follow the paper and the authors' code: 4x4 convolutions with stride 2 and
padding 1, weights N(0, 0.02), BatchNorm scale N(1, 0.02), no convolution bias
in front of a BatchNorm (nor on the U-Net's un-normalised first and innermost
down-convolutions), LeakyReLU(0.2) on the way down and ReLU on the way up.

Both networks take two keyword flags:
  use_running_average: BatchNorm uses running statistics instead of the batch's.
  deterministic:       dropout is off (generator only).
The paper runs the generator at test time exactly as in training (batch
statistics, dropout on); `use_running_average=deterministic=True` is the
official `--eval` mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any

NORMS = ("batch", "instance", "none")
DROPOUT_PLACEMENTS = ("pytorch", "paper")
UPCONV_IMPLS = ("auto", "subpixel", "dilated")
CONV_IMPLS = ("auto", "xla")

_LEAKY_SLOPE = 0.2
_NORM_EPSILON = 1e-5
_weight_init = nn.initializers.normal(stddev=0.02)


def _scale_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
  """BatchNorm over N, H, W with PyTorch's conventions.

  Running statistics move by `momentum` towards the batch's (PyTorch's 0.1 is
  Flax's 0.9) and the running variance is the unbiased one, so statistics
  carried over from the official code mean the same thing here. With
  `axis_name` set, the batch statistics are averaged across replicas: a batch of
  8 on 8 devices is then normalised exactly as a batch of 8 on one.
  """
  momentum: float = 0.1
  epsilon: float = _NORM_EPSILON
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", _scale_init, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      x32 = x.astype(jnp.float32)
      # Outside pmap (at init) there is no axis to average over; on one device, nothing to.
      synced = (self.axis_name is not None and not self.is_initializing()
                and lax.axis_size(self.axis_name) > 1)
      mean = jnp.mean(x32, axis=(0, 1, 2))
      if synced:
        mean = lax.pmean(mean, self.axis_name)
      # Two passes (mean, then the mean square deviation) keep the variance
      # accurate where E[x^2] - E[x]^2 would cancel.
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if synced:
        var = lax.pmean(var, self.axis_name)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        count = x.shape[0] * x.shape[1] * x.shape[2]
        if synced:
          count *= lax.psum(1, self.axis_name)
        unbiased_var = var * (count / jnp.maximum(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var

    inv = scale * lax.rsqrt(var + self.epsilon)
    return (x * inv.astype(x.dtype) + (bias - mean * inv).astype(x.dtype))


def _normalize(x: Array, norm: str, use_running_average: bool, axis_name: str | None,
               name: str) -> Array:
  if norm == "batch":
    return BatchNorm(axis_name=axis_name, name=name)(x, use_running_average)
  if norm == "instance":
    # PyTorch's InstanceNorm2d default: no affine parameters, no running statistics.
    return nn.InstanceNorm(epsilon=_NORM_EPSILON, use_scale=False, use_bias=False,
                           use_fast_variance=False, name=name)(x)
  return x


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


_NHWC = ("NHWC", "HWIO", "NHWC")


def _dot(lhs: Array, rhs: Array, contract: tuple, batch: tuple = ((), ())) -> Array:
  # Products are summed in float32 even for bfloat16 inputs, as a convolution's are.
  return lax.dot_general(lhs, rhs, (contract, batch), preferred_element_type=jnp.float32)


def conv4x4_xla(x: Array, kernel: Array, stride: int) -> Array:
  """Conv2d(kernel 4, padding 1) as XLA writes it and differentiates it."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                  dimension_numbers=_NHWC)


def _patches(x: Array, stride: int) -> Array:
  """[N, H, W, C] -> [N, H', W', 16 * C]: the 4x4 windows a padding-1 convolution reads."""
  n, height, width, c = x.shape
  out_h, out_w = (height + 2 - 4) // stride + 1, (width + 2 - 4) // stride + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [lax.slice(padded, (0, u, v, 0),
                    (n, u + stride * (out_h - 1) + 1, v + stride * (out_w - 1) + 1, c),
                    (1, stride, stride, 1))
          for u in range(4) for v in range(4)]
  return jnp.stack(taps, axis=3).reshape(n, out_h, out_w, 16 * c)


def _unpatch(cols: Array, x_shape: tuple, stride: int) -> Array:
  """The adjoint of `_patches`: adds each window's 16 taps back where they were read."""
  n, height, width, c = x_shape
  _, out_h, out_w, _ = cols.shape
  cols = cols.reshape(n, out_h, out_w, 4, 4, c)
  padded = jnp.zeros((n, height + 2, width + 2, c), cols.dtype)
  for u in range(4):
    for v in range(4):
      padded = padded.at[:, u:u + stride * (out_h - 1) + 1:stride,
                         v:v + stride * (out_w - 1) + 1:stride].add(cols[:, :, :, u, v])
  return padded[:, 1:-1, 1:-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv4x4_matmul(x: Array, kernel: Array, stride: int) -> Array:
  """The same convolution as one matmul of the input's 4x4 windows with the
  kernel, and gradients that are matmuls too. Where a layer has a few pixels and
  a large kernel (near the U-Net's bottleneck) this reads the kernel in place,
  which XLA:CPU's convolutions do not."""
  return _conv4x4_matmul_fwd(x, kernel, stride)[0]


def _conv4x4_matmul_fwd(x, kernel, stride):
  windows = _patches(x, stride)
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  y = _dot(windows, kernel.reshape(16 * c_in, c_out), ((3,), (0,)))
  return y.astype(x.dtype), (windows, kernel, x.shape)


def _conv4x4_matmul_bwd(stride, residuals, grad):
  windows, kernel, x_shape = residuals
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  flat_kernel = kernel.reshape(16 * c_in, c_out)
  x_grad = _unpatch(_dot(grad, flat_kernel, ((3,), (1,))), x_shape, stride)
  kernel_grad = _dot(windows.reshape(-1, 16 * c_in), grad.reshape(-1, c_out), ((0,), (0,)))
  return x_grad.astype(kernel.dtype), kernel_grad.reshape(kernel.shape).astype(kernel.dtype)


conv4x4_matmul.defvjp(_conv4x4_matmul_fwd, _conv4x4_matmul_bwd)


def _blocks(x: Array) -> Array:
  """[N, H, W, C] padded by one -> its 2x2 blocks [N, H/2 + 1, W/2 + 1, (row, col, C)]."""
  n, height, width, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  blocks = padded.reshape(n, height // 2 + 1, 2, width // 2 + 1, 2, c)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, height // 2 + 1, width // 2 + 1, 4 * c)


def _space_to_depth_conv(x: Array, kernel: Array) -> Array:
  """The stride-2 convolution as a stride-1 2x2 convolution of the padded input's
  2x2 blocks (space-to-depth: [N, H/2 + 1, W/2 + 1, 4 * C]) with the kernel's
  taps regrouped the same way. Output row o reads padded rows 2o..2o+3, which
  are exactly blocks o and o + 1."""
  c = x.shape[-1]
  taps = kernel.reshape(2, 2, 2, 2, c, kernel.shape[-1]).transpose(0, 2, 1, 3, 4, 5)
  return lax.conv_general_dilated(_blocks(x), taps.reshape(2, 2, 4 * c, kernel.shape[-1]),
                                  (1, 1), "VALID", dimension_numbers=_NHWC)


@jax.custom_vjp
def conv4x4_s2(x: Array, kernel: Array) -> Array:
  """The stride-2 convolution, XLA's forward pass and kernel gradient, and the
  input gradient of its space-to-depth form: a stride-1 convolution, where
  XLA's own input gradient of a stride-2 convolution is a dilated one, 2-3x
  slower at batch 4 on the 128 and 64 px layers (and no faster elsewhere)."""
  return conv4x4_xla(x, kernel, 2)


def _conv4x4_s2_fwd(x, kernel):
  return conv4x4_xla(x, kernel, 2), (x, kernel)


def _conv4x4_s2_bwd(residuals, grad):
  x, kernel = residuals
  x_grad = upsample_space_to_depth(grad, jnp.swapaxes(kernel, 2, 3))
  _, kernel_vjp = jax.vjp(lambda kernel: conv4x4_xla(x, kernel, 2), kernel)
  (kernel_grad,) = kernel_vjp(grad)
  return x_grad, kernel_grad


conv4x4_s2.defvjp(_conv4x4_s2_fwd, _conv4x4_s2_bwd)


def _taps_matrix(kernel: Array) -> Array:
  """[4, 4, C_in, C_out] -> [C_in, (u, v, C_out)]: every input channel times the 16 taps."""
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  return kernel.transpose(2, 0, 1, 3).reshape(c_in, 16 * c_out)


def conv4x4_taps(x: Array, kernel: Array) -> Array:
  """The stride-1 convolution as one matmul of every pixel with the kernel's 16
  taps and a sum of the taps' shifted products: for a few output channels (the
  PatchGAN's logits), where XLA's own kernel gradient is 5-10x slower."""
  n, height, width, _ = x.shape
  c_out = kernel.shape[-1]
  taps = _dot(x, _taps_matrix(kernel), ((3,), (0,)))
  taps = jnp.pad(taps.reshape(n, height, width, 4, 4, c_out),
                 ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  # out[i, j] = sum_uv padded_x[i + u, j + v] @ kernel[u, v]
  y = sum(taps[:, u:u + height - 1, v:v + width - 1, u, v] for u in range(4) for v in range(4))
  return y.astype(x.dtype)


# Winograd's minimal filtering F(2, 4) for the stride-1 convolution: two outputs
# of a 4-tap correlation from five inputs with five products instead of eight,
# y = A^T [(G g) * (B^T d)] (Toom-Cook on the points 0, 1, -1, 2 and infinity).
# In 2-D a 2x2 output tile costs 25 products per channel pair instead of 64, so
# the convolution is 25 matmuls [tiles, C_in] x [C_in, C_out] between linear
# transforms of the input tiles, the kernel and the products. The rows of B^T
# are scaled to integers (and those of G by the inverse), so the input
# transform adds no rounding of its own.
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
  taps = _dot(_winograd_g2(), kernel.reshape(16, c_in * c_out), ((1,), (0,)))
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
  products = [_dot(tile, tap, ((3,), (0,))) for tile, tap in zip(tiles, taps)]
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
  grad_tiles = [_dot(g, tap, ((3,), (1,))) for g, tap in zip(grad_products, taps)]
  grad_taps = jnp.stack([_dot(tile, g, ((0, 1, 2), (0, 1, 2)))
                         for tile, g in zip(tiles, grad_products)])
  tiles_t = jax.linear_transpose(
      _winograd_tiles, jax.ShapeDtypeStruct((n, height, width, c_in), jnp.float32))
  (x_grad,) = tiles_t(grad_tiles)
  kernel_grad = _dot(_winograd_g2(), grad_taps.reshape(25, c_in * c_out), ((0,), (0,)))
  return (x_grad.astype(grad.dtype),
          kernel_grad.reshape(4, 4, c_in, c_out).astype(taps.dtype))


conv4x4_winograd.defvjp(_conv4x4_winograd_fwd, _conv4x4_winograd_bwd)


def conv4x4_auto(x: Array, kernel: Array, stride: int) -> Array:
  """The same convolution in the form XLA:CPU runs fastest for the layer's shapes.

  Measured per layer (unet_256 and the 70x70 PatchGAN, batch 1 and 4): the
  matmul form wins where the output has at most twice as many pixels as
  channels (the encoder's inner levels, 2-8x faster at the 4x4 and 2x2 ones)
  and on 3-channel images; `conv4x4_s2` for the other stride-2 layers;
  `conv4x4_winograd` for the stride-1 ones with 16 or more channels in and out
  (the PatchGAN's widest layer: 1.6x faster forward, 1.4x input gradient, 1.6x
  all three passes at batch 4), `conv4x4_taps` for those with fewer than 16
  out (its logits: 5x faster with both gradients) and XLA's convolution for
  the rest.
  """
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  if stride == 1:
    if c_out < 16:
      return conv4x4_taps(x, kernel)
    if c_in >= 16:
      return conv4x4_winograd(x, kernel)
    return conv4x4_xla(x, kernel, stride)
  out_pixels = x.shape[0] * (x.shape[1] // stride) * (x.shape[2] // stride)
  if out_pixels <= 2 * c_out or c_in <= 3:
    return conv4x4_matmul(x, kernel, stride)
  if x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
    return conv4x4_s2(x, kernel)
  return conv4x4_xla(x, kernel, stride)


_CONV = {"auto": conv4x4_auto, "xla": conv4x4_xla}


class Conv4x4(nn.Module):
  """Conv2d(kernel 4, padding 1), with nn.Conv's parameters: kernel [4, 4, C_in, C_out], bias.

  `impl` `xla` is XLA's convolution and its autodiff; `auto` picks per layer
  between it and `conv4x4_matmul`, which agree to float rounding.
  """
  features: int
  stride: int
  use_bias: bool
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _weight_init, (4, 4, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    _check_choice("conv_impl", self.impl, CONV_IMPLS)
    y = _CONV[self.impl](x, kernel, self.stride)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def _conv4x4(features: int, stride: int, use_bias: bool, impl: str, dtype: Dtype,
             name: str) -> nn.Module:
  return Conv4x4(features, stride, use_bias, impl, dtype, name=name)


# Sub-pixel form of a 4x4, stride-2, padding-1 transposed convolution. Output
# row 2m takes input rows m-1 and m through kernel rows 3 and 1; output row
# 2m+1 takes input rows m and m+1 through kernel rows 2 and 0. Each of the four
# output phases is therefore a 2x2 stride-1 convolution. The taps are strided
# slices (not an index gather), which XLA copies as contiguous blocks.
_PHASE_TAPS = ((slice(3, None, -2), (1, 0)), (slice(2, None, -2), (0, 1)))


def upsample_subpixel(x: Array, kernel: Array) -> Array:
  """4x4/stride-2/padding-1 transposed convolution as four 2x2 convolutions.

  Args:
    x: [N, H, W, C_in].
    kernel: [4, 4, C_in, C_out], PyTorch ConvTranspose2d semantics
      (`out[2i - 1 + u, 2j - 1 + v] += x[i, j] @ kernel[u, v]`).
  Returns:
    [N, 2H, 2W, C_out].
  """
  n, h, w, _ = x.shape
  rows = []
  for row_taps, row_pad in _PHASE_TAPS:
    phases = []
    for col_taps, col_pad in _PHASE_TAPS:
      phases.append(lax.conv_general_dilated(x, kernel[row_taps, col_taps], (1, 1),
                                             (row_pad, col_pad), dimension_numbers=_NHWC))
    rows.append(jnp.stack(phases, axis=3))       # [N, H, W, 2 (col phase), C]
  out = jnp.stack(rows, axis=2)                  # [N, H, 2 (row phase), W, 2, C]
  return out.reshape(n, 2 * h, 2 * w, kernel.shape[-1])


def upsample_space_to_depth(x: Array, kernel: Array) -> Array:
  """The same transposed convolution as the adjoint of a stride-2 convolution in
  its space-to-depth form (`_space_to_depth_conv` with the kernel's channel axes
  swapped): one stride-1 2x2 convolution that writes all four phases of each
  output pixel's 2x2 block, then depth-to-space."""
  n, h, w, _ = x.shape
  image = jax.ShapeDtypeStruct((n, 2 * h, 2 * w, kernel.shape[-1]), x.dtype)
  (y,) = jax.linear_transpose(lambda z: _space_to_depth_conv(z, jnp.swapaxes(kernel, 2, 3)),
                              image)(x)
  return y


def upsample_dilated(x: Array, kernel: Array) -> Array:
  """The same transposed convolution written the usual way: a stride-1
  convolution of the 2x-dilated input with the spatially flipped kernel."""
  return lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), ((2, 2), (2, 2)),
                                  lhs_dilation=(2, 2), dimension_numbers=_NHWC)


# The `auto` form: the same result with a hand-written VJP that picks, from the
# layer's shapes, the formulation XLA:CPU runs fastest. XLA runs a matmul with
# its operands in row-major [M, K] x [K, N] form and copies whatever is not;
# near the U-Net's bottleneck the kernels dwarf the activations (1024x512x16
# weights against a few pixels), so there the forward pass and both gradients
# are matmuls batched over the 16 kernel taps that read and write the kernel
# where it lies, and only activations are transposed. Elsewhere the forward
# pass is one matmul and an overlap-add of its products (or, where those pass
# 32 MiB, the space-to-depth form), the input gradient a stride-2 convolution
# on XLA's fast path, and the kernel gradient one matmul of the input with the
# gradient's 4x4 windows: XLA's own weight gradients of these convolutions are
# several times slower.


def _overlap_add(cols: Array) -> Array:
  """[N, h, w, 4, 4, C] -> [N, 2h, 2w, C]: out[2i - 1 + u, 2j - 1 + v] += cols[i, j, u, v].

  The adjoint of `_patches(., 2)`. With u = 2a + p, tap (a, p) lands on row
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


def _kernel_major(x: Array, c_out: int) -> bool:
  # Measured on XLA:CPU: the tap-batched matmuls win once the output channels
  # outnumber twice the input pixels (unet_256 at batch 1: the 4 innermost levels).
  return c_out > 2 * x.shape[0] * x.shape[1] * x.shape[2]


def _large_windows(x: Array, c_out: int) -> bool:
  # The matmul forward's products and the kernel gradient's windows are both
  # [pixels, 16 * C_out], copied and summed at memory speed; past 2**23 values
  # (unet_256 at batch 4, the 64 px level) the space-to-depth forms are up to 2x
  # faster. The outermost layer (3 channels) always takes the matmul.
  return c_out > 16 and x.shape[0] * x.shape[1] * x.shape[2] * 16 * c_out > 2 ** 23


def upsample_cols(x: Array, kernel: Array) -> Array:
  """The same transposed convolution as one matmul (every pixel times the kernel's
  16 taps) and an overlap-add of the products."""
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  cols = _dot(x, _taps_matrix(kernel), ((3,), (0,)))
  return _overlap_add(cols.reshape(n, h, w, 4, 4, c_out)).astype(x.dtype)


def _upsample_auto_forward(x: Array, kernel: Array) -> Array:
  if not _kernel_major(x, kernel.shape[-1]):
    if _large_windows(x, kernel.shape[-1]):
      return upsample_space_to_depth(x, kernel)
    return upsample_cols(x, kernel)
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  pixels = jnp.broadcast_to(x.reshape(1, n * h * w, c_in), (16, n * h * w, c_in))
  cols = _dot(pixels, kernel.reshape(16, c_in, c_out), ((2,), (1,)), ((0,), (0,)))
  cols = cols.reshape(4, 4, n, h, w, c_out).transpose(2, 3, 4, 0, 1, 5)
  return _overlap_add(cols).astype(x.dtype)


@jax.custom_vjp
def upsample_auto(x: Array, kernel: Array) -> Array:
  """The same transposed convolution, with a VJP chosen for speed on XLA:CPU.

  Args and result as `upsample_subpixel`; the formulations are described above.
  """
  return _upsample_auto_forward(x, kernel)


def _upsample_auto_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return _upsample_auto_forward(x, kernel), (x, kernel)


def _upsample_auto_bwd(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  pixels = n * h * w
  if _kernel_major(x, c_out):
    taps = _patches(grad, 2).reshape(pixels, 16, c_out)
    # [16, C_in, C_out] x [16, C_out, M] -> [16, C_in, M], summed over the taps.
    x_grad = _dot(kernel.reshape(16, c_in, c_out), taps.transpose(1, 2, 0), ((2,), (1,)),
                  ((0,), (0,))).sum(axis=0).T.reshape(n, h, w, c_in)
    x_taps = jnp.broadcast_to(x.reshape(1, pixels, c_in).transpose(0, 2, 1), (16, c_in, pixels))
    kernel_grad = _dot(x_taps, taps.transpose(1, 0, 2), ((2,), (1,)), ((0,), (0,)))
    kernel_grad = kernel_grad.reshape(4, 4, c_in, c_out)
  else:
    # x_grad[i] = sum_uv grad[2i - 1 + u, 2j - 1 + v] @ kernel[u, v]^T: a stride-2
    # convolution that reads the kernel as [H, W, O, I]; where it has fewer pixels
    # than channels, one matmul of the gradient's windows (as `conv4x4_matmul`).
    large = _large_windows(x, c_out)
    windows = None if large and pixels > c_in else _patches(grad, 2)   # [N, h, w, 16 * C_out]
    if pixels <= c_in:
      # The forward pass's `_taps_matrix`, read transposed: one copy of the kernel, not two.
      x_grad = _dot(windows, _taps_matrix(kernel), ((3,), (1,)))
    else:
      x_grad = lax.conv_general_dilated(grad, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWOI", "NHWC"))
    flat_x = x.reshape(pixels, c_in)
    if large:
      # The windows as four shifted views of the gradient's 2x2 blocks, not
      # sixteen strided slices: tap u = 2a + p is block row i + a, phase p.
      blocks = _blocks(grad)
      parts = [_dot(flat_x, blocks[:, a:a + h, b:b + w].reshape(pixels, 4 * c_out), ((0,), (0,)))
               for a in range(2) for b in range(2)]
      kernel_grad = jnp.stack(parts).reshape(2, 2, c_in, 2, 2, c_out)   # [a, b, C_in, p, q, C_out]
      kernel_grad = kernel_grad.transpose(0, 3, 1, 4, 2, 5).reshape(4, 4, c_in, c_out)
    else:
      kernel_grad = _dot(flat_x, windows.reshape(pixels, 16 * c_out), ((0,), (0,)))
      kernel_grad = kernel_grad.reshape(c_in, 4, 4, c_out).transpose(1, 2, 0, 3)
  return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


upsample_auto.defvjp(_upsample_auto_fwd, _upsample_auto_bwd)

_UPSAMPLE = {"auto": upsample_auto, "subpixel": upsample_subpixel, "dilated": upsample_dilated}


class UpConv(nn.Module):
  """ConvTranspose2d(kernel 4, stride 2, padding 1): doubles H and W.

  The kernel is stored as [4, 4, C_in, C_out] (PyTorch's [C_in, C_out, 4, 4]
  transposed), so all implementations share parameters and agree to float
  rounding. `auto` has its own VJP, several times faster on XLA:CPU;
  `subpixel` and `dilated` leave both gradients to XLA's autodiff.
  """
  features: int
  use_bias: bool = False
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _check_choice("upconv_impl", self.impl, UPCONV_IMPLS)
    kernel = self.param("kernel", _weight_init, (4, 4, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = _UPSAMPLE[self.impl](x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def _dropout_levels(num_downs: int, placement: str) -> set[int]:
  """U-Net levels (0 = outermost) whose up-convolution output gets dropout.

  `pytorch`: the 512-wide blocks between the four outer levels and the
  innermost one (outputs of 4, 8 and 16 px for unet_256), as the official
  PyTorch code. `paper`: the three innermost up-convolutions (2, 4 and 8 px),
  as the paper and the Lua code.
  """
  if placement == "pytorch":
    return set(range(4, num_downs - 1))
  return set(range(max(num_downs - 3, 1), num_downs))


class UNetGenerator(nn.Module):
  """U-Net generator: [N, H, W, C_in] in [-1, 1] -> [N, H, W, output_nc] in [-1, 1].

  `num_downs` stride-2 levels (8 = unet_256, 7 = unet_128), so H and W must be
  multiples of 2**num_downs. `skip_connections=False` removes the skips and
  gives the paper's encoder-decoder ablation.
  """
  num_downs: int = 8
  ngf: int = 64
  output_nc: int = 3
  norm: str = "batch"
  dropout_rate: float = 0.5
  dropout_placement: str = "pytorch"
  skip_connections: bool = True
  upconv_impl: str = "auto"
  conv_impl: str = "auto"
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, use_running_average: bool = False,
               deterministic: bool = False) -> Array:
    _check_choice("norm", self.norm, NORMS)
    _check_choice("dropout_placement", self.dropout_placement, DROPOUT_PLACEMENTS)
    check_image_size(x.shape[1:3], self.num_downs)
    widths = [self.ngf, self.ngf * 2, self.ngf * 4] + [self.ngf * 8] * (self.num_downs - 3)
    # As in the official code, only non-BatchNorm variants give the convolutions a bias.
    use_bias = self.norm != "batch"
    dropout_levels = _dropout_levels(self.num_downs, self.dropout_placement)

    def norm(h, name):
      return _normalize(h, self.norm, use_running_average, self.bn_axis_name, name)

    h = _conv4x4(widths[0], 2, use_bias, self.conv_impl, self.dtype, "down_0")(x)
    skips = []
    for level in range(1, self.num_downs):
      skips.append(h)
      h = _conv4x4(widths[level], 2, use_bias, self.conv_impl, self.dtype, f"down_{level}")(
          nn.leaky_relu(h, _LEAKY_SLOPE))
      if level < self.num_downs - 1:           # the innermost down-conv has no norm
        h = norm(h, f"down_norm_{level}")

    for level in reversed(range(self.num_downs)):
      if level < self.num_downs - 1 and self.skip_connections:
        h = jnp.concatenate([skips[level], h], axis=-1)
      outermost = level == 0
      features = self.output_nc if outermost else widths[level - 1]
      h = UpConv(features, use_bias=use_bias or outermost, impl=self.upconv_impl,
                 dtype=self.dtype, name=f"up_{level}")(nn.relu(h))
      if outermost:
        break
      h = norm(h, f"up_norm_{level}")
      if level in dropout_levels and self.dropout_rate > 0:
        h = nn.Dropout(self.dropout_rate, deterministic=deterministic)(h)
    return jnp.tanh(h.astype(jnp.float32))


def check_image_size(size: Sequence[int], num_downs: int) -> None:
  """Raises a clear error unless both sides are positive multiples of 2**num_downs."""
  multiple = 2 ** num_downs
  height, width = int(size[0]), int(size[1])
  if height % multiple or width % multiple or height <= 0 or width <= 0:
    def up(v):
      return max(multiple, math.ceil(v / multiple) * multiple)
    raise ValueError(
        f"Image size {height}x{width} does not fit a U-Net with num_downs={num_downs}: both "
        f"sides must be multiples of {multiple}. Resize or crop to e.g. {up(height)}x{up(width)} "
        f"(config.data.crop_size), or lower config.model.num_downs.")


class PatchDiscriminator(nn.Module):
  """PatchGAN: one real/fake logit per overlapping patch, no sigmoid.

  `n_layers` 1, 3, 5 give the paper's 16x16, 70x70 and 286x286 receptive
  fields; `pixel=True` is the 1x1 PixelGAN. Conditional (the default): the
  input image and the judged image are concatenated on channels, as D(x, y);
  `conditional=False` judges the image alone (the paper's "GAN" ablation).

  Input: real_a [N, H, W, C_in], image [N, H, W, C_out], both in [-1, 1].
  Output: logits [N, H', W', 1] (30x30 for the default at 256x256).
  """
  n_layers: int = 3
  ndf: int = 64
  norm: str = "batch"
  pixel: bool = False
  conditional: bool = True
  conv_impl: str = "auto"
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, real_a: Array, image: Array, *, use_running_average: bool = False) -> Array:
    _check_choice("norm", self.norm, NORMS)
    x = jnp.concatenate([real_a, image], axis=-1) if self.conditional else image
    use_bias = self.norm != "batch"

    def norm(h, name):
      return _normalize(h, self.norm, use_running_average, self.bn_axis_name, name)

    if self.pixel:
      def conv1x1(features, bias, name):
        return nn.Conv(features, (1, 1), use_bias=bias, kernel_init=_weight_init,
                       dtype=self.dtype, name=name)
      h = nn.leaky_relu(conv1x1(self.ndf, True, "conv_0")(x), _LEAKY_SLOPE)
      h = nn.leaky_relu(norm(conv1x1(self.ndf * 2, use_bias, "conv_1")(h), "norm_1"),
                        _LEAKY_SLOPE)
      return conv1x1(1, use_bias, "conv_2")(h).astype(jnp.float32)

    if self.n_layers < 1:
      raise ValueError(f"n_layers={self.n_layers} must be at least 1 (or use pixel=True).")
    h = _conv4x4(self.ndf, 2, True, self.conv_impl, self.dtype, "conv_0")(x)
    h = nn.leaky_relu(h, _LEAKY_SLOPE)
    for layer in range(1, self.n_layers + 1):
      stride = 2 if layer < self.n_layers else 1
      features = self.ndf * min(2 ** layer, 8)
      h = _conv4x4(features, stride, use_bias, self.conv_impl, self.dtype, f"conv_{layer}")(h)
      h = nn.leaky_relu(norm(h, f"norm_{layer}"), _LEAKY_SLOPE)
    logits = _conv4x4(1, 1, True, self.conv_impl, self.dtype, f"conv_{self.n_layers + 1}")(h)
    return logits.astype(jnp.float32)


def receptive_field(n_layers: int, pixel: bool = False) -> int:
  """Side of the input patch that one logit of the PatchGAN sees."""
  if pixel:
    return 1
  field = 1
  for stride in reversed([2] * n_layers + [1, 1]):   # walk back from the last conv
    field = (field - 1) * stride + 4
  return field


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
