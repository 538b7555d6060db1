"""The one place that picks a form for a layer: by backend, then by the layer's shapes.

`auto` (the config's default) resolves per backend (`conv_impl_for`,
`conv_transpose_impl_for`): on `cpu` to `by_shape`, the per-layer forms below;
on `gpu` and `tpu` (and any other accelerator) to XLA's own convolution and
transposed convolution, the path cuDNN and the TPU's convolution emitter are
built for. Every `by_shape` rule was measured on XLA:CPU, layer by layer, for
unet_256 and the 70x70 PatchGAN at batch 1 and 4 (README, Speed); none has been
measured faster on an accelerator, where `by_shape` can still be asked for by
name. The forms compute the same function to float rounding, so a rule changes
only speed.

`recording()` collects, for every layer traced inside it, its kind, the form it
runs and its forward FLOPs: the training log, the benchmark and the model-FLOP
count read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import jax.numpy as jnp

from p2p_jax import hardware

Shape = Sequence[int]

BACKENDS = ("cpu", "gpu", "tpu")


def conv_impl_for(impl: str, backend: str) -> str:
  """The convolution impl that `impl` means on `backend`: `auto` resolved, others as they are."""
  if impl != "auto":
    return impl
  return "by_shape" if backend == "cpu" else "xla"


def conv_transpose_impl_for(impl: str, backend: str) -> str:
  """The transposed-convolution impl `impl` means on `backend` (`dilated` is XLA's own)."""
  if impl != "auto":
    return impl
  return "by_shape" if backend == "cpu" else "dilated"


@dataclasses.dataclass(frozen=True)
class Layer:
  kind: str      # "conv4x4", "conv_transpose4x4" or "conv1x1"
  form: str      # the form it runs: a `CONV_FORMS` / `CONV_TRANSPOSE_FORMS` name, or an impl
  flops: int     # of its forward pass: 2 x multiply-adds
  x_shape: tuple[int, ...] = ()        # its input, [N, H, W, C_in]
  kernel_shape: tuple[int, ...] = ()   # [kh, kw, C_in, C_out]
  stride: int = 1
  dtype: str = "float32"               # of its operands


_recorders: list[list[Layer]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Layer]]:
  """Yields a list that fills with a `Layer` per linear layer traced inside the block."""
  layers: list[Layer] = []
  _recorders.append(layers)
  try:
    yield layers
  finally:
    _recorders.remove(layers)


def note(kind: str, form: str, flops: int, x: Any, kernel: Any, stride: int = 1) -> None:
  """Called by the ops as they trace a layer (`x` and `kernel` its operands, or anything
  with their shape and dtype); a no-op outside `recording()`."""
  for layers in _recorders:
    layers.append(Layer(kind, form, int(flops), tuple(x.shape), tuple(kernel.shape), stride,
                        str(x.dtype)))

# Forms of the 4x4, padding-1 convolution (`p2p_jax.ops.conv`).
CONV_FORMS = ("xla", "matmul", "s2", "taps", "winograd", "nested")
# Forms of the 4x4, stride-2, padding-1 transposed convolution under `auto`
# (`p2p_jax.ops.conv_transpose`).
CONV_TRANSPOSE_FORMS = ("kernel_major", "space_to_depth", "cols", "blocks")


def dots_only(dtype: Any) -> bool:
  """Whether operands of `dtype` should meet only dots: bfloat16 on a CPU with bfloat16
  units (`hardware.cpu_bfloat16_units`), whose XLA:CPU dots reach those units and whose
  convolutions do not."""
  return jnp.dtype(dtype) == jnp.bfloat16 and hardware.cpu_bfloat16_units()


