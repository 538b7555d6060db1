"""The convolution forms compute the same function as the layers' definitions, `by_shape`
takes the form its rules name for each layer's shapes, and `auto` resolves per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2p_jax import hardware
from p2p_jax import ops
from p2p_jax import step as step_lib
from p2p_jax.ops import choose
from p2p_jax.ops import conv
from p2p_jax.ops import conv_transpose
from p2p_jax.ops import space_to_depth
from p2p_jax.ops import windows
from p2p_jax.ops import winograd


def _conv_transpose_by_definition(x, kernel):
  """PyTorch ConvTranspose2d(k=4, s=2, p=1): out[2i - 1 + u, 2j - 1 + v] += x[i, j] @ kernel[u, v]."""
  n, h, w, _ = x.shape
  out = np.zeros((n, 2 * h + 2, 2 * w + 2, kernel.shape[-1]))     # one pixel of margin each side
  for u in range(4):
    for v in range(4):
      out[:, u:u + 2 * h:2, v:v + 2 * w:2] += np.einsum("nhwc,co->nhwo", x, kernel[u, v])
  return out[:, 1:-1, 1:-1]


def _pullback(fn, x, kernel, cotangent):
  return jax.grad(lambda x, k: jnp.sum(fn(x, k) * cotangent), argnums=(0, 1))(
      jnp.asarray(x), jnp.asarray(kernel))


# (input shape, output channels): a generic layer, one whose outputs are few
# enough for the matmul forward, two "kernel-major" bottleneck layers, one with
# fewer pixels than input channels (matmul input gradient), and one whose 4x4
# windows pass 2**23 values (the space-to-depth forms of `by_shape`).
@pytest.mark.parametrize("shape,c_out", [((2, 5, 6, 24), 20), ((2, 5, 6, 3), 4),
                                         ((1, 1, 1, 16), 64), ((2, 2, 3, 8), 64),
                                         ((1, 4, 4, 32), 8), ((3, 64, 64, 4), 64)])
def test_upconv_forms_agree_with_the_definition_and_each_other(shape, c_out):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(4, 4, shape[-1], c_out)).astype(np.float32)
  expected = _conv_transpose_by_definition(x.astype(np.float64), kernel.astype(np.float64))
  forms = {"subpixel": conv_transpose.upsample_subpixel, "dilated": conv_transpose.upsample_dilated,
           "space_to_depth": space_to_depth.upsample_space_to_depth,
           "cols": conv_transpose.upsample_cols,
           "by_shape": conv_transpose.upsample_by_shape}
  for name, fn in forms.items():
    np.testing.assert_allclose(fn(jnp.asarray(x), jnp.asarray(kernel)), expected, atol=5e-5,
                               err_msg=name)

  cotangent = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))
  reference = _pullback(conv_transpose.upsample_dilated, x, kernel, cotangent)
  for name in ("subpixel", "space_to_depth", "by_shape"):
    for grad, want in zip(_pullback(forms[name], x, kernel, cotangent), reference):
      # Kernel gradients sum over every pixel: float32 rounding grows with their size.
      scale = max(1.0, float(np.abs(want).max()))
      np.testing.assert_allclose(grad, want, rtol=1e-5, atol=5e-5 * scale, err_msg=name)


@pytest.mark.parametrize("shape,c_out,stride", [((2, 8, 6, 5), 4, 2), ((1, 7, 9, 3), 6, 1),
                                                ((2, 4, 4, 32), 64, 2), ((2, 9, 8, 16), 24, 1),
                                                ((1, 6, 11, 5), 3, 1)])
def test_conv_forms_agree_in_value_and_gradients(shape, c_out, stride):
  rng = np.random.default_rng(1)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(4, 4, shape[-1], c_out)).astype(np.float32)
  xla = conv.conv4x4_xla(jnp.asarray(x), jnp.asarray(kernel), stride)
  forms = {"matmul": lambda x, k: conv.conv4x4_matmul(x, k, stride),
           "by_shape": lambda x, k: ops.conv4x4(x, k, stride, "by_shape")}
  if stride == 2:
    forms["s2"] = conv.conv4x4_s2
    forms["space_to_depth"] = space_to_depth.space_to_depth_conv
  else:
    forms["winograd"] = winograd.conv4x4_winograd
    forms["nested"] = winograd.conv4x4_nested
    forms["taps"] = conv.conv4x4_taps
  cotangent = jnp.asarray(rng.normal(size=xla.shape).astype(np.float32))
  reference = _pullback(lambda x, k: conv.conv4x4_xla(x, k, stride), x, kernel, cotangent)
  def tolerance(want):
    # Sums of a few hundred float32 products: the rounding grows with their size.
    return max(5e-5, 2e-6 * float(np.abs(want).max()))
  for name, fn in forms.items():
    np.testing.assert_allclose(fn(jnp.asarray(x), jnp.asarray(kernel)), xla,
                               atol=tolerance(xla), err_msg=name)
    for grad, want in zip(_pullback(fn, x, kernel, cotangent), reference):
      np.testing.assert_allclose(grad, want, rtol=1e-5, atol=tolerance(want), err_msg=name)


def test_by_shape_forms_pick_by_shape():
  """Which form `by_shape` takes where: the choice is a speed rule, so check that each
  branch is reachable and is the form the docstrings describe."""
  def takes(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))
  x = jnp.zeros((1, 16, 16, 8))
  assert "conv4x4_s2" in takes(
      lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 8, 8)), 2, "by_shape"), x)
  assert "conv4x4_matmul" in takes(                       # few output pixels, wide kernel
      lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 8, 128)), 2, "by_shape"), x)
  odd = jnp.zeros((1, 15, 16, 8))                         # odd sides: XLA's own convolution
  jaxpr = takes(lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 8, 8)), 2, "by_shape"), odd)
  assert "conv4x4_s2" not in jaxpr and "conv4x4_matmul" not in jaxpr
  # Stride 1: Winograd once both sides have 16 channels; the 16 taps' matmul for
  # the 1-channel logits; XLA's convolution from few channels to many.
  assert "winograd_conv" in takes(
      lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 16, 32)), 1, "by_shape"),
      jnp.zeros((1, 8, 8, 16)))
  jaxpr = takes(lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 16, 1)), 1, "by_shape"),
                jnp.zeros((1, 8, 8, 16)))
  assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
  jaxpr = takes(lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 8, 32)), 1, "by_shape"),
                jnp.zeros((1, 8, 8, 8)))
  assert "winograd_conv" not in jaxpr and "conv_general_dilated" in jaxpr
  # Up-convolutions: the space-to-depth form once the matmul's products pass 2**23 values.
  kernel = jax.ShapeDtypeStruct((4, 4, 8, 64), jnp.float32)
  big, small = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in [(3, 64, 64, 8),
                                                                       (2, 64, 64, 8)])
  assert "dot_general" not in takes(conv_transpose.upsample_by_shape, big, kernel)
  assert "dot_general" in takes(conv_transpose.upsample_by_shape, small, kernel)


@pytest.mark.parametrize("x_shape,kernel_shape,stride,form", [
    ((4, 32, 32, 256), (4, 4, 256, 512), 1, "winograd"),   # the 70x70 PatchGAN's widest layer
    ((4, 31, 31, 512), (4, 4, 512, 1), 1, "taps"),        # its logits
    ((1, 8, 8, 8), (4, 4, 8, 32), 1, "xla"),
    ((1, 256, 256, 3), (4, 4, 3, 64), 2, "matmul"),       # the U-Net's 3-channel input
    ((1, 8, 8, 512), (4, 4, 512, 512), 2, "matmul"),      # few output pixels
    ((4, 128, 128, 64), (4, 4, 64, 128), 2, "s2"),
    ((1, 15, 16, 8), (4, 4, 8, 8), 2, "xla"),             # an odd side
])
def test_conv_rule_names_a_form_for_each_layer(x_shape, kernel_shape, stride, form):
  assert choose.conv_form(x_shape, kernel_shape, stride) == form


@pytest.mark.parametrize("x_shape,c_out,form", [
    ((1, 2, 2, 1024), 512, "kernel_major"),   # unet_256's inner levels at batch 1
    ((4, 64, 64, 512), 128, "space_to_depth"),  # the 64 px level at batch 4
    ((1, 128, 128, 128), 3, "cols"),          # the outermost layer
    ((1, 32, 32, 1024), 256, "cols"),
])
def test_conv_transpose_rule_names_a_form_for_each_layer(x_shape, c_out, form):
  assert choose.conv_transpose_form(x_shape, c_out) == form


def test_unknown_forms_are_named():
  x, kernel = jnp.zeros((1, 8, 8, 4)), jnp.zeros((4, 4, 4, 4))
  with pytest.raises(ValueError,
                     match="conv_impl='im2col' is not one of 'auto', 'by_shape', 'xla'"):
    ops.conv4x4(x, kernel, 2, "im2col")
  with pytest.raises(ValueError,
                     match="upconv_impl='fast' is not one of 'auto', 'by_shape', 'subpixel'"):
    ops.conv_transpose4x4(x, kernel, "fast")


@pytest.mark.parametrize("backend,conv_impl,conv_transpose_impl", [
    ("cpu", "by_shape", "by_shape"), ("gpu", "xla", "dilated"), ("tpu", "xla", "dilated")])
def test_auto_resolves_per_backend(backend, conv_impl, conv_transpose_impl):
  assert choose.conv_impl_for("auto", backend) == conv_impl
  assert choose.conv_transpose_impl_for("auto", backend) == conv_transpose_impl
  for impl in ("xla", "by_shape"):                        # named impls stay as they are
    assert choose.conv_impl_for(impl, backend) == impl
  for impl in ("by_shape", "subpixel", "dilated"):
    assert choose.conv_transpose_impl_for(impl, backend) == impl
  # What the ops trace for that backend, without its hardware.
  x, kernel = jnp.zeros((1, 16, 16, 8)), jnp.zeros((4, 4, 8, 8))
  with choose.recording() as layers:
    jax.eval_shape(lambda x: ops.conv4x4(x, kernel, 2, "auto", backend=backend), x)
    jax.eval_shape(lambda x: ops.conv_transpose4x4(x, kernel, "auto", backend=backend), x)
  assert [layer.form for layer in layers] == (
      ["s2", "cols"] if backend == "cpu" else ["xla", "dilated"])
  jaxpr = str(jax.make_jaxpr(lambda x: ops.conv4x4(x, kernel, 2, "auto", backend=backend))(x))
  assert ("conv4x4_s2" in jaxpr) == (backend == "cpu")


def test_recorded_flops_count_the_multiply_adds_of_each_layer():
  with choose.recording() as layers:
    jax.eval_shape(lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 3, 64)), 2),
                   jnp.zeros((2, 256, 256, 3)))
    jax.eval_shape(lambda x: ops.conv4x4(x, jnp.zeros((4, 4, 256, 512)), 1),
                   jnp.zeros((1, 32, 32, 256)))
    jax.eval_shape(lambda x: ops.conv_transpose4x4(x, jnp.zeros((4, 4, 1024, 512))),
                   jnp.zeros((1, 4, 4, 1024)))
    jax.eval_shape(lambda x: conv.conv1x1(x, jnp.zeros((1, 1, 6, 64))), jnp.zeros((1, 8, 8, 6)))
  assert [layer.flops for layer in layers] == [
      2 * 2 * 128 * 128 * 16 * 3 * 64,       # stride 2: a 128x128 output per image
      2 * 31 * 31 * 16 * 256 * 512,          # stride 1, padding 1: 31x31
      2 * 4 * 4 * 16 * 1024 * 512,           # each input pixel times the 16 taps
      2 * 8 * 8 * 6 * 64]
  assert [layer.kind for layer in layers] == ["conv4x4", "conv4x4", "conv_transpose4x4",
                                              "conv1x1"]
  assert not choose._recorders                 # the recorder is gone after its block


# ---- bfloat16 on a CPU with bfloat16 units: dots only.

# bfloat16 keeps 8 significant bits: one rounding moves a value by at most half its
# spacing, 2**-9 of it, and a float32 sum that lands near a rounding boundary can round
# the other way: a bfloat16 result of a float32-accumulated dot is within 2**-8 of the
# exact value of its (bfloat16) operands.
BF16_ROUNDING = 2.0 ** -8


@pytest.fixture
def bf16_units(monkeypatch):
  """This CPU multiplies bfloat16 in hardware, whatever the machine running the tests."""
  monkeypatch.setattr(hardware, "cpu_bfloat16_units", lambda: True)


def _bf16_operands(rng, *shapes):
  """Normal arrays rounded to bfloat16, and the same values in float32 (exactly)."""
  arrays = [jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in shapes]
  return arrays, [jnp.asarray(a, jnp.float32) for a in arrays]


def _assert_one_bf16_rounding(got, exact, name):
  got = np.asarray(got, np.float64)
  exact = np.asarray(exact, np.float64)
  slack = 1e-6 * float(np.abs(exact).max())   # the float32 references' own rounding
  excess = np.abs(got - exact) - (BF16_ROUNDING * np.abs(exact) + slack)
  assert excess.max() <= 0, f"{name}: {excess.max():.3g} beyond one bfloat16 rounding"


@pytest.mark.parametrize("shape,c_out,stride", [((2, 8, 6, 5), 4, 2), ((2, 4, 4, 32), 64, 2),
                                                ((2, 9, 8, 16), 24, 1), ((1, 6, 11, 5), 3, 1)])
def test_bfloat16_dot_forms_round_once_in_value_and_gradients(bf16_units, shape, c_out, stride):
  rng = np.random.default_rng(2)
  (x, kernel), (x32, kernel32) = _bf16_operands(rng, shape, (4, 4, shape[-1], c_out))
  want, pullback = jax.vjp(lambda x, k: conv.conv4x4_xla(x, k, stride), x32, kernel32)
  (cotangent,), (cotangent32,) = _bf16_operands(rng, want.shape)
  want_grads = pullback(cotangent32)
  forms = {"matmul": lambda x, k: conv.conv4x4_matmul(x, k, stride),
           "by_shape": lambda x, k: ops.conv4x4(x, k, stride, "by_shape")}
  if stride == 1:
    forms["taps"] = conv.conv4x4_taps
  for name, fn in forms.items():
    got, got_pullback = jax.vjp(fn, x, kernel)
    assert got.dtype == jnp.bfloat16
    _assert_one_bf16_rounding(got, np.asarray(want), name)
    for grad, want_grad in zip(got_pullback(cotangent), want_grads):
      assert grad.dtype == jnp.bfloat16
      _assert_one_bf16_rounding(grad, np.asarray(want_grad), f"{name} gradient")


@pytest.mark.parametrize("shape,c_out", [((2, 5, 6, 24), 20), ((1, 1, 1, 16), 64),
                                         ((2, 2, 3, 8), 64), ((3, 64, 64, 4), 64)])
def test_bfloat16_upconv_dot_forms_round_once_in_value_and_gradients(bf16_units, shape, c_out):
  rng = np.random.default_rng(3)
  (x, kernel), (x32, kernel32) = _bf16_operands(rng, shape, (4, 4, shape[-1], c_out))
  want = _conv_transpose_by_definition(np.asarray(x32, np.float64),
                                       np.asarray(kernel32, np.float64))
  (cotangent,), (cotangent32,) = _bf16_operands(rng, want.shape)
  _, pullback = jax.vjp(conv_transpose.upsample_dilated, x32, kernel32)
  want_grads = pullback(cotangent32)
  forms = {name: conv_transpose.FORMS[name] for name in ("cols", "kernel_major")}
  forms["by_shape"] = conv_transpose.upsample_by_shape
  for name, fn in forms.items():
    got, got_pullback = jax.vjp(fn, x, kernel)
    _assert_one_bf16_rounding(got, want, name)
    for grad, want_grad in zip(got_pullback(cotangent), want_grads):
      _assert_one_bf16_rounding(grad, want_grad, f"{name} gradient")


def _primitives(fn, *args):
  return str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                                     argnums=(0, 1)))(*args))


def test_bfloat16_layers_meet_only_dots_where_the_cpu_has_bfloat16_units(monkeypatch):
  """Every layer kind of G and D, forward and both gradients: no XLA convolution in
  bfloat16 on such a CPU; float32, and bfloat16 on other CPUs, keep float32's rules."""
  layers = [(lambda x, k: ops.conv4x4(x, k, 2, "by_shape"), (4, 32, 32, 16), (4, 4, 16, 32)),
            (lambda x, k: ops.conv4x4(x, k, 1, "by_shape"), (2, 16, 16, 32), (4, 4, 32, 64)),
            (lambda x, k: ops.conv4x4(x, k, 1, "by_shape"), (2, 15, 15, 32), (4, 4, 32, 1)),
            (lambda x, k: ops.conv_transpose4x4(x, k, "by_shape"), (4, 16, 16, 32),
             (4, 4, 32, 16)),
            (lambda x, k: ops.conv_transpose4x4(x, k, "by_shape"), (3, 64, 64, 8),
             (4, 4, 8, 64))]
  for units in (True, False):
    monkeypatch.setattr(hardware, "cpu_bfloat16_units", lambda units=units: units)
    convolutions = []
    for fn, x_shape, kernel_shape in layers:
      for dtype in (jnp.bfloat16, jnp.float32):
        jaxpr = _primitives(fn, jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype))
        if dtype == jnp.bfloat16 and units:
          assert "conv_general_dilated" not in jaxpr, (x_shape, kernel_shape)
        convolutions.append("conv_general_dilated" in jaxpr)
    assert any(convolutions)       # float32 (and bfloat16 without the units) still use them


