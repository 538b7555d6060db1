"""The pix2pix step: both networks, their train state, and one compiled update.

Reads top to bottom: `create_model` builds G and D from the config,
`create_settings` adds their optimisers, schedule and loss weights,
`create_train_state` initialises both networks with them in one pytree,
`train_step` is the whole pix2pix iteration (one G forward, a D update, a G
update against the updated D) as one pure function run under `jax.pmap`
(`pmap_train_step`), and `eval_step` translates a batch at test time. The
training loop (`train`), evaluation, the benchmark and the weight converter
build on these; this module imports none of them. `trace_layers` lists the
layers each network runs (the forms `auto` chose, their FLOPs), and
`model_flops` counts a step's FLOPs from them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from p2p_jax import devices
from p2p_jax import losses
from p2p_jax import models
from p2p_jax.datasets.preprocess import Preprocess
from p2p_jax.ops import choose

AXIS_NAME = devices.AXIS_NAME
PyTree = Any


def create_model(model_config: ml_collections.ConfigDict, *, axis_name: str | None = AXIS_NAME
                 ) -> tuple[models.UNetGenerator, models.PatchDiscriminator]:
  """Builds the generator and discriminator that `model_config` describes.

  BatchNorm statistics are averaged over `axis_name` when
  `model_config.sync_batch_norm` is set (the default), so that the step
  normalises the global batch the same way on any number of devices.
  """
  if model_config.disc_type not in ("patch", "pixel"):
    raise ValueError(f"model.disc_type={model_config.disc_type!r} is not 'patch' or 'pixel'.")
  bn_axis = axis_name if model_config.sync_batch_norm else None
  dtype = jnp.dtype(model_config.dtype)
  generator = models.UNetGenerator(
      num_downs=model_config.num_downs, ngf=model_config.ngf, output_nc=model_config.output_nc,
      norm=model_config.norm, dropout_rate=model_config.dropout_rate,
      dropout_placement=model_config.dropout_placement,
      skip_connections=model_config.skip_connections, upconv_impl=model_config.upconv_impl,
      conv_impl=model_config.conv_impl, bn_axis_name=bn_axis, dtype=dtype)
  discriminator = models.PatchDiscriminator(
      n_layers=model_config.n_layers_d, ndf=model_config.ndf, norm=model_config.norm,
      pixel=model_config.disc_type == "pixel", conditional=model_config.conditional_d,
      conv_impl=model_config.conv_impl, bn_axis_name=bn_axis, dtype=dtype)
  return generator, discriminator


def create_learning_rate_fn(base_lr: float, steps_per_epoch: float, n_epochs: int,
                            n_epochs_decay: int) -> Callable[[jax.Array], jax.Array]:
  """The official pix2pix schedule, evaluated by step.

  Constant for `n_epochs`, then falling linearly over `n_epochs_decay`:
  factor(epoch t, 0-based) = 1 - max(0, t + 1 - n_epochs) / (n_epochs_decay + 1),
  with t = floor(step / steps_per_epoch), and 0 once training is over.
  """
  def learning_rate(step):
    epoch = jnp.floor(step / steps_per_epoch)
    factor = 1.0 - jnp.maximum(0.0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)
    return base_lr * jnp.clip(factor, 0.0, 1.0)
  return learning_rate


def create_optimizer(optim_config: ml_collections.ConfigDict,
                     learning_rate_fn: Callable[[jax.Array], jax.Array]
                     ) -> optax.GradientTransformation:
  """Adam(lr schedule, beta1, beta2), PyTorch's eps convention (eps outside the sqrt)."""
  return optax.adam(learning_rate_fn, b1=optim_config.beta1, b2=optim_config.beta2,
                    eps=optim_config.eps)


class NetState(flax.struct.PyTreeNode):
  """One network's trainable state: params, BatchNorm statistics, optimiser state."""
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState

  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def apply_gradients(self, grads: PyTree, batch_stats: PyTree,
                      tx: optax.GradientTransformation) -> "NetState":
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The step's fixed settings, beside the arrays: modules, optimisers, schedule, loss weights.

  Static under jit and pmap (a change recompiles the step)."""
  generator: models.UNetGenerator
  discriminator: models.PatchDiscriminator
  gen_tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  learning_rate_fn: Callable[[jax.Array], jax.Array]
  gan_mode: str = "vanilla"
  lambda_l1: float = 100.0
  lambda_gan: float = 1.0


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes: both networks in one pytree."""
  step: jax.Array
  generator: NetState
  discriminator: NetState
  settings: StepSettings = flax.struct.field(pytree_node=False)


