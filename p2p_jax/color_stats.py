"""Colour statistics of generated images against real ones, as the paper's Figure 7.

The paper shows that L1 alone gives greyish, desaturated colours (when unsure
of a colour, the L1-optimal answer is the median, which lies towards grey),
while the adversarial loss pushes the colour distribution of the outputs
towards the real one. It compares the histograms of the outputs and of the
real images in CIE Lab space, channel by channel, by histogram intersection
(1 = identical distributions). This module computes, over a whole split:

  hist_intersection_{L,a,b}  intersection of the 1D histograms of L, a and b, in [0, 1]
  ab_hist_distance           total variation distance between the 2D (a, b) histograms,
                             in [0, 1]: 0 = the same colours, 1 = no colour in common
  mean_chroma_{fake,real}    mean chroma sqrt(a^2 + b^2) per pixel: lower = less saturated

and, for data with class maps (synthetic labels2facades), how evenly each region
is coloured:

  region_ab_spread_{fake,real}  the spread of colour inside one labelled region (one
                                wall, one window...), sqrt(var a + var b) over its pixels,
                                averaged over every region of every image, pixel-weighted.
                                Blotchy outputs (a wall in patches of two colours) score
                                far above their targets; a flat fill below them.

Colours are converted from sRGB (D65 white) with numpy; L is in [0, 100], a
and b are binned over [-128, 128] in steps of 4.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

_L_EDGES = np.linspace(0.0, 100.0, 51)
_AB_EDGES = np.linspace(-128.0, 128.0, 65)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],    # linear sRGB -> XYZ (D65)
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_DELTA = 6 / 29


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB [..., 3] in [0, 1] -> CIE Lab [..., 3] float32 (L in [0, 100], a and b about +-128)."""
  rgb = np.clip(np.asarray(rgb, np.float64), 0.0, 1.0)
  linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  xyz = linear @ _RGB_TO_XYZ.T / _D65_WHITE
  f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz), xyz / (3 * _DELTA ** 2) + 4 / 29)
  lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                  200 * (f[..., 1] - f[..., 2])], axis=-1)
  return lab.astype(np.float32)


def chroma(lab: np.ndarray) -> np.ndarray:
  """sqrt(a^2 + b^2) of Lab pixels [..., 3] -> [...]: 0 for greys."""
  return np.hypot(lab[..., 1], lab[..., 2])


def histogram_intersection(p: np.ndarray, q: np.ndarray) -> float:
  """sum(min(p, q)) of two histograms of counts, each normalised to sum 1: in [0, 1]."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return float(np.minimum(p / p.sum(), q / q.sum()).sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
  """0.5 * sum|p - q| of two histograms normalised to sum 1: in [0, 1], 1 - their intersection."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


class _Histograms:
  """Counts of L, a, b and (a, b) over many images, and their chroma sum."""

  def __init__(self):
    self.l = np.zeros(len(_L_EDGES) - 1)
    self.a = np.zeros(len(_AB_EDGES) - 1)
    self.b = np.zeros(len(_AB_EDGES) - 1)
    self.ab = np.zeros((len(_AB_EDGES) - 1,) * 2)
    self.chroma_sum = np.zeros(1)
    self.pixels = np.zeros(1)

  def add(self, images: np.ndarray) -> None:
    """images [N, H, W, 3] in [-1, 1] (the networks' range)."""
    lab = srgb_to_lab((np.asarray(images) + 1) / 2).reshape(-1, 3)
    # Out-of-range values land in the edge bins, so every pixel is counted.
    l = np.clip(lab[:, 0], _L_EDGES[0], _L_EDGES[-1])
    a, b = (np.clip(lab[:, i], _AB_EDGES[0], _AB_EDGES[-1]) for i in (1, 2))
    self.l += np.histogram(l, _L_EDGES)[0]
    self.a += np.histogram(a, _AB_EDGES)[0]
    self.b += np.histogram(b, _AB_EDGES)[0]
    self.ab += np.histogram2d(a, b, (_AB_EDGES, _AB_EDGES))[0]
    self.chroma_sum += chroma(lab).sum()
    self.pixels += len(lab)

  def flat(self) -> np.ndarray:
    return np.concatenate([self.l, self.a, self.b, self.ab.ravel(), self.chroma_sum, self.pixels])

  def load_flat(self, flat: np.ndarray) -> None:
    sizes = [self.l.size, self.a.size, self.b.size, self.ab.size, 1, 1]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    self.l, self.a, self.b = parts[:3]
    self.ab = parts[3].reshape(self.ab.shape)
    self.chroma_sum, self.pixels = parts[4], parts[5]


