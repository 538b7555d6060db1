"""The pmapped pix2pix step: replica-count invariance, learning, loss weights, compile once."""

import dataclasses
import logging
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from p2p_jax import losses
from p2p_jax import devices
from p2p_jax import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_config(**model):
  config = default.get_config("smoke")
  config.model.update({"ngf": 4, "ndf": 4, **model})
  return config


def _batch(size=8, side=32, seed=0):
  rng = np.random.default_rng(seed)
  real_a = rng.uniform(-1, 1, (size, side, side, 3)).astype(np.float32)
  real_b = np.tanh(2 * real_a[..., ::-1]).astype(np.float32)     # a function of A to learn
  return {"real_a": real_a, "real_b": real_b}


def _gradient_recorder() -> optax.GradientTransformation:
  """An 'optimiser' whose state is the gradient it was given, so tests see it before Adam."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _with_recorders(state):
  recorder = _gradient_recorder()
  settings = dataclasses.replace(state.settings, gen_tx=recorder, disc_tx=recorder)
  return state.replace(
      settings=settings,
      generator=state.generator.replace(opt_state=recorder.init(state.generator.params)),
      discriminator=state.discriminator.replace(
          opt_state=recorder.init(state.discriminator.params)))


def _run_step(state, batch, local_devices, rng):
  step = step_lib.pmap_train_step(donate=False, local_devices=local_devices)
  replicated = devices.replicate(state, local_devices)
  new_state, metrics = step(replicated, devices.shard(batch, local_devices), rng)
  return devices.unreplicate(new_state), devices.unreplicate(metrics)


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def test_eight_devices_equal_one_device_with_synchronised_batch_norm():
  config = _small_config(dropout_rate=0.0)
  state = _with_recorders(step_lib.create_train_state(jax.random.key(0), config, 10))
  batch, rng = _batch(), jax.random.key(3)
  on_eight, metrics_eight = _run_step(state, batch, jax.local_devices()[:8], rng)
  on_one, metrics_one = _run_step(state, batch, jax.local_devices()[:1], rng)

  for name in ("G_GAN", "G_L1", "D_real", "D_fake"):
    assert _relative_error(metrics_eight[name], metrics_one[name]) < 1e-5, name
  for net in ("generator", "discriminator"):
    eight, one = getattr(on_eight, net), getattr(on_one, net)
    grads = jax.tree_util.tree_leaves_with_path(eight.opt_state)
    assert len(grads) > 4
    for (path, grad8), grad1 in zip(grads, jax.tree.leaves(one.opt_state)):
      assert np.abs(grad1).max() > 0, path
      assert _relative_error(grad8, grad1) < 1e-5, (net, jax.tree_util.keystr(path))
    for (path, stat8), stat1 in zip(jax.tree_util.tree_leaves_with_path(eight.batch_stats),
                                    jax.tree.leaves(one.batch_stats)):
      assert _relative_error(stat8, stat1) < 1e-5, (net, jax.tree_util.keystr(path))


def test_per_replica_batch_norm_differs_from_synchronised():
  batch, rng = _batch(), jax.random.key(3)
  results = []
  for sync in (True, False):
    config = _small_config(dropout_rate=0.0, sync_batch_norm=sync)
    state = _with_recorders(step_lib.create_train_state(jax.random.key(0), config, 10))
    updated, _ = _run_step(state, batch, jax.local_devices()[:8], rng)
    results.append(updated.generator.opt_state["down_1"]["kernel"])   # G's gradient
  assert _relative_error(results[0], results[1]) > 1e-2


def test_small_networks_overfit_one_batch():
  config = _small_config(ngf=16)
  config.optim.learning_rate = 2e-3
  state = devices.replicate(step_lib.create_train_state(jax.random.key(0), config, 1000))
  step = step_lib.pmap_train_step()
  real_a = _batch()["real_a"]
  batch = devices.shard({"real_a": real_a, "real_b": -real_a})
  history = []
  for i in range(80):
    state, metrics = step(state, batch, jax.random.key(i))
    history.append(float(metrics["G_L1"][0]))
  assert all(np.isfinite(history))
  assert np.mean(history[-5:]) < 0.5 * history[0], history


def test_lambda_gan_zero_is_exactly_the_l1_only_update():
  config = _small_config(dropout_rate=0.0)
  config.loss.lambda_gan = 0.0
  state = _with_recorders(step_lib.create_train_state(jax.random.key(0), config, 10))
  batch, eight, rng = _batch(), jax.local_devices()[:8], jax.random.key(3)
  updated, metrics = _run_step(state, batch, eight, rng)

  # D's weights have no say in G's update...
  other_disc = state.discriminator.replace(
      params=jax.tree.map(lambda p: p + 0.5, state.discriminator.params))
  with_other_disc, _ = _run_step(state.replace(discriminator=other_disc), batch, eight, rng)
  for a, b in zip(jax.tree.leaves(updated.generator.opt_state),
                  jax.tree.leaves(with_other_disc.generator.opt_state)):
    np.testing.assert_array_equal(a, b)

  # ... and G's gradient is that of lambda_l1 * L1 alone.
  generator = state.settings.generator
  def l1_only(params, batch_stats, real_a, real_b):
    fake_b, _ = generator.apply({"params": params, "batch_stats": batch_stats}, real_a,
                                mutable=["batch_stats"])
    return config.loss.lambda_l1 * losses.l1_loss(fake_b, real_b)
  def grad_fn(params, batch_stats, batch):
    grads = jax.grad(l1_only)(params, batch_stats, batch["real_a"], batch["real_b"])
    return jax.lax.pmean(grads, devices.AXIS_NAME)
  expected = jax.pmap(grad_fn, axis_name=devices.AXIS_NAME, in_axes=(None, None, 0))(
      state.generator.params, state.generator.batch_stats, devices.shard(batch, eight))
  for got, want in zip(jax.tree.leaves(updated.generator.opt_state), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, np.asarray(want)[0], rtol=1e-5, atol=1e-8)
  assert metrics["G_GAN"] == 0.0


def test_step_compiles_once(caplog):
  config = _small_config()
  state = devices.replicate(step_lib.create_train_state(jax.random.key(0), config, 10))
  step = step_lib.pmap_train_step()
  batch = devices.shard(_batch())
  state, _ = step(state, batch, jax.random.key(0))        # compiles here
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    for i in range(1, 4):
      state, metrics = step(state, devices.shard(_batch(seed=i)), jax.random.key(i))
    jax.block_until_ready(metrics)
  assert not [r for r in caplog.records if "train_step" in r.getMessage()]
  assert int(devices.unreplicate(state).step) == 4


def test_the_state_is_donated_on_accelerators_and_not_on_cpus():
  cpus = jax.local_devices()
  assert not step_lib.donates_state(cpus) and not step_lib.donates_state()
  for platform in ("gpu", "tpu"):
    assert step_lib.donates_state([types.SimpleNamespace(platform=platform)])
  config = _small_config()
  state = step_lib.create_train_state(jax.random.key(0), config, 10)
  batch, rng = devices.shard(_batch()), jax.random.key(1)
  kept, donated = devices.replicate(state), devices.replicate(state)
  new_kept, _ = step_lib.pmap_train_step()(kept, batch, rng)
  new_donated, _ = step_lib.pmap_train_step(donate=True)(donated, batch, rng)
  # On these CPUs the default step leaves the state it was given as it was ...
  for given, initial in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
    assert not given.is_deleted()
    np.testing.assert_array_equal(given[0], initial)
  # ... a donating one consumes it; both compute the same new state.
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated.generator.params))
  jax.tree.map(np.testing.assert_array_equal, new_kept, new_donated)


def test_dropout_differs_per_replica_and_per_step():
  """With one example copied to every replica, equal dropout masks would make the
  8-replica gradient equal the 1-replica one; different masks make it differ."""
  config = _small_config(num_downs=6, sync_batch_norm=False)
  config.data.crop_size = 64
  state = _with_recorders(step_lib.create_train_state(jax.random.key(0), config, 10))
  one = _batch(size=1, side=64)
  copies = {k: np.repeat(v, 8, axis=0) for k, v in one.items()}
  rng = jax.random.key(3)
  def grad_of(state, batch, local_devices):
    return _run_step(state, batch, local_devices, rng)[0].generator.opt_state["down_1"]["kernel"]
  single = grad_of(state, one, jax.local_devices()[:1])
  assert _relative_error(grad_of(state, copies, jax.local_devices()[:8]), single) > 1e-3
  assert _relative_error(grad_of(state.replace(step=jnp.ones((), jnp.int32)), one,
                                 jax.local_devices()[:1]), single) > 1e-3
  quiet = _small_config(num_downs=6, sync_batch_norm=False, dropout_rate=0.0)
  quiet.data.crop_size = 64
  state = _with_recorders(step_lib.create_train_state(jax.random.key(0), quiet, 10))
  assert _relative_error(grad_of(state, copies, jax.local_devices()[:8]),
                         grad_of(state, one, jax.local_devices()[:1])) < 1e-5


def test_learning_rate_schedule_is_the_official_linear_decay():
  lr = step_lib.create_learning_rate_fn(2e-4, steps_per_epoch=10, n_epochs=3, n_epochs_decay=2)
  def factor(epoch):                    # PIX2PIX_FACTS: 1 - max(0, t + 1 - n) / (n_decay + 1)
    return 1 - max(0, epoch + 1 - 3) / (2 + 1)
  for step in (0, 9, 10, 29, 30, 39, 40, 49):
    assert float(lr(step)) == pytest.approx(2e-4 * factor(step // 10), rel=1e-6), step
  assert float(lr(50)) == 0.0 and float(lr(10_000)) == 0.0


def test_losses():
  logits = jnp.array([[-2.0, 0.0, 3.0]])
  bce_real = np.mean(np.log1p(np.exp(-np.array([-2.0, 0.0, 3.0]))))
  assert float(losses.gan_loss(logits, True)) == pytest.approx(bce_real, rel=1e-6)
  assert float(losses.gan_loss(logits, False, "lsgan")) == pytest.approx((4 + 0 + 9) / 3)
  d_loss, parts = losses.discriminator_loss(logits, -logits)
  assert float(d_loss) == pytest.approx(0.5 * (parts["D_real"] + parts["D_fake"]))
  assert float(parts["D_real"]) == pytest.approx(float(parts["D_fake"]))
  with pytest.raises(ValueError, match="wgan"):
    losses.gan_loss(logits, True, "wgan")


# Relative, per loss and step: 2.5 bfloat16 roundings (2**-8 each); measured: 0.16%.
BF16_LOSS_BOUND = 0.01


@pytest.mark.parametrize("units", ["1", "0"])
def test_bfloat16_policy_keeps_state_and_losses_in_float32_and_follows_float32(units):
  """`:bf16`: activations and matmul/convolution operands in bfloat16; parameters,
  Adam moments, BatchNorm statistics and losses float32. Over the first steps of the
  smoke config its losses stay within BF16_LOSS_BOUND of float32's, with the dot forms
  of a CPU with bfloat16 units and with float32's forms, whatever this CPU has.

  Checked in a process of its own: late in a full test session, XLA:CPU has twice
  aborted while compiling this bfloat16 step (never alone, nor in the smaller
  groups of test files tried); a fresh process keeps the check and the suite.
  """
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             P2P_JAX_CPU_BFLOAT16_UNITS=units)
  if units == "0":
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  # The dot forms compile with XLA's full optimisations, as in training: they decide the
  # layouts of bfloat16 dots, some of which XLA:CPU refuses at run time.
  result = subprocess.run([sys.executable, "-c", "from tests import test_train_step as t; "
                           "t.check_bfloat16_policy()"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "bfloat16 policy checked" in result.stdout


def check_bfloat16_policy():
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for variant in ("smoke", "smoke,bf16"):
    config = default.get_config(variant)
    state = devices.replicate(step_lib.create_train_state(jax.random.key(0), config, 10))
    step = step_lib.pmap_train_step()
    history = []
    for i in range(4):
      state, metrics = step(state, devices.shard(_batch(seed=i)), jax.random.key(i))
      history.append(devices.unreplicate(metrics))
    results[variant] = (devices.unreplicate(state), history, config)
  state, history, config = results["smoke,bf16"]
  assert config.model.dtype == "bfloat16"
  for leaf in jax.tree.leaves((state.generator, state.discriminator)):
    assert leaf.dtype in (np.float32, np.int32), leaf.dtype
  for got, want in zip(history, results["smoke"][1]):
    for name in ("G_GAN", "G_L1", "D_real", "D_fake"):
      assert got[name].dtype == np.float32
      assert abs(got[name] - want[name]) < BF16_LOSS_BOUND * abs(want[name]), (name, got, want)
  # The convolutions and matmuls do run in bfloat16 (float32 sums).
  generator = state.settings.generator
  variables = state.generator.variables()
  jaxpr = str(jax.make_jaxpr(lambda x: generator.clone(bn_axis_name=None).apply(
      variables, x, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]))(
          _batch(size=2)["real_a"]))
  assert "bf16" in jaxpr and "preferred_element_type=float32" in jaxpr
  print("bfloat16 policy checked")


def test_layer_forms_and_model_flops_come_from_the_traced_layers():
  config = default.get_config()          # unet_256 with the 70x70 PatchGAN at 256x256
  layers = step_lib.trace_layers(config, per_device_batch=1)
  assert [len(layers["generator"]), len(layers["discriminator"])] == [16, 5]
  # README's figure: about 87 GFLOP per 256x256 image, whatever the forms.
  assert step_lib.model_flops(layers) / 1e9 == pytest.approx(86.94, abs=0.01)
  xla = default.get_config()
  xla.model.update(conv_impl="xla", upconv_impl="dilated")
  xla_layers = step_lib.trace_layers(xla, per_device_batch=1)
  assert step_lib.model_flops(xla_layers) == step_lib.model_flops(layers)
  assert step_lib.model_flops(layers, lambda_gan=0.0) < step_lib.model_flops(layers)
  assert step_lib.describe_forms(xla_layers) == {
      "generator": {"conv4x4": {"xla": 8}, "conv_transpose4x4": {"dilated": 8}},
      "discriminator": {"conv4x4": {"xla": 5}}}
  forms = step_lib.describe_forms(layers)         # on this CPU, `auto` is `by_shape`
  assert forms["discriminator"]["conv4x4"] == {"s2": 3, "winograd": 1, "taps": 1}
  assert sum(forms["generator"]["conv_transpose4x4"].values()) == 8
