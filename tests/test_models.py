"""The networks are the paper's: sizes, parameter counts, receptive fields, layer rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from p2p_jax import models
from p2p_jax import ops


def _init_shapes(module, *inputs, **kwargs):
  args = [jnp.zeros(shape, jnp.float32) for shape in inputs]
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return jax.eval_shape(lambda: module.init_with_output(rngs, *args, **kwargs))


@pytest.mark.parametrize("num_downs,size,expected", [(8, 256, 54_413_955)])
def test_unet_parameter_count_matches_the_official_model(num_downs, size, expected):
  out, variables = _init_shapes(models.UNetGenerator(num_downs=num_downs), (1, size, size, 3))
  assert models.count_params(variables["params"]) == expected
  assert out.shape == (1, size, size, 3)


@pytest.mark.parametrize("n_layers,pixel,params,out_side,field", [
    (1, False, 139_585, 126, 16),
    (3, False, 2_768_705, 30, 70),
    (5, False, 11_159_361, 6, 286),
    (3, True, 9_024, 256, 1),
])
def test_discriminator_parameter_counts_and_output_sizes(n_layers, pixel, params, out_side, field):
  module = models.PatchDiscriminator(n_layers=n_layers, pixel=pixel)
  out, variables = _init_shapes(module, (1, 256, 256, 3), (1, 256, 256, 3))
  assert models.count_params(variables["params"]) == params
  assert out.shape == (1, out_side, out_side, 1)
  assert models.receptive_field(n_layers, pixel) == field


@pytest.mark.parametrize("n_layers,pixel,field,size", [
    (1, False, 16, 64), (3, False, 70, 128), (5, False, 286, 320), (3, True, 1, 16)])
def test_receptive_field_is_exactly_n_by_n(n_layers, pixel, field, size):
  """The gradient of one logit has nonzero support on exactly a field x field square."""
  module = models.PatchDiscriminator(n_layers=n_layers, ndf=2, pixel=pixel)
  image = jax.random.normal(jax.random.key(1), (1, size, size, 3))
  variables = module.init(jax.random.key(0), image, image)
  logits = module.apply(variables, image, image, use_running_average=True)
  row, col = logits.shape[1] // 2, logits.shape[2] // 2

  def one_logit(real_a):
    return module.apply(variables, real_a, image, use_running_average=True)[0, row, col, 0]

  support = np.abs(np.asarray(jax.grad(one_logit)(image))).sum(axis=(0, 3)) > 0
  rows, cols = np.nonzero(support)
  assert rows.max() - rows.min() + 1 == field
  assert cols.max() - cols.min() + 1 == field
  assert support.sum() == field * field          # a full square, no holes


def test_conditional_and_unconditional_discriminator_inputs():
  real_a = jnp.zeros((1, 64, 64, 1))
  image = jnp.zeros((1, 64, 64, 3))
  _, cond = _init_shapes(models.PatchDiscriminator(ndf=4), real_a.shape, image.shape)
  _, uncond = _init_shapes(models.PatchDiscriminator(ndf=4, conditional=False),
                           real_a.shape, image.shape)
  assert cond["params"]["conv_0"]["kernel"].shape == (4, 4, 4, 4)      # 1 + 3 channels
  assert uncond["params"]["conv_0"]["kernel"].shape == (4, 4, 3, 4)    # the image alone


def test_bias_rule_follows_the_official_code():
  _, batch = _init_shapes(models.UNetGenerator(num_downs=5, ngf=4), (1, 32, 32, 3))
  with_bias = {name for name, p in batch["params"].items() if "bias" in p and "norm" not in name}
  assert with_bias == {"up_0"}                   # only the last transposed conv
  _, inst = _init_shapes(models.UNetGenerator(num_downs=5, ngf=4, norm="instance"),
                         (1, 32, 32, 3))
  convs = {name for name in inst["params"] if name.startswith(("up_", "down_"))}
  assert all("bias" in inst["params"][name] for name in convs)
  assert "batch_stats" not in inst


def test_encoder_decoder_ablation_removes_the_skips():
  unet = models.UNetGenerator(num_downs=5, ngf=4)
  plain = models.UNetGenerator(num_downs=5, ngf=4, skip_connections=False)
  _, with_skips = _init_shapes(unet, (1, 32, 32, 3))
  _, no_skips = _init_shapes(plain, (1, 32, 32, 3))
  # Without the concatenation, each up-conv but the innermost sees half the channels.
  assert with_skips["params"]["up_1"]["kernel"].shape == (4, 4, 16, 4)
  assert no_skips["params"]["up_1"]["kernel"].shape == (4, 4, 8, 4)
  assert no_skips["params"]["up_4"]["kernel"].shape == with_skips["params"]["up_4"]["kernel"].shape
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = plain.init(jax.random.key(1), x)
  out = plain.apply(variables, x, use_running_average=True, deterministic=True)
  assert out.shape == (2, 32, 32, 3) and float(jnp.abs(out).max()) <= 1.0


@pytest.mark.parametrize("shape", [(1, 250, 256, 3), (1, 256, 200, 3), (1, 128, 128, 3)])
def test_sizes_that_do_not_fit_the_unet_are_refused_before_compiling(shape):
  with pytest.raises(ValueError, match="multiples of 256"):
    _init_shapes(models.UNetGenerator(num_downs=8), shape)


def test_unknown_choices_are_named():
  with pytest.raises(ValueError, match="norm='layer'"):
    _init_shapes(models.UNetGenerator(num_downs=5, ngf=4, norm="layer"), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="upconv_impl"):
    _init_shapes(models.UNetGenerator(num_downs=5, ngf=4, upconv_impl="fast"), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="conv_impl='im2col'"):
    _init_shapes(models.PatchDiscriminator(ndf=4, conv_impl="im2col"), (1, 32, 32, 3),
                 (1, 32, 32, 3))


def test_network_forms_share_parameters_outputs_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  y = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  # ngf 32 at 32x32 puts the inner levels in the matmul regime of the `auto` forms.
  auto = models.UNetGenerator(num_downs=5, ngf=32)
  variables = auto.init(jax.random.key(1), x)
  disc = models.PatchDiscriminator(n_layers=3, ndf=8)
  disc_variables = disc.init(jax.random.key(3), x, y)

  def loss(params, generator):
    fake = generator.apply({**variables, "params": params}, x, use_running_average=True,
                           deterministic=True)
    logits = disc.apply(disc_variables, x, fake, use_running_average=True)
    return jnp.mean(jnp.abs(fake - y)) + jnp.mean(logits), fake

  reference, reference_fake = jax.grad(loss, has_aux=True)(
      variables["params"], auto.clone(upconv_impl="dilated", conv_impl="xla"))
  for form in (auto, auto.clone(upconv_impl="subpixel")):
    grads, fake = jax.grad(loss, has_aux=True)(variables["params"], form)
    np.testing.assert_allclose(fake, reference_fake, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The discriminator's forms, on its own parameters.
  xla_disc = disc.clone(conv_impl="xla")
  np.testing.assert_allclose(disc.apply(disc_variables, x, y, use_running_average=True),
                             xla_disc.apply(disc_variables, x, y, use_running_average=True),
                             atol=1e-5)


def test_bfloat16_compute_follows_float32():
  """`dtype=bfloat16` runs every `auto` form (Winograd included) in bfloat16 with
  float32 sums: the loss and gradients stay within a few bfloat16 roundings of
  float32's (XLA's own bfloat16 convolutions are 3-8% off here, `auto` 5-10%)."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  y = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  disc = models.PatchDiscriminator(n_layers=3, ndf=8)       # conv_3: 32 -> 64, Winograd
  variables = disc.init(jax.random.key(3), x, y)

  def loss(params, image, module):
    logits = module.apply({**variables, "params": params}, x, image, use_running_average=True)
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  want_value, (want_params, want_image) = jax.value_and_grad(loss, argnums=(0, 1))(
      variables["params"], y, disc)
  value, (params, image) = jax.value_and_grad(loss, argnums=(0, 1))(
      variables["params"], y, disc.clone(dtype=jnp.bfloat16))
  assert image.dtype == jnp.float32
  np.testing.assert_allclose(value, want_value, rtol=0.1)
  # Each gradient as a whole (single entries can be sums that nearly cancel).
  for got, want in zip(jax.tree.leaves((params, image)), jax.tree.leaves((want_params, want_image))):
    error = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
    assert error < 0.15, (got.shape, error)


