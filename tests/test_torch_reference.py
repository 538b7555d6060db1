"""One p2p_jax step computes what one step of the PyTorch reference computes.

`tests/torch_reference.py` is an independent PyTorch implementation of the
official pix2pix iteration (numerically equal to the authors' code). Both start
from the same weights and batch; the losses, D's gradient and its Adam update,
D's BatchNorm statistics and G's gradient (taken against the updated D) must agree.

What is compared, and how closely. The two sides sum the same products in other
orders (and `auto` runs the PatchGAN's stride-1 layer by Winograd, whose float32
error is about twice a direct convolution's), so each value differs by float32
rounding: for a sum of K terms about sqrt(K) * 6e-8 of its scale, under 1e-5 at
K = 16 * 512. The bounds are 10x that, and a real difference (a wrong tap, a
missing term, a swapped statistic) is of order 1.
- Losses and gradients, relative to their own size (a gradient as a whole, as
  the norm of the difference over its norm: single entries can be sums that
  nearly cancel).
- D's weights after Adam only where the gradient is not tiny. Adam's first step
  moves each weight by lr * g / (|g| + eps), about lr * sign(g) whatever |g| is,
  so a gradient entry within rounding of zero can take either sign on two correct
  implementations and move the weight by lr either way: those entries are only
  held to a move of at most lr.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from configs import default
from p2p_jax import devices
from p2p_jax import step as step_lib

from tests import torch_reference

ROUNDING_BOUND = 1e-4   # relative: 10x float32's rounding in these sums (see above)
LEARNING_RATE = 2e-4

NUM_DOWNS, SIDE, BATCH = 5, 32, 2


def _numpy(tensor):
  return tensor.detach().numpy().copy()


def _batch_norm(module):
  return ({"scale": _numpy(module.weight), "bias": _numpy(module.bias)},
          {"mean": _numpy(module.running_mean), "var": _numpy(module.running_var)})


def _reference_variables(step):
  """The reference networks' weights in our layout (OIHW -> HWIO, IOHW -> HW,I,O)."""
  conv = lambda w: _numpy(w).transpose(2, 3, 1, 0)
  conv_transpose = lambda w: _numpy(w).transpose(2, 3, 0, 1)
  gen_params, gen_stats = {}, {}
  for level, module in enumerate(step.G.down_convs):
    gen_params[f"down_{level}"] = {"kernel": conv(module.weight)}
    if isinstance(step.G.down_norms[level], torch.nn.BatchNorm2d):
      gen_params[f"down_norm_{level}"], gen_stats[f"down_norm_{level}"] = _batch_norm(
          step.G.down_norms[level])
  for j, module in enumerate(step.G.up_convs):     # j = 0 is the innermost level
    level = NUM_DOWNS - 1 - j
    gen_params[f"up_{level}"] = {"kernel": conv_transpose(module.weight)}
    if module.bias is not None:
      gen_params[f"up_{level}"]["bias"] = _numpy(module.bias)
    if isinstance(step.G.up_norms[j], torch.nn.BatchNorm2d):
      gen_params[f"up_norm_{level}"], gen_stats[f"up_norm_{level}"] = _batch_norm(step.G.up_norms[j])
  disc_params, disc_stats = {}, {}
  for index, module in enumerate([step.D.c1, step.D.c2, step.D.c3, step.D.c4, step.D.c5]):
    disc_params[f"conv_{index}"] = {"kernel": conv(module.weight)}
    if module.bias is not None:
      disc_params[f"conv_{index}"]["bias"] = _numpy(module.bias)
  for index, module in zip((1, 2, 3), (step.D.n2, step.D.n3, step.D.n4)):
    disc_params[f"norm_{index}"], disc_stats[f"norm_{index}"] = _batch_norm(module)
  return (gen_params, gen_stats), (disc_params, disc_stats), conv, conv_transpose


def _relative_error(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)


def _adam_keeping_gradients(adam):
  """Adam whose state also holds the last gradient, so the test reads both."""
  return optax.GradientTransformation(
      init=lambda params: (adam.init(params), jax.tree.map(jnp.zeros_like, params)),
      update=lambda grads, state, params=None: (
          lambda out: (out[0], (out[1], grads)))(adam.update(grads, state[0], params)))


