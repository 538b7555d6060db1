"""The pix2pix networks: a U-Net generator and a PatchGAN discriminator.

Flax linen modules on NHWC images. Layer widths, bias rules and initialisation
follow the paper and the authors' code: 4x4 convolutions with stride 2 and
padding 1, weights N(0, 0.02), BatchNorm scale N(1, 0.02), no convolution bias
in front of a BatchNorm (nor on the U-Net's un-normalised first and innermost
down-convolutions), LeakyReLU(0.2) on the way down and ReLU on the way up.

The layers' linear maps come from `p2p_jax.ops` (Conv2d(4, padding 1) and
ConvTranspose2d(4, stride 2, padding 1) in several forms that compute the same
function; `model.conv_impl` and `model.upconv_impl` choose, `auto` per layer).

Both networks take two keyword flags:
  use_running_average: BatchNorm uses running statistics instead of the batch's.
  deterministic:       dropout is off (generator only).
and the generator a third, for test time: `per_image_statistics`, BatchNorm
normalises each image with its own statistics, as if run as a batch of one.
The paper runs the generator at test time exactly as in training (batch
statistics, dropout on); `use_running_average=deterministic=True` is the
official `--eval` mode.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from p2p_jax import ops
from p2p_jax.validation import check_choice

Array = jax.Array
Dtype = Any

NORMS = ("batch", "instance", "none")
DROPOUT_PLACEMENTS = ("pytorch", "paper")
UPCONV_IMPLS = ops.UPCONV_IMPLS
CONV_IMPLS = ops.CONV_IMPLS

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
  def __call__(self, x: Array, use_running_average: bool, per_image: bool = False) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", _scale_init, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    if not use_running_average and not per_image:
      # Outside pmap (at init) there is no axis to average over; on one device, nothing to.
      synced = (self.axis_name is not None and not self.is_initializing()
                and lax.axis_size(self.axis_name) > 1)
      axis_name = self.axis_name if synced else None
      y, mean, var = ops.batch_normalize(x, scale, bias, self.epsilon, axis_name)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        mean, var = lax.stop_gradient((mean, var))
        count = ops.pixel_count(x, axis_name)
        unbiased_var = var * (count / jnp.maximum(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
      return y
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      # Each image with its own statistics, as a batch of one (test time only).
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    inv = scale * lax.rsqrt(var + self.epsilon)
    return (x * inv.astype(x.dtype) + (bias - mean * inv).astype(x.dtype))


def _normalize(x: Array, norm: str, use_running_average: bool, axis_name: str | None,
               name: str, per_image: bool = False) -> Array:
  if norm == "batch":
    return BatchNorm(axis_name=axis_name, name=name)(x, use_running_average, per_image)
  if norm == "instance":
    # PyTorch's InstanceNorm2d default: no affine parameters, no running statistics.
    return nn.InstanceNorm(epsilon=_NORM_EPSILON, use_scale=False, use_bias=False,
                           use_fast_variance=False, name=name)(x)
  return x


def _add_bias(module: nn.Module, y: Array) -> Array:
  """y + the module's bias parameter, [C_out], added in float32 and rounded once to y's
  dtype: the bias's gradient, a sum over every pixel, is then summed in float32 (a
  bfloat16 sum XLA:CPU runs as a slow windowed reduction, and rounds)."""
  bias = module.param("bias", nn.initializers.zeros, (y.shape[-1],))
  return (y.astype(jnp.float32) + bias).astype(y.dtype)


class Conv4x4(nn.Module):
  """Conv2d(kernel 4, padding 1), with nn.Conv's parameters: kernel [4, 4, C_in, C_out], bias.

  `impl` (`ops.CONV_IMPLS`): `xla` is XLA's convolution and its autodiff;
  `by_shape` picks a form per layer (`ops.choose.conv_form`); `auto` is `by_shape`
  on the CPU and `xla` on accelerators.
  """
  features: int
  stride: int
  use_bias: bool
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _weight_init, (4, 4, x.shape[-1], self.features))
    # The float32 kernel goes in as it is: the ops cast it to x's dtype and return its
    # gradient in float32, unrounded.
    y = ops.conv4x4(x.astype(self.dtype), kernel, self.stride, self.impl)
    if self.use_bias:
      y = _add_bias(self, y)
    return y


def _conv4x4(features: int, stride: int, use_bias: bool, impl: str, dtype: Dtype,
             name: str) -> nn.Module:
  return Conv4x4(features, stride, use_bias, impl, dtype, name=name)


class Conv1x1(nn.Module):
  """Conv2d(kernel 1), with nn.Conv's parameters: kernel [1, 1, C_in, C_out], bias."""
  features: int
  use_bias: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _weight_init, (1, 1, x.shape[-1], self.features))
    y = ops.conv1x1(x.astype(self.dtype), kernel)
    if self.use_bias:
      y = _add_bias(self, y)
    return y