def test_dropout_placement():
  assert models._dropout_levels(8, "pytorch") == {4, 5, 6}    # up outputs of 16, 8, 4 px
  assert models._dropout_levels(8, "paper") == {5, 6, 7}      # up outputs of 8, 4, 2 px
  assert models._dropout_levels(7, "pytorch") == {4, 5}
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  unet = models.UNetGenerator(num_downs=6, ngf=4)
  variables = unet.init(jax.random.key(1), x)
  def run(module, seed):
    return module.apply(variables, x, rngs={"dropout": jax.random.key(seed)},
                        mutable=["batch_stats"])[0]
  assert np.abs(run(unet, 0) - run(unet, 1)).max() > 1e-3     # z enters as dropout
  quiet = unet.clone(dropout_rate=0.0)
  np.testing.assert_array_equal(run(quiet, 0), run(quiet, 1))


def test_batch_norm_follows_pytorch_conventions():
  x = jax.random.normal(jax.random.key(0), (4, 3, 5, 2)) * 3 + 1
  bn = models.BatchNorm()
  variables = bn.init(jax.random.key(1), x, use_running_average=False)
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 2).astype(np.float64)
  scale = np.asarray(variables["params"]["scale"])
  expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5) * scale
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), expected, atol=1e-5)
  # Running statistics: momentum 0.1 towards the batch, unbiased variance.
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)
  assert abs(float(np.mean(scale)) - 1.0) < 0.1 and float(np.std(scale)) > 0   # N(1, 0.02)