def test_one_step_equals_the_pytorch_reference_step():
  reference = torch_reference.Pix2PixStep(image_size=SIDE, num_downs=NUM_DOWNS, seed=0)
  reference.G.dropout = 0.0                      # the one random part, off on both sides
  (gen_params, gen_stats), (disc_params, disc_stats), conv, conv_transpose = (
      _reference_variables(reference))

  config = default.get_config("smoke")
  config.model.update(ngf=64, ndf=64, dropout_rate=0.0, num_downs=NUM_DOWNS)
  config.data.crop_size = SIDE
  state = step_lib.create_train_state(jax.random.key(0), config, steps_per_epoch=10)
  for ours, theirs in ((state.generator.params, gen_params),
                       (state.discriminator.params, disc_params)):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  # D gets the real Adam (keeping its gradient); G's "optimiser" records its
  # gradient, to compare before Adam.
  disc_tx = _adam_keeping_gradients(optax.adam(LEARNING_RATE, b1=0.5, b2=0.999, eps=1e-8))
  recorder = optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, s, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
  state = state.replace(
      settings=dataclasses.replace(state.settings, gen_tx=recorder, disc_tx=disc_tx),
      generator=step_lib.NetState(gen_params, gen_stats, recorder.init(gen_params)),
      discriminator=step_lib.NetState(disc_params, disc_stats, disc_tx.init(disc_params)))

  real_a, real_b = torch_reference.random_batch(BATCH, SIDE)
  reference.step(real_a, real_b)
  batch = {"real_a": _numpy(real_a).transpose(0, 2, 3, 1),
           "real_b": _numpy(real_b).transpose(0, 2, 3, 1)}
  one_device = jax.local_devices()[:1]
  step = step_lib.pmap_train_step(donate=False, local_devices=one_device)
  new_state, metrics = step(devices.replicate(state, one_device),
                            devices.shard(batch, one_device), jax.random.key(0))
  new_state, metrics = devices.unreplicate(new_state), devices.unreplicate(metrics)

  theirs = {name: float(value) for name, value in reference.losses.items()}
  assert abs(0.5 * (metrics["D_real"] + metrics["D_fake"]) - theirs["D"]) < 1e-5
  assert abs(metrics["G_GAN"] - theirs["G_GAN"]) < ROUNDING_BOUND * abs(theirs["G_GAN"])
  assert abs(metrics["G_L1"] - theirs["G_L1"]) < 1e-5 * abs(theirs["G_L1"])   # one sum, no D

  disc_grads = new_state.discriminator.opt_state[1]
  covered = 0
  for index, module in enumerate([reference.D.c1, reference.D.c2, reference.D.c3,
                                  reference.D.c4, reference.D.c5]):
    name = f"conv_{index}"
    grad, want_grad = disc_grads[name]["kernel"], conv(module.weight.grad)
    assert _relative_error(grad, want_grad) < ROUNDING_BOUND, name
    before = disc_params[name]["kernel"]
    updated, want = new_state.discriminator.params[name]["kernel"], conv(module.weight)
    # Where |g| is well above its rounding, both sides move by lr * sign(g), to rounding.
    clear = np.abs(want_grad) > 1e-3 * np.abs(want_grad).max()
    assert np.abs(updated - want)[clear].max() < 1e-3 * LEARNING_RATE, name
    assert np.abs(updated - before).max() < LEARNING_RATE * (1 + 1e-3), name
    covered += clear.sum() / clear.size
  assert covered / 5 > 0.9                     # the clear entries are nearly all of them
  for (name, stats), module in zip(sorted(new_state.discriminator.batch_stats.items()),
                                   (reference.D.n2, reference.D.n3, reference.D.n4)):
    assert _relative_error(stats["mean"], _numpy(module.running_mean)) < ROUNDING_BOUND, name
    assert _relative_error(stats["var"], _numpy(module.running_var)) < ROUNDING_BOUND, name

  gen_grads = new_state.generator.opt_state
  for level, module in enumerate(reference.G.down_convs):
    assert _relative_error(gen_grads[f"down_{level}"]["kernel"],
                           conv(module.weight.grad)) < ROUNDING_BOUND, level
  for j, module in enumerate(reference.G.up_convs):
    grad = gen_grads[f"up_{NUM_DOWNS - 1 - j}"]["kernel"]
    assert _relative_error(grad, conv_transpose(module.weight.grad)) < ROUNDING_BOUND, j
