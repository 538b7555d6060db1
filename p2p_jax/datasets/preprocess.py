"""From a decoded pair of images to the float arrays the networks see.

The official code's `preprocess` modes, for one example at a time:

  resize_and_crop        resize to load_size x load_size, random crop_size x crop_size crop
  crop                   random crop_size crop of the image as it is
  scale_width            resize the width to load_size, keeping the aspect ratio
  scale_width_and_crop   scale_width, then a random crop_size crop
  none                   the image as it is

then a random horizontal flip (unless no_flip). A and B get one resize, one
crop window and one flip, drawn once per pair and applied to both alike. At
evaluation nothing is random: images are resized to crop_size x crop_size
(scale_width: as in training; scale_width_and_crop: to crop_size wide, keeping
the aspect ratio; none: kept as they are). Resizing is PIL's
bicubic, as in the official code. Sizes the generator cannot take (not a
multiple of 2**num_downs) raise `DataError` naming the image and the fix.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from PIL import Image

from p2p_jax.datasets.errors import DataError

MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
_CROP_MODES = ("resize_and_crop", "crop", "scale_width_and_crop")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R 601, as PIL's convert("L")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Everything one example's preprocessing depends on, checked once against the config."""
  mode: str
  load_size: int
  crop_size: int
  flip: bool
  swap: bool          # BtoA: B is the input
  num_downs: int
  input_nc: int
  output_nc: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Preprocess":
    data, model = config.data, config.model
    if data.preprocess not in MODES:
      raise ValueError(f"config.data.preprocess={data.preprocess!r} is not one of {MODES}.")
    if data.direction not in ("AtoB", "BtoA"):
      raise ValueError(f"config.data.direction={data.direction!r} is not 'AtoB' or 'BtoA'.")
    for field in ("input_nc", "output_nc"):
      if model[field] not in (1, 3):
        raise ValueError(f"config.model.{field}={model[field]!r}: images have 1 (grayscale) "
                         "or 3 (RGB) channels.")
    multiple = 2 ** model.num_downs
    if data.preprocess != "none" and data.crop_size % multiple:
      raise ValueError(
          f"config.data.crop_size={data.crop_size} is not a multiple of 2**num_downs={multiple} "
          f"(config.model.num_downs={model.num_downs}); use e.g. "
          f"--config.data.crop_size={max(multiple, data.crop_size // multiple * multiple)}.")
    if data.preprocess in ("resize_and_crop", "scale_width_and_crop"):
      if data.load_size < data.crop_size:
        raise ValueError(f"config.data.load_size={data.load_size} is smaller than "
                         f"config.data.crop_size={data.crop_size}; it must be at least as large.")
    if data.preprocess == "scale_width" and data.load_size % multiple:
      raise ValueError(
          f"preprocess=scale_width makes training images config.data.load_size={data.load_size} "
          f"wide, not a multiple of 2**num_downs={multiple}; set --config.data.load_size to a "
          "multiple, or use --config.data.preprocess=scale_width_and_crop.")
    return cls(mode=data.preprocess, load_size=data.load_size, crop_size=data.crop_size,
               flip=not data.no_flip, swap=data.direction == "BtoA", num_downs=model.num_downs,
               input_nc=model.input_nc, output_nc=model.output_nc)

  def train(self, where: str, image_a: np.ndarray, image_b: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Jittered (real_a, real_b): float32 [H, W, input_nc] / [H, W, output_nc] in [-1, 1].

    `image_a`, `image_b` are the source's A and B, uint8 [h, w, 3]; `where` names
    the example in errors; `rng` draws the crop offsets and the flip.
    """
    if self.swap:
      image_a, image_b = image_b, image_a
    height, width = image_a.shape[:2]
    size = self._resized_size(height, width, train=True)
    image_a, image_b = resize(image_a, size), resize(image_b, size)
    # One window and one flip, applied to A and B alike, so the pair stays aligned.
    window = (slice(None), slice(None))
    if self.mode in _CROP_MODES:
      window = self._random_crop(where, (height, width), image_a.shape[:2], rng)
    flip = rng.random() < 0.5 and self.flip
    image_a, image_b = image_a[window], image_b[window]
    if flip:
      image_a, image_b = image_a[:, ::-1], image_b[:, ::-1]
    self._check_fits(where, (height, width), image_a.shape[:2])
    return to_float(image_a, self.input_nc), to_float(image_b, self.output_nc)

  def eval(self, where: str, image_a: np.ndarray, image_b: np.ndarray,
           labels: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Deterministic (real_a, real_b, labels): as `train`, without crop or flip.

    `labels` (uint8 [h, w] class map, or None) is resized with nearest neighbour
    to int32 [H, W].
    """
    if self.swap:
      image_a, image_b = image_b, image_a
    height, width = image_a.shape[:2]
    size = self._resized_size(height, width, train=False)
    image_a, image_b = resize(image_a, size), resize(image_b, size)
    self._check_fits(where, (height, width), image_a.shape[:2])
    if labels is not None:
      labels = resize(labels, size, Image.NEAREST).astype(np.int32)
    return to_float(image_a, self.input_nc), to_float(image_b, self.output_nc), labels

  def _resized_size(self, height: int, width: int, train: bool) -> tuple[int, int] | None:
    """(height, width) to resize to, or None to keep the image as it is."""
    if self.mode == "none":
      return None
    if self.mode == "scale_width" or (self.mode == "scale_width_and_crop" and train):
      # As the official code: never shorter than the crop, so a crop always fits.
      return (int(max(self.load_size * height / width, self.crop_size)), self.load_size)
    if self.mode == "scale_width_and_crop":
      return (max(1, int(self.crop_size * height / width)), self.crop_size)
    if not train:
      return (self.crop_size, self.crop_size)
    if self.mode == "resize_and_crop":
      return (self.load_size, self.load_size)
    return None

  def _random_crop(self, where: str, original: tuple[int, int], resized: tuple[int, int],
                   rng: np.random.Generator) -> tuple[slice, slice]:
    height, width = resized
    size = self.crop_size
    if height < size or width < size:
      raise DataError(where, f"is {original[1]}x{original[0]} (WxH), smaller than the "
                      f"{size}x{size} crop of preprocess={self.mode}; use "
                      "--config.data.preprocess=resize_and_crop or a smaller "
                      "--config.data.crop_size")
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return slice(top, top + size), slice(left, left + size)

  def _check_fits(self, where: str, original: tuple[int, int], final: tuple[int, int]) -> None:
    multiple = 2 ** self.num_downs
    if final[0] % multiple or final[1] % multiple or min(final) == 0:
      made = "" if tuple(final) == tuple(original) else (
          f", which preprocess={self.mode} makes {final[1]}x{final[0]}")
      raise DataError(where, f"is {original[1]}x{original[0]} (WxH){made}: the generator "
                      f"(num_downs={self.num_downs}) needs both sides to be multiples of "
                      f"{multiple}; use --config.data.preprocess=resize_and_crop, or images "
                      "whose sides fit")


def resize(image: np.ndarray, size: tuple[int, int] | None,
            resample: int = Image.BICUBIC) -> np.ndarray:
  """uint8 [h, w(, C)] to [size[0], size[1](, C)]; PIL clips the bicubic overshoot to 0..255."""
  if size is None or tuple(image.shape[:2]) == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def to_float(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [H, W, 3] to float32 [H, W, channels] in [-1, 1]; one channel is the luma."""
  pixels = image.astype(np.float32)
  if channels == 1:
    pixels = np.einsum("hwc,c->hw", pixels, _LUMA)[..., None]   # no BLAS threads for this
  pixels *= np.float32(1 / 127.5)
  pixels -= np.float32(1.0)
  return pixels