def create_settings(config: ml_collections.ConfigDict, steps_per_epoch: float) -> StepSettings:
  """The step's settings for `config`: its modules, optimisers, schedule and loss weights."""
  if config.loss.gan_mode not in losses.GAN_MODES:
    raise ValueError(f"loss.gan_mode={config.loss.gan_mode!r} is not one of {losses.GAN_MODES}.")
  generator, discriminator = create_model(config.model)
  learning_rate_fn = create_learning_rate_fn(
      config.optim.learning_rate, steps_per_epoch, config.optim.n_epochs,
      config.optim.n_epochs_decay)
  return StepSettings(generator=generator, discriminator=discriminator,
                      gen_tx=create_optimizer(config.optim, learning_rate_fn),
                      disc_tx=create_optimizer(config.optim, learning_rate_fn),
                      learning_rate_fn=learning_rate_fn, gan_mode=config.loss.gan_mode,
                      lambda_l1=float(config.loss.lambda_l1),
                      lambda_gan=float(config.loss.lambda_gan))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       steps_per_epoch: float) -> TrainState:
  """Initialises G and D (on one host, unreplicated) for `config.data.crop_size` images."""
  settings = create_settings(config, steps_per_epoch)
  generator, discriminator = settings.generator, settings.discriminator
  size = config.data.crop_size
  real_a = jnp.zeros((1, size, size, config.model.input_nc), jnp.float32)
  real_b = jnp.zeros((1, size, size, config.model.output_nc), jnp.float32)
  models.check_image_size((size, size), config.model.num_downs)

  @jax.jit
  def init(rng):
    gen_rng, disc_rng, dropout_rng = jax.random.split(rng, 3)
    gen_vars = generator.init({"params": gen_rng, "dropout": dropout_rng}, real_a)
    disc_vars = discriminator.init(disc_rng, real_a, real_b)
    def net_state(variables, tx):
      return NetState(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]))
    return net_state(gen_vars, settings.gen_tx), net_state(disc_vars, settings.disc_tx)

  gen_state, disc_state = init(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), generator=gen_state,
                    discriminator=disc_state, settings=settings)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One pix2pix iteration on this replica's part of the batch (run under pmap).

  G runs forward once. D is updated on D(x, y) and D(x, stop_gradient(G(x))),
  two separate passes so BatchNorm sees the real and the fake batch apart;
  then G is updated against the updated D, by pulling the gradient of its loss
  with respect to G(x) back through the saved forward pass.

  Args:
    state: the replica's TrainState.
    batch: {'real_a': [B, H, W, C_in], 'real_b': [B, H, W, C_out]}, float32 in [-1, 1].
    rng: a key shared by all replicas; it is folded with the step and the
      replica index, so dropout differs per replica and per step.
  Returns:
    The new state and the step's metrics, averaged over replicas.
  """
  p2p = state.settings
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS_NAME))
  real_a, real_b = batch["real_a"], batch["real_b"]
  gen, disc = state.generator, state.discriminator

  def generate(params):
    fake_b, updates = p2p.generator.apply(
        {"params": params, "batch_stats": gen.batch_stats}, real_a,
        rngs={"dropout": rng}, mutable=["batch_stats"])
    return fake_b, updates.get("batch_stats", {})

  fake_b, generator_vjp, gen_batch_stats = jax.vjp(generate, gen.params, has_aux=True)

  def discriminate(params, batch_stats, image):
    logits, updates = p2p.discriminator.apply(
        {"params": params, "batch_stats": batch_stats}, real_a, image, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})

  def disc_loss_fn(params):
    # Fake first, then real: the order in which the official code moves D's running statistics.
    fake_logits, batch_stats = discriminate(params, disc.batch_stats, lax.stop_gradient(fake_b))
    real_logits, batch_stats = discriminate(params, batch_stats, real_b)
    loss, parts = losses.discriminator_loss(real_logits, fake_logits, p2p.gan_mode)
    return loss, (parts, batch_stats)

  (_, (disc_metrics, disc_batch_stats)), disc_grads = jax.value_and_grad(
      disc_loss_fn, has_aux=True)(disc.params)
  disc = disc.apply_gradients(devices.replica_mean(disc_grads), disc_batch_stats, p2p.disc_tx)

  def gen_loss_fn(fake_b):
    g_l1 = p2p.lambda_l1 * losses.l1_loss(fake_b, real_b)
    if p2p.lambda_gan == 0:       # "L1 only": D plays no part in G's update
      return g_l1, (jnp.zeros(()), g_l1, disc.batch_stats)
    fake_logits, batch_stats = discriminate(disc.params, disc.batch_stats, fake_b)
    g_gan = losses.gan_loss(fake_logits, True, p2p.gan_mode)
    return p2p.lambda_gan * g_gan + g_l1, (g_gan, g_l1, batch_stats)

  (_, (g_gan, g_l1, disc_batch_stats)), fake_b_grad = jax.value_and_grad(
      gen_loss_fn, has_aux=True)(fake_b)
  (gen_grads,) = generator_vjp(fake_b_grad)
  gen = gen.apply_gradients(devices.replica_mean(gen_grads), gen_batch_stats, p2p.gen_tx)
  disc = disc.replace(batch_stats=disc_batch_stats)

  metrics = {"G_GAN": g_gan, "G_L1": g_l1, **disc_metrics,
             "learning_rate": p2p.learning_rate_fn(state.step)}
  metrics = devices.replica_mean(metrics)
  return state.replace(step=state.step + 1, generator=gen, discriminator=disc), metrics


def eval_step(state: TrainState, real_a: jax.Array, rng: jax.Array | None, *,
              deterministic: bool = False, dropout: bool = True) -> jax.Array:
  """Translates real_a [B, H, W, C_in] in [-1, 1] to fake_b [B, H, W, C_out] in [-1, 1].

  Default, as the paper and the official test script: each image is run as a
  batch of one in training mode, so BatchNorm uses that image's own statistics
  and dropout stays on. `dropout=False` keeps the images' own statistics and
  turns dropout off (a function of the image alone; `rng` is unused).
  `deterministic=True` is the official `--eval`: running statistics and no
  dropout. Usable with or without pmap (no collectives).
  """
  generator = state.settings.generator.clone(bn_axis_name=None)
  variables = state.generator.variables()
  if deterministic:
    return generator.apply(variables, real_a, use_running_average=True, deterministic=True)
  if not dropout:
    return generator.apply(variables, real_a, deterministic=True, per_image_statistics=True)

  def translate_one(image, key):
    return generator.apply(variables, image[None], rngs={"dropout": key})[0]

  keys = jax.random.split(rng, real_a.shape[0])
  return jax.vmap(translate_one)(real_a, keys)


def preprocessed_train_step(prep: Preprocess, state: TrainState, batch: dict[str, jax.Array],
                            rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on a batch of the input pipeline: uint8 pairs, jittered here by `prep`.

  `batch` is {'image_a', 'image_b': uint8 [B, H, W, 3], 'epoch', 'index': int32
  [B]}; the resize, crop, flip and scaling run in the same compiled function
  as the step.
  """
  real_a, real_b = prep.train(batch)
  return train_step(state, {"real_a": real_a, "real_b": real_b}, rng)