def in_float32(kind: str, x_shape: Shape, stride: int = 2, dtype: Any = "float32") -> bool:
  """Whether a bfloat16 layer runs in float32 instead (its input cast up, its output
  rounded once to bfloat16), on a CPU with bfloat16 units (`dots_only`): a layer with
  so few pixels that its kernel is most of what it reads (the U-Net's innermost
  levels). In bfloat16 it would cast the float32 kernel and lay it out anew every
  step, and XLA:CPU's bfloat16 dots of a few rows run slower than its float32 ones;
  in float32 it reads the stored kernel in place: 1.2-2.2x faster with both
  gradients at batch 1 to 8 for a convolution (`kind` "conv4x4") with at most 8
  output pixels and a transposed convolution with at most 32 input pixels
  (`python -m p2p_jax.bench --mode=layers` times both ways). Float32 only adds
  precision to the policy.
  """
  if not dots_only(dtype):
    return False
  n, height, width = x_shape[0], x_shape[1], x_shape[2]
  if kind == "conv4x4":
    return n * ((height - 2) // stride + 1) * ((width - 2) // stride + 1) <= 8
  return n * height * width <= 32


def conv_form(x_shape: Shape, kernel_shape: Shape, stride: int, dtype: Any = "float32") -> str:
  """The form `auto` runs for a convolution of an [N, H, W, C_in] input.

  Stride 1: `taps` below 16 output channels (the PatchGAN's logits: 5x faster
  with both gradients), `winograd` with 16 or more in and out (its widest
  layer: 1.6x faster over the three passes at batch 4), XLA's otherwise.
  Stride 2: `matmul` where the output has at most twice as many pixels as
  channels (the encoder's inner levels, 2-8x faster at the 4x4 and 2x2 ones)
  and on 3-channel images, `s2` on even sides elsewhere, XLA's on odd sides.
  In bfloat16 on a CPU with bfloat16 units (`dots_only`), dots everywhere:
  `matmul` at stride 2, `taps` for the logits, `nested` Winograd for a wide
  stride-1 layer with 512 or more 2x2 output tiles, `matmul` below that.
  """
  n, height, width = x_shape[0], x_shape[1], x_shape[2]
  c_in, c_out = kernel_shape[2], kernel_shape[3]
  if dots_only(dtype):
    if stride == 2:      # windows x kernel
      return "matmul"
    if c_out < 16:       # the logits layer
      return "taps"
    # Winograd's F(2x2, 4x4) rounds nine times as coarsely as a direct convolution in
    # bfloat16; the nested form twice, and it wins once there are 512 2x2 tiles (the
    # PatchGAN's widest layer at 4x256: 1.4x faster with both gradients).
    tiles = n * (height // 2) * (width // 2)
    return "nested" if c_in >= 16 and tiles >= 512 else "matmul"
  if stride == 1:
    if c_out < 16:
      return "taps"
    return "winograd" if c_in >= 16 else "xla"
  out_pixels = n * (height // stride) * (width // stride)
  if out_pixels <= 2 * c_out or c_in <= 3:
    return "matmul"
  if height % 2 == 0 and width % 2 == 0:
    return "s2"
  return "xla"


def conv_transpose_form(x_shape: Shape, c_out: int, dtype: Any = "float32") -> str:
  """The form `auto` runs for a transposed convolution of an [N, H, W, C_in] input.

  `kernel_major` once the output channels outnumber twice the input pixels
  (unet_256 at batch 1: the 4 innermost levels), where matmuls batched over the
  16 taps read the large kernel in place. `space_to_depth` where the `cols`
  form's [pixels, 16 * C_out] products pass 2**23 values (unet_256 at batch 4,
  the 64 px level: up to 2x faster; never the 3-channel outermost layer).
  `cols` (one matmul and an overlap-add) everywhere else.
  """
  pixels = x_shape[0] * x_shape[1] * x_shape[2]
  if c_out > 2 * pixels:
    return "kernel_major"
  if dots_only(dtype):
    return "cols"
  if c_out > 16 and pixels * 16 * c_out > 2 ** 23:
    return "space_to_depth"
  return "cols"