def test_the_full_size_networks_in_bfloat16_run_dot_forms(bf16_units):
  from configs import default
  config = default.get_config("bf16")
  layers = step_lib.trace_layers(config, 4)
  forms = {layer.form for network in layers.values() for layer in network}
  assert forms <= {"matmul", "taps", "nested", "cols", "kernel_major"}, forms
  assert len(layers["generator"]) == 16 and len(layers["discriminator"]) == 5
  # At batch 4 the U-Net's innermost convolution (2x2 -> 1x1) and its two innermost
  # transposed ones (1x1 and 2x2 inputs) run in float32; every other layer in bfloat16.
  in_float32 = [(layer.kind, layer.x_shape[1]) for network in layers.values()
                for layer in network if layer.dtype == "float32"]
  assert in_float32 == [("conv4x4", 2), ("conv_transpose4x4", 1), ("conv_transpose4x4", 2)]
  assert sum(layer.dtype == "bfloat16" for network in layers.values() for layer in network) == 18
  # The PatchGAN's widest layer (1024 2x2 output tiles at 4x256) as nested Winograd.
  assert [layer.form for layer in layers["discriminator"]][3] == "nested"


@pytest.mark.parametrize("kind,x_shape,stride,float32", [
    ("conv4x4", (8, 2, 2, 256), 2, True),            # 8 output pixels: the demo's innermost
    ("conv4x4", (2, 4, 4, 16), 2, True),
    ("conv4x4", (1, 8, 8, 512), 2, False),           # 16
    ("conv4x4", (1, 4, 4, 64), 1, False),            # stride 1: 3x3 = 9, one past the rule
    ("conv_transpose4x4", (8, 2, 2, 512), 2, True),  # 32 input pixels
    ("conv_transpose4x4", (1, 8, 8, 1024), 2, False),
])
def test_the_rule_for_float32_layers_counts_pixels(bf16_units, kind, x_shape, stride, float32):
  assert choose.in_float32(kind, x_shape, stride, "bfloat16") is float32
  assert not choose.in_float32(kind, x_shape, stride, "float32")