def donates_state(local_devices: list[jax.Device] | tuple[jax.Device, ...] | None = None
                  ) -> bool:
  """Whether the step donates its state: on accelerators yes, on CPUs no.

  Donated, the new parameters and Adam moments overwrite the old ones in place,
  which halves the state's memory on a GPU or TPU. XLA:CPU orders such in-place
  updates conservatively: it copies every donated array that an update could
  overwrite before its last reader has run (donated, the demo's step holds 159
  more copies than undonated, 116 of them of whole parameters and moments), and
  those copies cost more than fresh buffers. Undonated, the CPU step ran up to 10%
  faster (unet_256 in bfloat16 at batch 1; within the noise for the demo in bfloat16;
  README's Speed section has the figures). The cost is memory: the old state
  (parameters and both moments: 0.1 GB for the demo, 0.7 GB for the 256x256
  networks) lives beside the new one, and the peak resident memory of a 256x256
  step at batch 1 rose by 1.2-1.4 GB.
  """
  return any(device.platform != "cpu" for device in (local_devices or jax.local_devices()))


@functools.lru_cache(maxsize=None)
def _pmapped_train_step(donate: bool, local_devices: tuple[jax.Device, ...] | None,
                        prep: Preprocess | None) -> Callable:
  step = train_step if prep is None else functools.partial(preprocessed_train_step, prep)
  return jax.pmap(step, axis_name=AXIS_NAME, in_axes=(0, 0, None),
                  donate_argnums=(0,) if donate else (), devices=local_devices)


