"""Image-quality metrics of generated images against their targets: L1, PSNR, SSIM.

All take images [N, H, W, C] in [-1, 1] (the networks' range) and return one
value per image, so callers can mask padding and average over a split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _to_unit(images: jax.Array) -> jax.Array:
  return (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0


def l1(fake: jax.Array, real: jax.Array) -> jax.Array:
  """Mean absolute error in [-1, 1] units (what the L1 loss measures), per image."""
  return jnp.mean(jnp.abs(fake.astype(jnp.float32) - real.astype(jnp.float32)), axis=(1, 2, 3))


def psnr(fake: jax.Array, real: jax.Array) -> jax.Array:
  """Peak signal-to-noise ratio in dB with pixels in [0, 1], per image (capped at 100)."""
  mse = jnp.mean(jnp.square(_to_unit(fake) - _to_unit(real)), axis=(1, 2, 3))
  return jnp.minimum(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)), 100.0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-coords ** 2 / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def _blur(images: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable 'valid' Gaussian filter of each channel: [N, H, W, C] -> [N, H-10, W-10, C]."""
  channels = images.shape[-1]
  size = window.shape[0]
  def conv(x, kernel_shape):
    kernel = jnp.broadcast_to(window.reshape(kernel_shape + (1, 1)), kernel_shape + (1, channels))
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", feature_group_count=channels,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return conv(conv(images, (size, 1)), (1, size))


def ssim(fake: jax.Array, real: jax.Array) -> jax.Array:
  """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, pixels in [0, 1]), averaged over channels, per image.
  Images smaller than the window are compared with a window of their size."""
  x, y = _to_unit(fake), _to_unit(real)
  window = _gaussian_window(min(11, x.shape[1], x.shape[2]))
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_x, mu_y = _blur(x, window), _blur(y, window)
  var_x = _blur(x * x, window) - mu_x ** 2
  var_y = _blur(y * y, window) - mu_y ** 2
  cov = _blur(x * y, window) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
              / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def image_metrics(fake: jax.Array, real: jax.Array) -> dict[str, jax.Array]:
  """{'l1', 'psnr', 'ssim'}: one value per image."""
  return {"l1": l1(fake, real), "psnr": psnr(fake, real), "ssim": ssim(fake, real)}
