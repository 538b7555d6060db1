"""pix2pix objectives: the adversarial loss on PatchGAN logits and the L1 term.

G* = arg min_G max_D  L_cGAN(G, D) + lambda_l1 * L_L1(G), with the
non-saturating generator loss (G maximises log D(x, G(x))) and D's loss
halved, as in the paper and the authors' code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

GAN_MODES = ("vanilla", "lsgan")


def gan_loss(logits: jax.Array, target_is_real: bool, mode: str = "vanilla") -> jax.Array:
  """Mean adversarial loss of PatchGAN logits against an all-real or all-fake target.

  vanilla: sigmoid cross-entropy on logits. lsgan: mean squared error of the
  logits against 1 (real) or 0 (fake). No label smoothing.
  """
  target = jnp.full_like(logits, 1.0 if target_is_real else 0.0)
  if mode == "vanilla":
    return optax.sigmoid_binary_cross_entropy(logits, target).mean()
  if mode == "lsgan":
    return jnp.mean(jnp.square(logits - target))
  raise ValueError(f"loss.gan_mode={mode!r} is not one of {GAN_MODES}.")


def l1_loss(fake_b: jax.Array, real_b: jax.Array) -> jax.Array:
  """Mean absolute error over all pixels and channels."""
  return jnp.mean(jnp.abs(fake_b - real_b))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       mode: str = "vanilla") -> tuple[jax.Array, dict[str, jax.Array]]:
  """0.5 * (loss(D(x, y), real) + loss(D(x, G(x)), fake)), and its two halves."""
  d_real = gan_loss(real_logits, True, mode)
  d_fake = gan_loss(fake_logits, False, mode)
  return 0.5 * (d_real + d_fake), {"D_real": d_real, "D_fake": d_fake}
