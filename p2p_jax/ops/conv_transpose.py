"""Forms of ConvTranspose2d(kernel 4, stride 2, padding 1) on NHWC images.

Each form takes x [N, H, W, C_in] and a kernel [4, 4, C_in, C_out] with
PyTorch's semantics (`out[2i - 1 + u, 2j - 1 + v] += x[i, j] @ kernel[u, v]`)
and returns [N, 2H, 2W, C_out]; all compute the same function to float rounding.

  by_shape        a hand-written VJP; forward and gradients in the formulation
                  `choose.conv_transpose_form` picks for the layer's shapes (rules
                  measured on XLA:CPU; in bfloat16, a layer `choose.in_float32`
                  names runs in float32).
  subpixel        four 2x2 stride-1 convolutions (one per output phase), XLA's autodiff.
  dilated         the usual form: a convolution of the 2x-dilated input, XLA's autodiff.
  cols            one matmul of every pixel with the 16 taps and an overlap-add.
  space_to_depth  the adjoint of a stride-2 convolution's space-to-depth form.
  blocks          one matmul of the input's 2x2 windows with the taps regrouped, and
                  depth-to-space (`windows.upsample_blocks`, also the stride-2
                  convolutions' input gradient); a candidate no rule picks yet.

Each computes in x's dtype: a float32 kernel is cast to it inside, and the
`by_shape` forms return its gradient in float32 from their float32 sums.

`auto` is `by_shape` on the CPU and `dilated` (XLA's own) on accelerators
(`choose.conv_transpose_impl_for`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from p2p_jax.ops import choose
from p2p_jax.ops import windows
from p2p_jax.ops.space_to_depth import upsample_space_to_depth
from p2p_jax.validation import check_choice

Array = jax.Array

IMPLS = ("auto", "by_shape", "subpixel", "dilated")   # config.model.upconv_impl


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
  kernel = kernel.astype(x.dtype)
  rows = []
  for row_taps, row_pad in _PHASE_TAPS:
    phases = []
    for col_taps, col_pad in _PHASE_TAPS:
      phases.append(lax.conv_general_dilated(x, kernel[row_taps, col_taps], (1, 1),
                                             (row_pad, col_pad), dimension_numbers=windows.NHWC))
    rows.append(jnp.stack(phases, axis=3))       # [N, H, W, 2 (col phase), C]
  out = jnp.stack(rows, axis=2)                  # [N, H, 2 (row phase), W, 2, C]
  return out.reshape(n, 2 * h, 2 * w, kernel.shape[-1])


def upsample_dilated(x: Array, kernel: Array) -> Array:
  """The same transposed convolution written the usual way: a stride-1
  convolution of the 2x-dilated input with the spatially flipped kernel."""
  flipped = kernel[::-1, ::-1].astype(x.dtype)
  return lax.conv_general_dilated(x, flipped, (1, 1), ((2, 2), (2, 2)),
                                  lhs_dilation=(2, 2), dimension_numbers=windows.NHWC)


# The `by_shape` form: the same result with a hand-written VJP that picks, from the
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


def upsample_cols(x: Array, kernel: Array) -> Array:
  """The same transposed convolution as one matmul (every pixel times the kernel's
  16 taps) and an overlap-add of the products."""
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  cols = windows.dot(x, windows.taps_matrix(kernel.astype(x.dtype)), ((3,), (0,)))
  return windows.overlap_add(cols.reshape(n, h, w, 4, 4, c_out)).astype(x.dtype)


def _upsample_forward(x: Array, kernel: Array, form: str) -> Array:
  if form == "space_to_depth":
    return upsample_space_to_depth(x, kernel)
  if form == "cols":
    return upsample_cols(x, kernel)
  if form == "blocks":
    return windows.upsample_blocks(x, kernel).astype(x.dtype)
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  pixels = jnp.broadcast_to(x.reshape(1, n * h * w, c_in), (16, n * h * w, c_in))
  cols = windows.dot(pixels, kernel.reshape(16, c_in, c_out), ((2,), (1,)), ((0,), (0,)))
  cols = cols.reshape(4, 4, n, h, w, c_out).transpose(2, 3, 4, 0, 1, 5)
  return windows.overlap_add(cols).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def upsample_in_form(x: Array, kernel: Array, form: str) -> Array:
  """The same transposed convolution in `form` (`choose.CONV_TRANSPOSE_FORMS`), with the
  VJP described above. Args and result as `upsample_subpixel`."""
  return _upsample_forward(x, kernel.astype(x.dtype), form)


def upsample_by_shape(x: Array, kernel: Array) -> Array:
  """`upsample_in_form` in the form `choose.conv_transpose_form` names for the layer."""
  return upsample_in_form(x, kernel, choose.conv_transpose_form(x.shape, kernel.shape[-1],
                                                                x.dtype))


def _upsample_in_form_fwd(x: Array, kernel: Array, form: str
                          ) -> tuple[Array, tuple[Array, Array]]:
  return _upsample_forward(x, kernel.astype(x.dtype), form), (x, kernel)


def _upsample_in_form_bwd(form: str, residuals: tuple[Array, Array], grad: Array
                          ) -> tuple[Array, Array]:
  x, stored_kernel = residuals
  kernel = stored_kernel.astype(x.dtype)
  n, h, w, c_in = x.shape
  c_out = kernel.shape[-1]
  pixels = n * h * w
  if form == "kernel_major":
    taps = windows.patches(grad, 2).reshape(pixels, 16, c_out)
    if choose.dots_only(grad.dtype):
      # One matmul with the taps matrix: XLA:CPU's bfloat16 dots do not take the
      # batched form below (it runs it in float32).
      x_grad = windows.dot(taps.reshape(n, h, w, 16 * c_out), windows.taps_matrix(kernel),
                           ((3,), (1,)))
    else:
      # [16, C_in, C_out] x [16, C_out, M] -> [16, C_in, M], summed over the taps.
      x_grad = windows.dot(kernel.reshape(16, c_in, c_out), taps.transpose(1, 2, 0),
                           ((2,), (1,)), ((0,), (0,))).sum(axis=0).T.reshape(n, h, w, c_in)
    x_taps = jnp.broadcast_to(x.reshape(1, pixels, c_in).transpose(0, 2, 1), (16, c_in, pixels))
    kernel_grad = windows.dot(x_taps, taps.transpose(1, 0, 2), ((2,), (1,)), ((0,), (0,)))
    kernel_grad = kernel_grad.reshape(4, 4, c_in, c_out)
  else:
    # x_grad[i] = sum_uv grad[2i - 1 + u, 2j - 1 + v] @ kernel[u, v]^T: a stride-2
    # convolution that reads the kernel as [H, W, O, I]; where it has fewer pixels
    # than channels, or where only dots reach the CPU's bfloat16 units, one matmul
    # of the gradient's windows (as `conv.conv4x4_matmul`).
    large = form == "space_to_depth"
    by_windows = pixels <= c_in or choose.dots_only(grad.dtype)
    grad_windows = (None if large and not by_windows
                    else windows.patches(grad, 2))   # [N, h, w, 16 * C_out]
    if by_windows:
      # The forward pass's taps matrix, read transposed: one copy of the kernel, not two.
      x_grad = windows.dot(grad_windows, windows.taps_matrix(kernel), ((3,), (1,)))
    else:
      x_grad = lax.conv_general_dilated(grad, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWOI", "NHWC"))
    flat_x = x.reshape(pixels, c_in)
    if large:
      # The windows as four shifted views of the gradient's 2x2 blocks, not
      # sixteen strided slices: tap u = 2a + p is block row i + a, phase p.
      blocks = windows.blocks(grad)
      parts = [windows.dot(flat_x, blocks[:, a:a + h, b:b + w].reshape(pixels, 4 * c_out),
                           ((0,), (0,)))
               for a in range(2) for b in range(2)]
      kernel_grad = jnp.stack(parts).reshape(2, 2, c_in, 2, 2, c_out)   # [a, b, C_in, p, q, C_out]
      kernel_grad = kernel_grad.transpose(0, 3, 1, 4, 2, 5).reshape(4, 4, c_in, c_out)
    else:
      kernel_grad = windows.dot_over_pixels(x, grad_windows)
      kernel_grad = kernel_grad.reshape(c_in, 4, 4, c_out).transpose(1, 2, 0, 3)
  return x_grad.astype(x.dtype), kernel_grad.astype(stored_kernel.dtype)


upsample_in_form.defvjp(_upsample_in_form_fwd, _upsample_in_form_bwd)

_FORMS = {"by_shape": upsample_by_shape, "subpixel": upsample_subpixel,
          "dilated": upsample_dilated}
# Every formulation by name: `by_shape`'s (`choose.CONV_TRANSPOSE_FORMS`) and XLA's, for
# the layers benchmark (`python -m p2p_jax.bench --mode=layers`).
FORMS = {**{form: functools.partial(upsample_in_form, form=form)
            for form in choose.CONV_TRANSPOSE_FORMS},
         "subpixel": upsample_subpixel, "dilated": upsample_dilated}


def conv_transpose4x4(x: Array, kernel: Array, impl: str = "auto",
                      backend: str | None = None) -> Array:
  """ConvTranspose2d(kernel 4, stride 2, padding 1) as `impl` (`IMPLS`) computes it on
  `backend` (default: JAX's default backend, which `auto` resolves for)."""
  check_choice("upconv_impl", impl, IMPLS)
  impl = choose.conv_transpose_impl_for(impl, backend or jax.default_backend())
  if impl == "by_shape" and choose.in_float32("conv_transpose4x4", x.shape, dtype=x.dtype):
    return conv_transpose4x4(x.astype(jnp.float32), kernel, impl, backend).astype(x.dtype)
  form = (choose.conv_transpose_form(x.shape, kernel.shape[-1], x.dtype) if impl == "by_shape"
          else impl)
  n, h, w, c_in = x.shape
  choose.note("conv_transpose4x4", form, 2 * n * h * w * 16 * c_in * kernel.shape[-1], x, kernel,
              2)
  return _FORMS[impl](x, kernel)