def _compare(fake: _Histograms, real: _Histograms) -> dict[str, float]:
  """The module's statistics of generated (`fake`) against `real` histograms."""
  out = {f"hist_intersection_{name}": histogram_intersection(getattr(fake, attr),
                                                             getattr(real, attr))
         for name, attr in (("L", "l"), ("a", "a"), ("b", "b"))}
  out["ab_hist_distance"] = total_variation(fake.ab, real.ab)
  out["mean_chroma_fake"] = float(fake.chroma_sum[0] / fake.pixels[0])
  out["mean_chroma_real"] = float(real.chroma_sum[0] / real.pixels[0])
  return out


def color_statistics(fake_b: np.ndarray, real_b: np.ndarray) -> dict[str, float]:
  """The statistics of one set of generated images against real ones ([N, H, W, 3] in [-1, 1])."""
  score = ColorStats()
  score.add({"real_b": real_b}, fake_b, np.ones(len(fake_b), bool))
  return score.result()


_MIN_REGION_PIXELS = 16


def region_spreads(images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(sum over regions of pixels x (a, b) spread, pixels counted) for images [N, H, W, 3] in
  [-1, 1] and their class maps [N, H, W]; a region is one class in one image."""
  lab = srgb_to_lab((np.asarray(images) + 1) / 2)
  total, pixels = 0.0, 0.0
  for image, classes in zip(lab, np.asarray(labels)):
    for label in np.unique(classes):
      region = image[classes == label]
      if len(region) >= _MIN_REGION_PIXELS:
        total += len(region) * float(np.sqrt(region[:, 1].var() + region[:, 2].var()))
        pixels += len(region)
  return total, pixels


class ColorStats:
  """Accumulates the colour statistics over an eval pass (the `evaluate.evaluate_split` hook).

  `add` takes each batch with the generated images and the rows to count;
  `result` sums over all processes and compares.
  """

  def __init__(self):
    self._fake, self._real = _Histograms(), _Histograms()
    self._spreads = np.zeros(3)     # fake sum, real sum, pixels: regions of class maps

  def add(self, batch: dict[str, np.ndarray], fake_b: np.ndarray, keep: np.ndarray) -> None:
    """batch['real_b'], fake_b: [B, H, W, 3] in [-1, 1]; keep: bool [B]; batch['labels']
    [B, H, W], where the data has class maps."""
    if keep.any():
      self._fake.add(fake_b[keep])
      self._real.add(batch["real_b"][keep])
      if "labels" in batch:
        fake, pixels = region_spreads(fake_b[keep], batch["labels"][keep])
        real, _ = region_spreads(batch["real_b"][keep], batch["labels"][keep])
        self._spreads += (fake, real, pixels)

  def result(self) -> dict[str, float]:
    if jax.process_count() > 1:
      for histograms in (self._fake, self._real):
        gathered = multihost_utils.process_allgather(histograms.flat())
        histograms.load_flat(np.asarray(gathered).sum(axis=0))
      self._spreads = np.asarray(multihost_utils.process_allgather(self._spreads)).sum(axis=0)
    if self._real.pixels[0] == 0:
      raise ValueError("No images were added: the colour statistics are undefined.")
    out = _compare(self._fake, self._real)
    if self._spreads[2]:
      out["region_ab_spread_fake"] = float(self._spreads[0] / self._spreads[2])
      out["region_ab_spread_real"] = float(self._spreads[1] / self._spreads[2])
    return out
