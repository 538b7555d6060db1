"""The networks' two layer kinds as pure functions on arrays, each in several forms.

The pix2pix networks use two linear layers: Conv2d(kernel 4, padding 1) at
stride 2 or 1, and ConvTranspose2d(kernel 4, stride 2, padding 1). Each has
forms that hold the same parameters and compute the same function to float
rounding, most with hand-written VJPs: XLA's own convolution, matmuls of 4x4
windows, space-to-depth convolutions, Winograd's F(2x2, 4x4), taps matmuls.
`by_shape` picks one per layer from the layer's shapes and `auto` picks per
backend (`by_shape` on the CPU, XLA's own on accelerators), by the rules in
`choose`, the one place that decides.

  windows         float32-accumulating dots; windows, blocks and taps of an input
  space_to_depth  a stride-2 convolution as a stride-1 one over 2x2 blocks, and its adjoint
  winograd        the stride-1 convolution by Winograd's F(2x2, 4x4)
  conv            every convolution form; `conv4x4(x, kernel, stride, impl)`, `conv1x1`
  conv_transpose  every transposed-convolution form; `conv_transpose4x4(x, kernel, impl)`
  choose          which form a layer runs, by backend and shapes; recording what ran
  normalize       BatchNorm's normalisation with the batch's statistics, float32 sums

The networks (`p2p_jax.models`) call only `conv4x4`, `conv_transpose4x4`, `conv1x1`,
`batch_normalize` and its `pixel_count`.
"""

from p2p_jax.ops.conv import IMPLS as CONV_IMPLS
from p2p_jax.ops.conv import conv1x1
from p2p_jax.ops.conv import conv4x4
from p2p_jax.ops.conv_transpose import IMPLS as UPCONV_IMPLS
from p2p_jax.ops.conv_transpose import conv_transpose4x4
from p2p_jax.ops.normalize import batch_normalize
from p2p_jax.ops.normalize import pixel_count

__all__ = ["CONV_IMPLS", "UPCONV_IMPLS", "batch_normalize", "conv1x1", "conv4x4",
           "conv_transpose4x4", "pixel_count"]