@pytest.mark.parametrize("units", [True, False])
def test_innermost_bfloat16_layers_run_in_float32_where_the_cpu_has_bfloat16_units(
    monkeypatch, units):
  """A layer `choose.in_float32` names computes on its bfloat16 input cast up and the
  float32 kernel as stored, and rounds its output and input gradient once to bfloat16:
  bit for bit the float32 layer's results rounded; its kernel gradient is the float32
  one. Its neighbours with more pixels, and every layer without the units, stay in
  bfloat16 (recorded so)."""
  monkeypatch.setattr(hardware, "cpu_bfloat16_units", lambda: units)
  rng = np.random.default_rng(6)
  cases = [(lambda x, k: ops.conv4x4(x, k, 2, "by_shape"), (2, 4, 4, 16), (4, 4, 16, 32)),
           (lambda x, k: ops.conv4x4(x, k, 2, "by_shape"), (3, 4, 4, 16), (4, 4, 16, 32)),
           (lambda x, k: ops.conv_transpose4x4(x, k, "by_shape"), (2, 4, 4, 24), (4, 4, 24, 8)),
           (lambda x, k: ops.conv_transpose4x4(x, k, "by_shape"), (1, 4, 9, 24), (4, 4, 24, 8))]
  routed = []
  for fn, x_shape, kernel_shape in cases:
    (x,), _ = _bf16_operands(rng, x_shape)
    kernel = jnp.asarray(0.1 * rng.normal(size=kernel_shape), jnp.float32)
    with choose.recording() as layers:
      y, pullback = jax.vjp(fn, x, kernel)
    (cotangent,), _ = _bf16_operands(rng, y.shape)
    x_grad, kernel_grad = pullback(cotangent)
    assert y.dtype == x_grad.dtype == jnp.bfloat16 and kernel_grad.dtype == jnp.float32
    routed.append(layers[0].dtype == "float32")
    if routed[-1]:
      want, want_pullback = jax.vjp(fn, x.astype(jnp.float32), kernel)
      want_x_grad, want_kernel_grad = want_pullback(cotangent.astype(jnp.float32))
      np.testing.assert_array_equal(np.asarray(y), np.asarray(want.astype(jnp.bfloat16)))
      np.testing.assert_array_equal(np.asarray(x_grad),
                                    np.asarray(want_x_grad.astype(jnp.bfloat16)))
      np.testing.assert_array_equal(np.asarray(kernel_grad), np.asarray(want_kernel_grad))
  assert routed == ([True, False, True, False] if units else [False] * 4)


