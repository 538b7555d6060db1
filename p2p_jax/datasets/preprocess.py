"""From uint8 pairs at their stored size to the float arrays the networks see, on the devices.

The host sends every pair of a split as uint8 at one size, the size its images
are stored at (the wire size; `input_pipeline` resizes only images that differ).
`Preprocess.train` turns a batch of them into the networks' inputs inside the
compiled training step, as the official code's `preprocess` modes do:

  resize_and_crop        resize to load_size x load_size, random crop_size x crop_size crop
  crop                   random crop_size crop of the image as it is
  scale_width            resize the width to load_size, keeping the aspect ratio
  scale_width_and_crop   scale_width, then a random crop_size crop
  none                   the image as it is

then a random horizontal flip (unless no_flip), and the scaling to float32 in
[-1, 1] (one channel: the ITU-R 601 luma, as PIL's convert("L") weighs it). A
and B get one resize, one crop window and one flip, so the pair stays aligned.
At evaluation (`Preprocess.eval`) nothing is random: images are resized to
crop_size x crop_size (scale_width: as in training; scale_width_and_crop: to
crop_size wide, keeping the aspect ratio; none: kept as they are).

Resizing is PIL's bicubic filter, because the official code resizes with PIL:
each resized axis is one product with PIL's own weight matrix (its support
widens when an axis shrinks, which is PIL's antialiasing), the width first and
then the height, each pass rounded and clipped to 0..255 as PIL's 8-bit passes
are. The crop is folded in: only the window's rows of the matrices are used.
An example's crop offsets and flip are drawn by `jax.random` from (seed, epoch,
index in the split): a pure function of the example and the epoch, so a
resumed run and any number of hosts see what one unbroken run sees.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from p2p_jax.datasets.errors import DataError
from p2p_jax.validation import ConfigError

MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
_CROP_MODES = ("resize_and_crop", "crop", "scale_width_and_crop")
LUMA = (0.299, 0.587, 0.114)      # ITU-R 601, as PIL's convert("L") (and `images.to_float`)
_JITTER_STREAM = 0x6A177E5        # keeps these draws apart from init and dropout keys of one seed


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Everything preprocessing depends on, checked once against the config; static under jit."""
  mode: str
  load_size: int
  crop_size: int
  flip: bool
  swap: bool          # BtoA: B is the input
  num_downs: int
  input_nc: int
  output_nc: int
  seed: int           # with (epoch, index), fixes an example's crop and flip

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Preprocess":
    data, model = config.data, config.model
    if data.preprocess not in MODES:
      raise ConfigError(f"config.data.preprocess={data.preprocess!r} is not one of {MODES}.")
    if data.direction not in ("AtoB", "BtoA"):
      raise ConfigError(f"config.data.direction={data.direction!r} is not 'AtoB' or 'BtoA'.")
    for field in ("input_nc", "output_nc"):
      if model[field] not in (1, 3):
        raise ConfigError(f"config.model.{field}={model[field]!r}: images have 1 (grayscale) "
                          "or 3 (RGB) channels.")
    multiple = 2 ** model.num_downs
    if data.preprocess != "none" and data.crop_size % multiple:
      raise ConfigError(
          f"config.data.crop_size={data.crop_size} is not a multiple of 2**num_downs={multiple} "
          f"(config.model.num_downs={model.num_downs}); use e.g. "
          f"--config.data.crop_size={max(multiple, data.crop_size // multiple * multiple)}.")
    if data.preprocess in ("resize_and_crop", "scale_width_and_crop"):
      if data.load_size < data.crop_size:
        raise ConfigError(f"config.data.load_size={data.load_size} is smaller than "
                          f"config.data.crop_size={data.crop_size}; it must be at least as large.")
    if data.preprocess == "scale_width" and data.load_size % multiple:
      raise ConfigError(
          f"preprocess=scale_width makes training images config.data.load_size={data.load_size} "
          f"wide, not a multiple of 2**num_downs={multiple}; set --config.data.load_size to a "
          "multiple, or use --config.data.preprocess=scale_width_and_crop.")
    return cls(mode=data.preprocess, load_size=data.load_size, crop_size=data.crop_size,
               flip=not data.no_flip, swap=data.direction == "BtoA", num_downs=model.num_downs,
               input_nc=model.input_nc, output_nc=model.output_nc, seed=int(config.seed))

  def sizes(self, where: str, wire: tuple[int, int], train: bool
            ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((H, W) resized to, (H, W) the networks get) for images stored at `wire`.

    Raises DataError, naming `where` (the image that set the size), when the
    crop does not fit or the result is no size the generator can take.
    """
    height, width = wire
    resized = self._resized_size(height, width, train) or (height, width)
    final = resized
    if train and self.mode in _CROP_MODES:
      if min(resized) < self.crop_size:
        raise DataError(where, f"is {width}x{height} (WxH), smaller than the "
                        f"{self.crop_size}x{self.crop_size} crop of preprocess={self.mode}; use "
                        "--config.data.preprocess=resize_and_crop or a smaller "
                        "--config.data.crop_size")
      final = (self.crop_size, self.crop_size)
    multiple = 2 ** self.num_downs
    if final[0] % multiple or final[1] % multiple or min(final) == 0:
      made = "" if tuple(final) == (height, width) else (
          f", which preprocess={self.mode} makes {final[1]}x{final[0]}")
      raise DataError(where, f"is {width}x{height} (WxH){made}: the generator "
                      f"(num_downs={self.num_downs}) needs both sides to be multiples of "
                      f"{multiple}; use --config.data.preprocess=resize_and_crop, or images "
                      "whose sides fit")
    return resized, final

  def fixed_size(self, train: bool) -> tuple[int, int] | None:
    """The size every image is resized to whatever its own size, or None where it depends on it."""
    if train and self.mode == "resize_and_crop":
      return (self.load_size, self.load_size)
    if not train and self.mode in ("resize_and_crop", "crop"):
      return (self.crop_size, self.crop_size)
    return None

  def train(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Jittered (real_a, real_b), float32 [B, h, w, input_nc / output_nc] in [-1, 1].

    `batch`: 'image_a', 'image_b' uint8 [B, H, W, 3] (the source's A and B at
    the wire size), 'epoch' and 'index' int32 [B] (the example in its split).
    Runs under jit; shapes are static.
    """
    pixels = self._pair(batch["image_a"], batch["image_b"])
    resized, final = self.sizes("the batch", pixels.shape[1:3], train=True)
    room = (resized[0] - final[0], resized[1] - final[1])
    top, left, flip = jax.vmap(functools.partial(self._draw, room))(batch["epoch"],
                                                                    batch["index"])
    return self._to_unit_range(_resize_window(pixels, resized, (top, left), final, flip))

  def eval(self, image_a: jax.Array, image_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(real_a, real_b) for evaluation: resized as `eval` mode says, never cropped or flipped."""
    pixels = self._pair(image_a, image_b)
    resized, _ = self.sizes("the batch", pixels.shape[1:3], train=False)
    start = jnp.zeros(pixels.shape[:1], jnp.int32)
    return self._to_unit_range(_resize_window(pixels, resized, (start, start), resized, None))

  def _pair(self, image_a: jax.Array, image_b: jax.Array) -> jax.Array:
    """A and B (swapped for BtoA) as one float32 [B, H, W, 6] array: one pass resizes both."""
    if self.swap:
      image_a, image_b = image_b, image_a
    return jnp.concatenate([image_a, image_b], axis=-1).astype(jnp.float32)

  def _draw(self, room: tuple[int, int], epoch: jax.Array, index: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(top, left, flip) of one example: a pure function of (seed, epoch, index)."""
    key = jax.random.fold_in(jax.random.key(self.seed), _JITTER_STREAM)
    key = jax.random.fold_in(jax.random.fold_in(key, epoch), index)
    top_key, left_key, flip_key = jax.random.split(key, 3)
    top = jax.random.randint(top_key, (), 0, room[0] + 1)
    left = jax.random.randint(left_key, (), 0, room[1] + 1)
    flip = jax.random.bernoulli(flip_key) & self.flip
    return top, left, flip

  def _to_unit_range(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    def scaled(rgb, channels):
      if channels == 1:
        rgb = jnp.einsum("bhwc,c->bhw", rgb, jnp.asarray(LUMA, jnp.float32),
                         precision=lax.Precision.HIGHEST)[..., None]
      return (rgb - 127.5) / 127.5     # exact at 0 and 255, whatever XLA fuses
    return scaled(pixels[..., :3], self.input_nc), scaled(pixels[..., 3:], self.output_nc)

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


def _resize_window(pixels: jax.Array, resized: tuple[int, int],
                   start: tuple[jax.Array, jax.Array], size: tuple[int, int],
                   flip: jax.Array | None) -> jax.Array:
  """[B, H, W, C] resized to `resized`, then the window at `start` of `size`, flipped per `flip`.

  The two passes run in PIL's order: the one that leaves the smaller image
  between them first (the width on a tie), since each pass rounds.
  """
  stored = pixels.shape[1:3]
  width_first = stored[0] * resized[1] <= resized[0] * stored[1]
  if width_first:
    pixels = _resample(pixels, 2, resized[1], start[1], size[1], flip)
  pixels = _resample(pixels, 1, resized[0], start[0], size[0], None)
  if not width_first:
    pixels = _resample(pixels, 2, resized[1], start[1], size[1], flip)
  return pixels


def _resample(pixels: jax.Array, axis: int, resized: int, start: jax.Array, size: int,
              flip: jax.Array | None) -> jax.Array:
  """Resizes `axis` of [B, H, W, C] to `resized` and keeps [start, start + size), per example.

  A flipped example takes its window in reverse. An axis kept at its size is a
  plain gather; a resized one is PIL's pass (rounded, clipped).
  """
  stored = pixels.shape[axis]
  if resized == stored == size and flip is None:
    return pixels
  positions = start[:, None] + jnp.arange(size)[None]
  if flip is not None:
    positions = jnp.where(flip[:, None], positions[:, ::-1], positions)
  if resized == stored:
    shape = [pixels.shape[0], 1, 1, 1]
    shape[axis] = size
    return jnp.take_along_axis(pixels, positions.reshape(shape), axis=axis)
  weights = jnp.asarray(bicubic_weights(stored, resized), jnp.float32)[positions]
  spec = "bhwc,bow->bhoc" if axis == 2 else "bhwc,boh->bowc"
  out = jnp.einsum(spec, pixels, weights, precision=lax.Precision.HIGHEST)
  return jnp.clip(jnp.floor(out + 0.5), 0, 255)


@functools.lru_cache(maxsize=64)
def bicubic_weights(stored: int, resized: int) -> np.ndarray:
  """[resized, stored] float64: PIL's bicubic resampling of one axis, as a matrix.

  As PIL's `precompute_coeffs`: output pixel x is centred at (x + 0.5) * scale
  in the input, the filter (Keys' cubic, a = -0.5) is widened by the scale
  when shrinking, the taps are clipped to the image and the weights normalised
  to sum to one.
  """
  scale = stored / resized
  filter_scale = max(scale, 1.0)
  support = 2.0 * filter_scale
  weights = np.zeros((resized, stored))
  for out in range(resized):
    center = (out + 0.5) * scale
    first = max(int(center - support + 0.5), 0)      # int() truncates toward zero, as C does
    last = min(int(center + support + 0.5), stored)
    taps = np.arange(first, last)
    row = _keys_cubic((taps - center + 0.5) / filter_scale)
    weights[out, first:last] = row / row.sum() if row.sum() else row
  return weights


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
