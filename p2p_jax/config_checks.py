"""Every config value checked before a run writes anything: ranges, choices, and how fields fit.

`check_config` raises `validation.ConfigError` for the first problem it finds,
naming the field, the value and the fix (with a "did you mean" for a choice
spelt wrong). Training and eval call it first, so a bad value never reaches the
workdir, the data or the compiler.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import ml_collections

from p2p_jax import devices
from p2p_jax import hardware
from p2p_jax import losses
from p2p_jax import models
from p2p_jax import perceptual
from p2p_jax import validation
from p2p_jax.datasets import preprocess
from p2p_jax.datasets import sources
from p2p_jax.datasets import synthetic
from p2p_jax.ops import conv
from p2p_jax.ops import conv_transpose

CHOICES: dict[str, Sequence[str]] = {
    "data.source": sources.SOURCES,
    "data.direction": ("AtoB", "BtoA"),
    "data.preprocess": preprocess.MODES,
    "model.generator": ("unet",),
    "model.dropout_placement": models.DROPOUT_PLACEMENTS,
    "model.disc_type": ("patch", "pixel"),
    "model.norm": models.NORMS,
    "model.upconv_impl": conv_transpose.IMPLS,
    "model.conv_impl": conv.IMPLS,
    "model.dtype": ("float32", "bfloat16"),
    "loss.gan_mode": losses.GAN_MODES,
    "eval.lpips": ("",) + perceptual.NETS,
}


_Range = tuple[Callable[[Any], bool], str, Any]   # (valid, what is wanted, a valid example)


def _at_least(low: float) -> _Range:
  return (lambda value: value >= low), f"at least {low:g}", low


def _minus_one_or_at_least(low: int) -> _Range:
  return (lambda value: value == -1 or value >= low), f"-1 or at least {low}", -1


def _between(low: float, high: float, example: float) -> _Range:
  return (lambda value: low <= value < high), f"in [{low:g}, {high:g})", example


RANGES: dict[str, _Range] = {
    "seed": _at_least(0),
    "batch_size": _at_least(1),
    "num_train_steps": _minus_one_or_at_least(1),
    "log_every_steps": _at_least(1),
    "checkpoint_every_steps": _at_least(1),
    "keep_checkpoints": _at_least(1),
    "image_every_steps": _at_least(0),
    "eval_every_steps": _at_least(0),
    "max_loss": _at_least(0),
    "data.load_size": _at_least(1),
    "data.crop_size": _at_least(1),
    "data.shuffle_buffer": _at_least(1),
    "data.num_train_examples": _at_least(1),
    "data.num_eval_examples": _at_least(1),
    "data.prefetch_to_device": _at_least(0),
    "model.num_downs": _at_least(1),
    "model.ngf": _at_least(1),
    "model.ndf": _at_least(1),
    "model.n_layers_d": _at_least(0),
    "model.dropout_rate": _between(0, 1, 0.5),
    "loss.lambda_l1": _at_least(0),
    "loss.lambda_gan": _at_least(0),
    # Far beyond any rate Adam trains pix2pix with (the paper's is 2e-4), so that a
    # slip such as 2e4 for 2e-4 is caught here and not as a diverging run.
    "optim.learning_rate": ((lambda value: 0 < value <= 1), "in (0, 1]", 2e-4),
    "optim.beta1": _between(0, 1, 0.5),
    "optim.beta2": _between(0, 1, 0.999),
    "optim.eps": ((lambda value: value > 0), "above 0", 1e-8),
    "optim.n_epochs": _at_least(0),
    "optim.n_epochs_decay": _at_least(0),
    "eval.step": _minus_one_or_at_least(0),
    "eval.batch_size": _at_least(1),
    "eval.num_images": _minus_one_or_at_least(1),
    "eval.save_images": _minus_one_or_at_least(0),
    "eval.fcn_scorer_steps": _at_least(1),
}


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  validation.check_choice(f"config.{field}", value, choices,
                          f"Pass e.g. --config.{field}={choices[0]}.")


def check_config(config: ml_collections.ConfigDict, *, train: bool = True,
                 num_devices: int | None = None) -> None:
  """Raises ConfigError for the first value of `config` that cannot work.

  `train`: also what only training needs (the batch splitting over
  `num_devices`, default all devices; a schedule with steps).
  """
  for field, choices in CHOICES.items():
    _check_choice(field, _get(config, field), choices)
  if config.data.source == "synthetic":
    _check_choice("data.name", config.data.name, synthetic.TASKS)
  for field, (valid, wanted, example) in RANGES.items():
    value = _get(config, field)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or isinstance(value, float) and not math.isfinite(value) or not valid(value)):
      raise validation.ConfigError(f"config.{field}={value!r} must be {wanted}, e.g. "
                                   f"--config.{field}={example:g}.")
  if config.data.cache and config.data.service_address:
    raise validation.ConfigError(
        "config.data.cache and config.data.service_address exclude each other: the service's "
        "workers decode, so there is nothing to cache here. Pass one of them.")
  preprocess.Preprocess.from_config(config)       # sizes and channels, each a ConfigError
  try:
    hardware.cpu_bfloat16_units()                 # P2P_JAX_CPU_BFLOAT16_UNITS, if set
  except ValueError as error:
    raise validation.UsageError(str(error)) from None
  if train:
    if config.num_train_steps == -1 and config.optim.n_epochs + config.optim.n_epochs_decay == 0:
      raise validation.ConfigError(
          "config.optim.n_epochs + config.optim.n_epochs_decay is 0 and config.num_train_steps "
          "is -1: there is nothing to train. Pass --config.num_train_steps=N or some epochs.")
    devices.check_batch_divides(config.batch_size,
                                jax.device_count() if num_devices is None else num_devices)