def test_bfloat16_units_are_read_from_the_cpu_flags(tmp_path, monkeypatch):
  monkeypatch.delenv(hardware.BF16_UNITS_ENV, raising=False)
  def cpu(flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\n")
    return hardware.cpu_bfloat16_units.__wrapped__(str(path))
  assert cpu("avx512f amx_bf16 amx_tile")
  assert cpu("avx512f avx512_bf16")
  assert not cpu("avx512f avx2")
  assert not hardware.cpu_bfloat16_units.__wrapped__(str(tmp_path / "absent"))


def test_the_environment_overrides_the_cpu_flags(tmp_path, monkeypatch):
  with_units = tmp_path / "cpuinfo"
  with_units.write_text("flags\t\t: fpu avx512f amx_bf16\n")
  read = hardware.cpu_bfloat16_units.__wrapped__
  monkeypatch.setenv(hardware.BF16_UNITS_ENV, "0")
  assert not read(str(with_units))
  monkeypatch.setenv(hardware.BF16_UNITS_ENV, "1")
  assert read(str(tmp_path / "absent"))
  monkeypatch.setenv(hardware.BF16_UNITS_ENV, "yes")
  with pytest.raises(ValueError, match="P2P_JAX_CPU_BFLOAT16_UNITS='yes'.*set it to 1"):
    read(str(with_units))


@pytest.mark.parametrize("x_shape,kernel_shape,stride,form", [
    ((4, 32, 32, 256), (4, 4, 256, 512), 1, "nested"),   # the PatchGAN's widest layer, 4x256
    ((1, 32, 32, 256), (4, 4, 256, 512), 1, "matmul"),   # the same at batch 1: 256 tiles
    ((4, 31, 31, 512), (4, 4, 512, 1), 1, "taps"),       # the logits
    ((4, 128, 128, 64), (4, 4, 64, 128), 2, "matmul"),
])
def test_bfloat16_rules_name_dot_forms(bf16_units, x_shape, kernel_shape, stride, form):
  assert choose.conv_form(x_shape, kernel_shape, stride, "bfloat16") == form
  assert choose.conv_form(x_shape, kernel_shape, stride, "float32") != "nested"


def _rms_error(got, exact):
  got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
  return np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact ** 2))