def test_initialisation_is_normal_0_02():
  _, variables = _init_shapes(models.UNetGenerator(num_downs=5, ngf=8), (1, 32, 32, 3))
  generator = models.UNetGenerator(num_downs=5, ngf=8)
  params = generator.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  kernel = np.asarray(params["down_2"]["kernel"])
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
  np.testing.assert_array_equal(params["up_0"]["bias"], 0.0)
  assert jax.tree.structure(params) == jax.tree.structure(variables["params"])


def _normalize_by_autodiff(x, scale, bias):
  """BatchNorm's normalisation written plainly, for XLA's autodiff to differentiate."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias


def test_batch_normalize_has_autodiff_gradients_and_rounds_bfloat16_once():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 6, 5, 3)) * 3 + 1, jnp.float32)
  scale, bias = (jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(2))
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  (y, mean, var), pullback = jax.vjp(lambda *a: ops.batch_normalize(*a, 1e-5), x, scale, bias)
  want, want_pullback = jax.vjp(_normalize_by_autodiff, x, scale, bias)
  np.testing.assert_allclose(y, want, atol=1e-5)
  np.testing.assert_allclose(mean, np.asarray(x).mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(var, np.asarray(x).var((0, 1, 2)), rtol=1e-5)
  zeros = jnp.zeros_like(mean)
  for got, expected in zip(pullback((cotangent, zeros, zeros)), want_pullback(cotangent)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # bfloat16 activations: float32 arithmetic, one rounding at the end; the input gradient
  # in bfloat16, the parameters' in float32 (their sums over every pixel unrounded).
  x16 = x.astype(jnp.bfloat16)
  (y16, _, _), pullback16 = jax.vjp(lambda *a: ops.batch_normalize(*a, 1e-5), x16, scale, bias)
  exact = np.asarray(_normalize_by_autodiff(x16.astype(jnp.float32), scale, bias), np.float64)
  assert y16.dtype == jnp.bfloat16
  # One rounding to bfloat16's 8 significant bits moves a value by at most 2**-8 of it.
  assert (np.abs(np.asarray(y16, np.float64) - exact) <= 2 ** -8 * np.abs(exact) + 1e-6).all()
  x_grad, scale_grad, bias_grad = pullback16((cotangent.astype(jnp.bfloat16), zeros, zeros))
  assert x_grad.dtype == jnp.bfloat16 and scale_grad.dtype == bias_grad.dtype == jnp.float32
  np.testing.assert_allclose(bias_grad, np.asarray(cotangent.astype(jnp.bfloat16),
                                                   np.float64).sum((0, 1, 2)), rtol=1e-5)


def test_batch_normalize_across_replicas_is_the_whole_batch_normalised():
  """Under pmap with the axis, 8 replicas' quarters are normalised, and their input
  gradients found, as the whole batch on one device; each replica's parameter
  gradients are its own share of the whole batch's."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 3, 2, 4)) * 2 - 1, jnp.float32)
  scale, bias = (jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(2))
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def pulled(x, cotangent, axis_name):
    (y, _, _), pullback = jax.vjp(lambda *a: ops.batch_normalize(*a, 1e-5, axis_name),
                                  x, scale, bias)
    zeros = jnp.zeros(4)
    return (y, *pullback((cotangent, zeros, zeros)))

  whole = pulled(x, cotangent, None)
  shards = jax.pmap(lambda x, c: pulled(x, c, "batch"), axis_name="batch")(
      x.reshape(8, 2, 3, 2, 4), cotangent.reshape(8, 2, 3, 2, 4))
  for got, want in zip(shards[:2], whole[:2]):             # y, input gradient
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=1e-5)
  for got, want in zip(shards[2:], whole[2:]):             # scale and bias gradients
    np.testing.assert_allclose(np.asarray(got).sum(0), want, rtol=1e-5, atol=1e-5)
