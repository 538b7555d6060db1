"""Forms of Conv2d(kernel 4, padding 1) on NHWC images, and `auto`, which picks one per layer.

Each form takes x [N, H, W, C_in] and a kernel [4, 4, C_in, C_out] (HWIO) and
returns [N, H', W', C_out] (H' = H / 2 at stride 2, H - 1 at stride 1); all
compute the same function to float rounding and accumulate in float32. They
compute in x's dtype: a float32 kernel (a network's stored parameter) is cast
to it inside, and its gradient comes back in float32 straight from the
float32 sums, never rounded to the compute dtype on the way.

  xla       XLA's convolution and XLA's autodiff of it.
  matmul    one matmul of the input's 4x4 windows with the kernel; gradients
            as matmuls too (reads a large kernel in place).
  s2        stride 2: XLA's forward pass and kernel gradient, the input
            gradient of the space-to-depth form (a stride-1 convolution).
  taps      stride 1, few output channels: one matmul with the 16 taps and a
            sum of shifted products.
  winograd  stride 1: Winograd's F(2x2, 4x4) (`p2p_jax.ops.winograd`).
  nested    stride 1: F(2x2, 2x2) on each 2x2 quarter of the kernel (the same module):
            fewer multiplies than `matmul`, a smaller bfloat16 error than `winograd`.

`conv4x4` takes an impl (`IMPLS`): `xla`; `by_shape`, the form
`choose.conv_form` names for each layer's shapes (rules measured on XLA:CPU;
in bfloat16, a layer `choose.in_float32` names runs its float32 form);
or `auto`, which is `by_shape` on the CPU and `xla` on accelerators
(`choose.conv_impl_for`). `conv1x1` is the PixelGAN's 1x1 convolution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from p2p_jax.ops import choose
from p2p_jax.ops import space_to_depth
from p2p_jax.ops import windows
from p2p_jax.ops import winograd
from p2p_jax.validation import check_choice

Array = jax.Array

IMPLS = ("auto", "by_shape", "xla")   # config.model.conv_impl


def conv4x4_xla(x: Array, kernel: Array, stride: int) -> Array:
  """Conv2d(kernel 4, padding 1) as XLA writes it and differentiates it."""
  return lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride),
                                  ((1, 1), (1, 1)), dimension_numbers=windows.NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv4x4_matmul(x: Array, kernel: Array, stride: int) -> Array:
  """The same convolution as one matmul of the input's 4x4 windows with the
  kernel, and gradients that are matmuls too. Where a layer has a few pixels and
  a large kernel (near the U-Net's bottleneck) this reads the kernel in place,
  which XLA:CPU's convolutions do not."""
  return _conv4x4_matmul_fwd(x, kernel, stride)[0]


def _conv4x4_matmul_fwd(x, kernel, stride):
  x_windows = windows.patches(x, stride)
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  y = windows.dot(x_windows, kernel.astype(x.dtype).reshape(16 * c_in, c_out), ((3,), (0,)))
  return y.astype(x.dtype), (x_windows, kernel, x.shape)


def _conv4x4_matmul_bwd(stride, residuals, grad):
  x_windows, stored_kernel, x_shape = residuals
  kernel = stored_kernel.astype(grad.dtype)
  n, height, width, c_in = x_shape
  c_out = kernel.shape[3]
  if (stride == 2 and height % 2 == 0 and width % 2 == 0 and c_in >= 16
      and n * height * width > 4 * c_out):
    # The adjoint of a stride-2 convolution is a transposed one: one matmul of the
    # gradient's 2x2 windows (4 C_out values a pixel) in place of the windows
    # gradient (16 C_in values a pixel) and its overlap-add. Not for a few input
    # channels (an image), whose 4 C_in columns are too few for a fast matmul, nor
    # where the kernel, which this form lays out anew, outweighs the activations.
    x_grad = windows.upsample_blocks(grad, jnp.swapaxes(kernel, 2, 3))
  else:
    x_grad = windows.unpatch(windows.dot(grad, kernel.reshape(16 * c_in, c_out), ((3,), (1,))),
                             x_shape, stride)
  kernel_grad = windows.dot_over_pixels(x_windows, grad)
  return x_grad.astype(grad.dtype), kernel_grad.reshape(kernel.shape).astype(stored_kernel.dtype)


conv4x4_matmul.defvjp(_conv4x4_matmul_fwd, _conv4x4_matmul_bwd)


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
  x_grad = space_to_depth.upsample_space_to_depth(grad, jnp.swapaxes(kernel, 2, 3))
  _, kernel_vjp = jax.vjp(lambda kernel: conv4x4_xla(x, kernel, 2), kernel)
  (kernel_grad,) = kernel_vjp(grad)
  return x_grad, kernel_grad


conv4x4_s2.defvjp(_conv4x4_s2_fwd, _conv4x4_s2_bwd)


@jax.custom_vjp
def conv4x4_taps(x: Array, kernel: Array) -> Array:
  """The stride-1 convolution as one matmul of every pixel with the kernel's 16
  taps and a sum of the taps' shifted products: for a few output channels (the
  PatchGAN's logits), where XLA's own kernel gradient is 5-10x slower. Its
  gradients are matmuls with the taps' gradient (the output gradient's 16 shifts)."""
  n, height, width, _ = x.shape
  c_out = kernel.shape[-1]
  taps = windows.dot(x, windows.taps_matrix(kernel.astype(x.dtype)), ((3,), (0,)))
  taps = jnp.pad(taps.reshape(n, height, width, 4, 4, c_out),
                 ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  # out[i, j] = sum_uv padded_x[i + u, j + v] @ kernel[u, v]
  y = sum(taps[:, u:u + height - 1, v:v + width - 1, u, v] for u in range(4) for v in range(4))
  return y.astype(x.dtype)


@windows.as_bits
def _taps_grad(grad: Array) -> Array:
  """[N, H - 1, W - 1, C_out] -> [N, H, W, (u, v, C_out)]: the gradient of tap (u, v)'s
  product at pixel (a, b) is the output gradient at (a + 1 - u, b + 1 - v), or zero."""
  _, height, width, _ = grad.shape
  padded = jnp.pad(grad, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return jnp.concatenate([padded[:, 3 - u:4 - u + height, 3 - v:4 - v + width]
                          for u in range(4) for v in range(4)], axis=3)


def _conv4x4_taps_fwd(x, kernel):
  return conv4x4_taps(x, kernel), (x, kernel)


def _conv4x4_taps_bwd(residuals, grad):
  x, stored_kernel = residuals
  c_in, c_out = stored_kernel.shape[2], stored_kernel.shape[3]
  taps_grad = _taps_grad(grad)
  x_grad = windows.dot(taps_grad, windows.taps_matrix(stored_kernel.astype(grad.dtype)),
                       ((3,), (1,)))
  # A weight gradient as XLA:CPU's bfloat16 dots take it (autodiff's [pixels, C_in]
  # contracted on its first axis ran in float32).
  kernel_grad = windows.dot_over_pixels(x, taps_grad).reshape(c_in, 4, 4, c_out)
  return x_grad.astype(x.dtype), kernel_grad.transpose(1, 2, 0, 3).astype(stored_kernel.dtype)


conv4x4_taps.defvjp(_conv4x4_taps_fwd, _conv4x4_taps_bwd)


def _winograd(algorithm: winograd.Algorithm):
  def stride_1(x: Array, kernel: Array, stride: int) -> Array:
    del stride   # stride 1 only
    return winograd.winograd_conv(x, kernel, algorithm)
  return stride_1


# Every form by name (`choose.CONV_FORMS`): what `conv4x4` runs, and what the layers
# benchmark (`python -m p2p_jax.bench --mode=layers`) times.
FORMS = {"xla": conv4x4_xla, "matmul": conv4x4_matmul,
         "s2": lambda x, kernel, stride: conv4x4_s2(x, kernel),
         "taps": lambda x, kernel, stride: conv4x4_taps(x, kernel),
         "winograd": _winograd(winograd.F2X2_4X4), "nested": _winograd(winograd.NESTED)}


def conv4x4(x: Array, kernel: Array, stride: int, impl: str = "auto",
            backend: str | None = None) -> Array:
  """Conv2d(kernel 4, padding 1, `stride`) as `impl` (`IMPLS`) computes it on `backend`
  (default: JAX's default backend, which `auto` resolves for)."""
  check_choice("conv_impl", impl, IMPLS)
  impl = choose.conv_impl_for(impl, backend or jax.default_backend())
  if impl == "by_shape" and choose.in_float32("conv4x4", x.shape, stride, x.dtype):
    return conv4x4(x.astype(jnp.float32), kernel, stride, impl, backend).astype(x.dtype)
  form = (choose.conv_form(x.shape, kernel.shape, stride, x.dtype) if impl == "by_shape"
          else "xla")
  n, height, width, c_in = x.shape
  out_pixels = n * ((height - 2) // stride + 1) * ((width - 2) // stride + 1)
  choose.note("conv4x4", form, 2 * out_pixels * 16 * c_in * kernel.shape[-1], x, kernel, stride)
  return FORMS[form](x, kernel, stride)


def conv1x1(x: Array, kernel: Array) -> Array:
  """A 1x1 convolution (the PixelGAN's): x [N, H, W, C_in], kernel [1, 1, C_in, C_out]."""
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  choose.note("conv1x1", "matmul", 2 * x.size // c_in * c_in * c_out, x, kernel)
  flat_kernel = kernel.astype(x.dtype).reshape(c_in, c_out)
  return windows.dot(x, flat_kernel, ((3,), (0,))).astype(x.dtype)