def test_nested_winograd_in_bfloat16_rounds_about_twice_a_direct_convolution():
  """Its operands are the transformed tiles and kernel, each rounded once to bfloat16
  (by at most 2**-8 of itself): every value of the output is within 2**-7 of the sum of
  the absolute products it is made of, plus its own final rounding; over the output and
  both gradients, its RMS error stays within three times the direct (matmul) form's,
  where F(2x2, 4x4)'s is several times worse."""
  rng = np.random.default_rng(4)
  (x, kernel), (x32, kernel32) = _bf16_operands(rng, (2, 10, 12, 32), (4, 4, 32, 24))
  kernel, kernel32 = kernel * 0.1, kernel32 * 0.1
  got = winograd.conv4x4_nested(x, kernel)
  assert got.dtype == jnp.bfloat16
  # The bound, in float64: 2**-7 |A|^T (sum_c |B^T d B| |G g G^T|) |A| for the two rounded
  # operands of each product, and 2**-8 of the result for its own rounding to bfloat16.
  algorithm = winograd.NESTED
  bt, g = np.asarray(algorithm.bt, np.float64), np.asarray(algorithm.g, np.float64)
  at = np.abs(np.asarray(algorithm.at, np.float64))
  padded = np.pad(np.asarray(x32, np.float64), ((0, 0), (1, 2), (1, 2), (0, 0)))
  tiles = np.stack([np.stack([padded[:, 2 * i:2 * i + 5, 2 * j:2 * j + 5]
                              for j in range(6)], 1) for i in range(5)], 1)   # [N, 5, 6, 5, 5, C]
  tile_t = np.abs(np.einsum("au,bv,nijuvc->nijabc", bt, bt, tiles))
  kernel_t = np.abs(np.einsum("au,bv,uvco->abco", g, g, np.asarray(kernel32, np.float64)))
  magnitude = np.einsum("pa,qb,nijabc,abco->nipjqo", at, at, tile_t, kernel_t)
  want = np.asarray(conv.conv4x4_xla(x32, kernel32, 1), np.float64)
  bound = (2.0 ** -7 * magnitude.reshape(2, 10, 12, 24)[:, :9, :11] + 2.0 ** -8 * np.abs(want)
           ) * (1 + 1e-3) + 1e-6
  assert (np.abs(np.asarray(got, np.float64) - want) <= bound).all()

  (cotangent,), (cotangent32,) = _bf16_operands(rng, want.shape)
  _, pullback = jax.vjp(lambda x, k: conv.conv4x4_xla(x, k, 1), x32, kernel32)
  exact = [want, *pullback(cotangent32)]
  errors = {}
  for name, fn in (("matmul", lambda x, k: conv.conv4x4_matmul(x, k, 1)),
                   ("nested", winograd.conv4x4_nested), ("winograd", winograd.conv4x4_winograd)):
    y, fn_pullback = jax.vjp(fn, x, kernel)
    errors[name] = [_rms_error(value, reference)
                    for value, reference in zip([y, *fn_pullback(cotangent)], exact)]
  for nested, direct, f2x2_4x4 in zip(errors["nested"], errors["matmul"], errors["winograd"]):
    assert nested <= 3 * direct and f2x2_4x4 > 2 * nested, errors


