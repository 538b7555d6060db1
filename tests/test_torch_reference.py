"""One p2p_jax step computes what one step of the PyTorch reference computes.

`shared/bench/torch_ref_step.py` is an independent PyTorch implementation of the
official pix2pix iteration (numerically equal to the authors' code). Both start
from the same weights and batch: the losses, D's Adam update, D's BatchNorm
statistics and G's gradient (taken against the updated D) must agree.
"""

import dataclasses
import functools
import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from configs import default
from p2p_jax import train

from tests.shared_files import shared_path


@functools.cache
def _reference():
  """shared/bench/torch_ref_step.py, imported when a test first needs it."""
  spec = importlib.util.spec_from_file_location(
      "torch_ref_step", shared_path("bench", "torch_ref_step.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module

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


def test_one_step_equals_the_pytorch_reference_step():
  reference = _reference().Pix2PixStep(image_size=SIDE, num_downs=NUM_DOWNS, seed=0)
  reference.G.dropout = 0.0                      # the one random part, off on both sides
  (gen_params, gen_stats), (disc_params, disc_stats), conv, conv_transpose = (
      _reference_variables(reference))

  config = default.get_config("smoke")
  config.model.update(ngf=64, ndf=64, dropout_rate=0.0, num_downs=NUM_DOWNS)
  config.data.crop_size = SIDE
  state = train.create_train_state(jax.random.key(0), config, steps_per_epoch=10)
  for ours, theirs in ((state.generator.params, gen_params),
                       (state.discriminator.params, disc_params)):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  # D gets the real Adam; G's "optimiser" records its gradient, to compare before Adam.
  adam = optax.adam(2e-4, b1=0.5, b2=0.999, eps=1e-8)
  recorder = optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, s, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
  state = state.replace(
      pix2pix=dataclasses.replace(state.pix2pix, gen_tx=recorder, disc_tx=adam),
      generator=train.NetState(gen_params, gen_stats, recorder.init(gen_params)),
      discriminator=train.NetState(disc_params, disc_stats, adam.init(disc_params)))

  real_a, real_b = _reference().random_batch(BATCH, SIDE)
  reference.step(real_a, real_b)
  batch = {"real_a": _numpy(real_a).transpose(0, 2, 3, 1),
           "real_b": _numpy(real_b).transpose(0, 2, 3, 1)}
  devices = jax.local_devices()[:1]
  step = train.pmap_train_step(donate=False, devices=devices)
  new_state, metrics = step(train.replicate(state, devices), train.shard(batch, devices),
                            jax.random.key(0))
  new_state, metrics = train.unreplicate(new_state), train.unreplicate(metrics)

  theirs = {name: float(value) for name, value in reference.losses.items()}
  assert abs(0.5 * (metrics["D_real"] + metrics["D_fake"]) - theirs["D"]) < 1e-5
  assert abs(metrics["G_GAN"] - theirs["G_GAN"]) < 1e-4 * abs(theirs["G_GAN"])
  assert abs(metrics["G_L1"] - theirs["G_L1"]) < 1e-5 * abs(theirs["G_L1"])

  for index, module in enumerate([reference.D.c1, reference.D.c2, reference.D.c3,
                                  reference.D.c4, reference.D.c5]):
    updated = new_state.discriminator.params[f"conv_{index}"]["kernel"]
    # Adam's first step moves each weight by about lr; round-off may flip the sign of a
    # vanishing gradient, so the bound is a small fraction of 2 * lr.
    assert np.abs(updated - conv(module.weight)).max() < 2e-4, index
  for (name, stats), module in zip(sorted(new_state.discriminator.batch_stats.items()),
                                   (reference.D.n2, reference.D.n3, reference.D.n4)):
    assert _relative_error(stats["mean"], _numpy(module.running_mean)) < 1e-4, name
    assert _relative_error(stats["var"], _numpy(module.running_var)) < 1e-4, name

  gen_grads = new_state.generator.opt_state
  for level, module in enumerate(reference.G.down_convs):
    assert _relative_error(gen_grads[f"down_{level}"]["kernel"], conv(module.weight.grad)) < 1e-4
  for j, module in enumerate(reference.G.up_convs):
    grad = gen_grads[f"up_{NUM_DOWNS - 1 - j}"]["kernel"]
    assert _relative_error(grad, conv_transpose(module.weight.grad)) < 1e-4