def pmap_train_step(donate: bool | None = None,
                    local_devices: list[jax.Device] | tuple[jax.Device, ...] | None = None,
                    prep: Preprocess | None = None) -> Callable:
  """The step compiled under pmap over `local_devices` (default: all local devices).

  With `prep`, it takes the input pipeline's uint8 batches
  (`preprocessed_train_step`); without, float batches of real_a / real_b. With
  `donate` (default: `donates_state`), the state's buffers are reused for the
  new state, and the state passed in can no longer be read.
  """
  if donate is None:
    donate = donates_state(local_devices)
  return _pmapped_train_step(donate, tuple(local_devices) if local_devices else None, prep)


def trace_layers(config: ml_collections.ConfigDict, per_device_batch: int
                 ) -> dict[str, list[choose.Layer]]:
  """The linear layers of one forward pass of G and of D, as traced here (no compiling).

  Each `choose.Layer` says its kind, the form it runs on this backend for a
  per-device batch of `per_device_batch` crop_size x crop_size images, and its
  forward FLOPs. Returns {"generator": [...], "discriminator": [...]}, input layer first.
  """
  generator, discriminator = create_model(config.model, axis_name=None)
  size = config.data.crop_size
  real_a = jax.ShapeDtypeStruct((per_device_batch, size, size, config.model.input_nc),
                                jnp.float32)
  real_b = jax.ShapeDtypeStruct((per_device_batch, size, size, config.model.output_nc),
                                jnp.float32)
  key = jax.random.key(0)
  gen_vars = jax.eval_shape(lambda x: generator.init({"params": key, "dropout": key}, x), real_a)
  disc_vars = jax.eval_shape(discriminator.init, key, real_a, real_b)
  with choose.recording() as gen_layers:
    jax.eval_shape(lambda v, x: generator.apply(v, x, rngs={"dropout": key},
                                                mutable=["batch_stats"]), gen_vars, real_a)
  with choose.recording() as disc_layers:
    jax.eval_shape(lambda v, x, y: discriminator.apply(v, x, y, mutable=["batch_stats"]),
                   disc_vars, real_a, real_b)
  return {"generator": gen_layers, "discriminator": disc_layers}


def describe_forms(layers: dict[str, list[choose.Layer]]) -> dict[str, dict[str, dict[str, int]]]:
  """{network: {layer kind: {form: count}}}: which form each layer kind runs, and how often.

  In a bfloat16 model, a layer that runs in float32 (`choose.in_float32`) counts as
  "<form> in float32".
  """
  mixed = len({layer.dtype for network_layers in layers.values() for layer in network_layers}) > 1
  summary = {}
  for network, network_layers in layers.items():
    kinds = summary.setdefault(network, {})
    for layer in network_layers:
      form = f"{layer.form} in float32" if mixed and layer.dtype == "float32" else layer.form
      forms = kinds.setdefault(layer.kind, {})
      forms[form] = forms.get(form, 0) + 1
  return summary


def model_flops(layers: dict[str, list[choose.Layer]], lambda_gan: float = 1.0) -> int:
  """FLOPs of one train step for the batch `layers` were traced at, by the model's convention.

  Counted from the layer shapes, so the same for every form (XLA's own count
  leaves out what Winograd saves), and only the linear layers (convolutions and
  transposed convolutions: 2 x multiply-adds; norms and activations are not
  counted). With F a network's forward FLOPs and F_0 its input layer's: G runs
  forward, weight gradient and input gradient (each as its forward, none for
  its input layer): 3 F_G - F_G0. D's update runs two passes (real and fake),
  each forward, weight and input gradients: 2 (3 F_D - F_D0). D's pass for G's
  loss runs forward and input gradient: 2 F_D (none when lambda_gan = 0). About
  87 GFLOP per 256x256 image for unet_256 with the 70x70 PatchGAN.
  """
  gen = [layer.flops for layer in layers["generator"]]
  disc = [layer.flops for layer in layers["discriminator"]]
  total = 3 * sum(gen) - gen[0] + 2 * (3 * sum(disc) - disc[0])
  if lambda_gan:
    total += 2 * sum(disc)
  return total