@pytest.mark.parametrize("form", ["matmul", "nested", "taps", "cols", "kernel_major", "blocks",
                                  "space_to_depth"])
def test_a_float32_kernel_gets_its_gradient_unrounded_from_bfloat16_layers(form):
  """The layers cast a float32 kernel to the activations' bfloat16 themselves and return
  its gradient from their float32 sums: a direct form's is exact to float32 rounding,
  not rounded to bfloat16 on the way."""
  rng = np.random.default_rng(5)
  upconv = form in choose.CONV_TRANSPOSE_FORMS
  x_shape = (2, 6, 8, 16) if upconv else (2, 12, 16, 16)
  (x,), (x32,) = _bf16_operands(rng, x_shape)
  kernel32 = jnp.asarray(rng.normal(size=(4, 4, 16, 24)), jnp.float32)
  kernel_rounded = jnp.asarray(kernel32.astype(jnp.bfloat16), jnp.float32)
  if upconv:
    fn, reference = conv_transpose.FORMS[form], conv_transpose.upsample_dilated
  else:
    stride = 1 if form in ("nested", "taps") else 2
    fn = lambda x, k: conv.FORMS[form](x, k, stride)
    reference = lambda x, k: conv.conv4x4_xla(x, k, stride)
  y = jax.eval_shape(fn, x, kernel32)
  assert y.dtype == jnp.bfloat16
  (cotangent,), (cotangent32,) = _bf16_operands(rng, y.shape)
  # Compiled whole, as in a train step: XLA:CPU must take every bfloat16 dot's layout.
  x_grad, kernel_grad = jax.jit(lambda x, k, c: jax.vjp(fn, x, k)[1](c))(x, kernel32, cotangent)
  assert x_grad.dtype == jnp.bfloat16 and kernel_grad.dtype == jnp.float32
  with jax.default_matmul_precision("highest"):
    _, reference_pullback = jax.vjp(reference, x32, kernel_rounded)
    want = np.asarray(reference_pullback(cotangent32)[1], np.float64)
  error = np.abs(np.asarray(kernel_grad, np.float64) - want).max() / np.abs(want).max()
  if form == "nested":      # its operands are the rounded transforms: bfloat16's error
    assert error < 2 ** -6
  else:
    assert error < 1e-5, error    # one bfloat16 rounding would be ~2**-9 = 2e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,stride", [((2, 8, 6, 5), 2), ((1, 7, 9, 3), 2),
                                          ((2, 9, 8, 4), 1)])