class UpConv(nn.Module):
  """ConvTranspose2d(kernel 4, stride 2, padding 1): doubles H and W.

  The kernel is stored as [4, 4, C_in, C_out] (PyTorch's [C_in, C_out, 4, 4]
  transposed), so all implementations share parameters and agree to float
  rounding (`ops.UPCONV_IMPLS`). `by_shape` has its own VJP, several times faster
  on XLA:CPU; `subpixel` and `dilated` (XLA's own) leave both gradients to XLA's
  autodiff; `auto` is `by_shape` on the CPU and `dilated` on accelerators.
  """
  features: int
  use_bias: bool = False
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _weight_init, (4, 4, x.shape[-1], self.features))
    y = ops.conv_transpose4x4(x.astype(self.dtype), kernel, self.impl)
    if self.use_bias:
      y = _add_bias(self, y)
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
               deterministic: bool = False, per_image_statistics: bool = False) -> Array:
    check_choice("norm", self.norm, NORMS)
    check_choice("dropout_placement", self.dropout_placement, DROPOUT_PLACEMENTS)
    check_image_size(x.shape[1:3], self.num_downs)
    widths = [self.ngf, self.ngf * 2, self.ngf * 4] + [self.ngf * 8] * (self.num_downs - 3)
    # As in the official code, only non-BatchNorm variants give the convolutions a bias.
    use_bias = self.norm != "batch"
    dropout_levels = _dropout_levels(self.num_downs, self.dropout_placement)

    def norm(h, name):
      return _normalize(h, self.norm, use_running_average, self.bn_axis_name, name,
                        per_image_statistics)

    h = _conv4x4(widths[0], 2, use_bias, self.conv_impl, self.dtype, "down_0")(x)
    skips = []
    for level in range(1, self.num_downs):
      skips.append(h)
      h = _conv4x4(widths[level], 2, use_bias, self.conv_impl, self.dtype, f"down_{level}")(
          nn.leaky_relu(h, negative_slope=_LEAKY_SLOPE))
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
  if not all(isinstance(side, int) for side in size):
    return   # symbolic sides (jax.export): the export states the multiples in the shape
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
    check_choice("norm", self.norm, NORMS)
    x = jnp.concatenate([real_a, image], axis=-1) if self.conditional else image
    use_bias = self.norm != "batch"

    def norm(h, name):
      return _normalize(h, self.norm, use_running_average, self.bn_axis_name, name)

    if self.pixel:
      def conv1x1(features, bias, name):
        return Conv1x1(features, bias, self.dtype, name=name)
      h = nn.leaky_relu(conv1x1(self.ndf, True, "conv_0")(x), negative_slope=_LEAKY_SLOPE)
      h = nn.leaky_relu(norm(conv1x1(self.ndf * 2, use_bias, "conv_1")(h), "norm_1"),
                        negative_slope=_LEAKY_SLOPE)
      return conv1x1(1, use_bias, "conv_2")(h).astype(jnp.float32)

    if self.n_layers < 1:
      raise ValueError(f"n_layers={self.n_layers} must be at least 1 (or use pixel=True).")
    h = _conv4x4(self.ndf, 2, True, self.conv_impl, self.dtype, "conv_0")(x)
    h = nn.leaky_relu(h, negative_slope=_LEAKY_SLOPE)
    for layer in range(1, self.n_layers + 1):
      stride = 2 if layer < self.n_layers else 1
      features = self.ndf * min(2 ** layer, 8)
      h = _conv4x4(features, stride, use_bias, self.conv_impl, self.dtype, f"conv_{layer}")(h)
      h = nn.leaky_relu(norm(h, f"norm_{layer}"), negative_slope=_LEAKY_SLOPE)
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

