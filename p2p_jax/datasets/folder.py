"""Paired images from a folder, in either of the two layouts pix2pix users have.

  aligned (the official datasets):  DIR/{train,val,test}/**/NAME.jpg   A|B side by side
  two folders:                      DIR/{train,val,test}/{A,B}/**/NAME.png

In the two-folder layout an A image is paired with the B image at the same
relative path; the extensions may differ (A/1.jpg pairs with B/1.png). Files
are listed recursively and sorted by relative path, so the order (and thus a
seeded shuffle) is the same on every machine.

Every image is decoded to uint8 [H, W, 3] RGB: grayscale, palette and RGBA
images are made RGB (alpha dropped), 16-bit images are scaled to 0..255.
`read_image` decodes with PIL and raises `DataError` naming any file it cannot
read; `tf_decode` is the same decoding in TensorFlow ops, for the input
pipeline's graph, for the formats TensorFlow reads (`TF_EXTENSIONS`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from p2p_jax.datasets.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example: `path_b` is None when A and B sit side by side in `path_a`."""
  name: str                 # relative path inside the split, e.g. "12.jpg" or "city/3.png"
  path_a: str
  path_b: str | None = None


def list_pairs(root: str, split: str) -> tuple[list[Pair], list[DataError]]:
  """The split's examples sorted by name, and the A or B images that have no partner.

  Raises DataError for a missing folder, a missing split, or a split without
  images. Unpaired images (two-folder layout) are returned, not raised, so the
  caller can skip them or refuse.
  """
  root = os.path.expanduser(root)
  if not root:
    raise DataError("config.data.dir", "is empty; set --config.data.dir=DIR, the folder that "
                    "holds train/ and test/ (A|B images) or train/A, train/B")
  if not os.path.isdir(root):
    raise DataError(root, "no such directory; set --config.data.dir to the folder that holds "
                    "train/ and test/ (A|B images) or train/A, train/B")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    found = ", ".join(split_names(root)) or "none"
    raise DataError(split_dir, f"no split folder {split!r} (splits found: {found}); set "
                    "--config.data.train_split / --config.data.eval_split to one of them")
  dir_a, dir_b = os.path.join(split_dir, "A"), os.path.join(split_dir, "B")
  if os.path.isdir(dir_a) or os.path.isdir(dir_b):
    return _two_folder_pairs(split_dir, dir_a, dir_b)
  pairs = [Pair(name, os.path.join(split_dir, name)) for name in images_under(split_dir)]
  if not pairs:
    raise DataError(split_dir, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this split")
  return pairs, []


def split_names(root: str) -> tuple[str, ...]:
  """The split folders under `root` (sorted), e.g. ('test', 'train', 'val')."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    return ()
  return tuple(sorted(entry.name for entry in os.scandir(root)
                      if entry.is_dir() and not entry.name.startswith(".")))


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one example to (image_a, image_b), each uint8 [H, W, 3]; raises DataError."""
  if pair.path_b is None:
    return split_pair(pair.path_a, read_image(pair.path_a))
  image_a, image_b = read_image(pair.path_a), read_image(pair.path_b)
  if image_a.shape != image_b.shape:
    raise DataError(pair.path_b, f"is {_size(image_b)} but its A image {pair.path_a} is "
                    f"{_size(image_a)}; A and B must have the same size")
  return image_a, image_b


def split_pair(where: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """An A|B image uint8 [H, W, C] as (A, B), each [H, W / 2, C]; `where` names the file."""
  height, width = image.shape[:2]
  if width % 2:
    raise DataError(where, f"is {width}x{height} (WxH), an odd width: an A|B image holds "
                    "A and B side by side as two halves of equal width; remove or fix it")
  half = width // 2
  return np.ascontiguousarray(image[:, :half]), np.ascontiguousarray(image[:, half:])


def read_image(path: str) -> np.ndarray:
  """Any PIL-readable image file as uint8 [H, W, 3] RGB; raises DataError naming the file."""
  try:
    num_bytes = os.path.getsize(path)
  except OSError as error:
    raise DataError(path, f"cannot be read ({error.strerror})") from None
  if num_bytes == 0:
    raise DataError(path, "is an empty file (0 bytes)")
  try:
    with Image.open(path) as image:
      image.load()   # decodes now, so a truncated file fails here and not later
      return _to_rgb(image)
  except UnidentifiedImageError:
    raise DataError(path, "is not an image file that PIL can read") from None
  except Exception as error:   # PIL raises OSError, SyntaxError, ValueError, ... on bad data
    raise DataError(path, f"is a corrupt or truncated image ({type(error).__name__}: "
                    f"{error})") from None


def tf_decode(data):
  """TF: the bytes of a JPEG, PNG or BMP file as uint8 [H, W, 3], decoded as `read_image` does.

  JPEGs use libjpeg's accurate integer DCT (PIL's default). PNGs are decoded at
  16 bits (8-bit values come as v * 257) and brought to 8 as PIL brings them: a
  grey level scaled by 1/257 and rounded (`_to_rgb`), colour and grey + alpha
  by their high byte; both give 8-bit files back exactly.
  """
  import tensorflow as tf

  def jpeg():
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

  def png():
    wide = tf.io.decode_png(data, channels=0, dtype=tf.uint16)   # its own channels, 16 bits
    channels = tf.shape(wide)[-1]

    def gray():      # as `_to_rgb` scales PIL's I;16
      level = tf.round(tf.cast(wide[..., :1], tf.float32) / 257.0)
      return tf.tile(tf.cast(level, tf.uint8), [1, 1, 3])

    def high_bytes():   # PIL keeps the high byte of 16-bit colour and grey + alpha
      rgb = tf.cond(channels >= 3, lambda: wide[..., :3], lambda: tf.tile(wide[..., :1], [1, 1, 3]))
      return tf.cast(tf.bitwise.right_shift(rgb, 8), tf.uint8)
    return tf.cond(tf.equal(channels, 1), gray, high_bytes)

  def other():
    return tf.io.decode_image(data, channels=3, expand_animations=False)

  is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
  image = tf.cond(tf.io.is_jpeg(data), jpeg, lambda: tf.cond(is_png, png, other))
  image.set_shape([None, None, 3])
  return image


def _to_rgb(image: Image.Image) -> np.ndarray:
  if image.mode in _SIXTEEN_BIT_MODES:
    # 16-bit grayscale (PIL keeps it as I;16 or I): 65535 maps to 255.
    gray = np.asarray(image).astype(np.float32) / 257.0
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if image.mode == "F":
    gray = np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")   # PIL warns when a palette with transparency goes to RGB
  if image.mode != "RGB":
    image = image.convert("RGB")    # L, 1, P, LA, RGBA (alpha dropped), CMYK, YCbCr, ...
  return np.asarray(image, dtype=np.uint8)


def _two_folder_pairs(split_dir: str, dir_a: str, dir_b: str
                      ) -> tuple[list[Pair], list[DataError]]:
  for folder in (dir_a, dir_b):
    if not os.path.isdir(folder):
      raise DataError(folder, "is missing: the two-folder layout needs both A/ and B/ in "
                      f"{split_dir}")
  names_a, names_b = images_under(dir_a), images_under(dir_b)
  if not names_a:
    raise DataError(dir_a, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
  by_stem_b = _by_stem(dir_b, names_b)
  by_stem_a = _by_stem(dir_a, names_a)
  pairs, unpaired = [], []
  for stem, name_a in sorted(by_stem_a.items(), key=lambda item: item[1]):
    name_b = by_stem_b.get(stem)
    if name_b is None:
      unpaired.append(DataError(os.path.join(dir_a, name_a),
                                f"has no B image: nothing named {stem}.* in {dir_b}"))
    else:
      pairs.append(Pair(name_a, os.path.join(dir_a, name_a), os.path.join(dir_b, name_b)))
  for stem, name_b in sorted(by_stem_b.items(), key=lambda item: item[1]):
    if stem not in by_stem_a:
      unpaired.append(DataError(os.path.join(dir_b, name_b),
                                f"has no A image: nothing named {stem}.* in {dir_a}"))
  return pairs, unpaired


def _by_stem(folder: str, names: list[str]) -> dict[str, str]:
  by_stem = {}
  for name in names:
    stem = os.path.splitext(name)[0]
    if stem in by_stem:
      raise DataError(os.path.join(folder, name), f"and {by_stem[stem]} have the same name "
                      "but for the extension, so the pairing is ambiguous; remove one")
    by_stem[stem] = name
  return by_stem


def images_under(folder: str) -> list[str]:
  """Relative paths (with '/') of the image files under `folder`, recursively, sorted."""
  names = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for filename in filenames:
      if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
        relative = os.path.relpath(os.path.join(dirpath, filename), folder)
        names.append(relative.replace(os.sep, "/"))
  return sorted(names)


def _size(image: np.ndarray) -> str:
  return f"{image.shape[1]}x{image.shape[0]} (WxH)"