def test_windows_are_the_strided_taps_and_unpatch_is_their_adjoint(dtype, shape, stride):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  n, height, width, c = shape
  out_h, out_w = (height - 2) // stride + 1, (width - 2) // stride + 1
  padded = np.pad(np.asarray(x, np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.stack([padded[:, u:u + stride * out_h:stride, v:v + stride * out_w:stride]
                   for u in range(4) for v in range(4)], axis=3).reshape(n, out_h, out_w, -1)
  got = jax.jit(windows.patches, static_argnums=1)(x, stride)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)     # moved, never rounded
  cols = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  x32 = jnp.asarray(x, jnp.float32)
  lhs = float(jnp.vdot(windows.patches(x32, stride), cols))
  rhs = float(jnp.vdot(x32, windows.unpatch(cols, shape, stride)))
  assert lhs == pytest.approx(rhs, rel=1e-5)


def test_upsample_blocks_is_the_transposed_convolution():
  rng = np.random.default_rng(7)
  for shape, c_out in [((2, 5, 6, 7), 3), ((1, 1, 1, 4), 5), ((2, 8, 8, 16), 8)]:
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(4, 4, shape[-1], c_out)).astype(np.float32)
    got = windows.upsample_blocks(jnp.asarray(x), jnp.asarray(kernel))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _conv_transpose_by_definition(x, kernel), atol=5e-5)


@pytest.mark.parametrize("a,b", [(1024, 16), (16, 1024), (40, 48)])
def test_weight_gradient_dots_sum_over_pixels_in_either_orientation(a, b):
  """Whichever operand `dot_over_pixels` transposes, compiled in bfloat16 it returns
  [A, B] float32 sums of the bfloat16 products (no layout XLA:CPU's bfloat16 dots
  refuse at run time)."""
  rng = np.random.default_rng(8)
  (lhs, rhs), (lhs32, rhs32) = _bf16_operands(rng, (2, 5, 7, a), (2, 5, 7, b))
  got = jax.jit(windows.dot_over_pixels)(lhs, rhs)
  assert got.shape == (a, b) and got.dtype == jnp.float32
  want = np.einsum("nhwa,nhwb->ab", np.asarray(lhs32, np.float64), np.asarray(rhs32, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
