"""Translate images with a trained generator.

  python -m p2p_jax.predict --workdir=runs/demo --input=photo.png --output=out.png
  python -m p2p_jax.predict --workdir=runs/demo --input=folder/ --output=out_folder/

Restores the newest checkpoint that verifies (or --step) with the config it was
trained with, which gives the architecture. Any size and channel count is accepted: `--fit=resize` (default,
as the official test script) resizes to the training crop size and the result
back to the original size; `--fit=pad` keeps the native resolution, padding by
reflection to the next size the U-Net accepts and cropping the result. The
input is the A image alone (for an A|B file from a dataset, pass --paired).
Outputs are PNGs named like the inputs.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import jax
import numpy as np
from absl import flags
from absl import logging
from PIL import Image

from p2p_jax import cli
from p2p_jax import evaluate
from p2p_jax import images
from p2p_jax import monitoring
from p2p_jax.datasets.errors import DataError
from p2p_jax.datasets import folder



def _input_files(path: str) -> list[tuple[str, str]]:
  """(path, relative name) of each image to translate."""
  if os.path.isdir(path):
    names = folder.images_under(path)
    if not names:
      raise DataError(path, f"contains no images ({', '.join(folder.IMAGE_EXTENSIONS)})")
    return [(os.path.join(path, name), name) for name in names]
  if not os.path.exists(path):
    raise DataError(path, "does not exist")
  return [(path, os.path.basename(path))]


def fit_to_network(image: np.ndarray, num_downs: int, crop_size: int, fit: str) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 image whose sides the U-Net accepts."""
  if fit == "resize":
    return images.resize(image, (crop_size, crop_size))
  multiple = 2 ** num_downs
  height, width = image.shape[:2]
  pad_h, pad_w = (-height) % multiple, (-width) % multiple
  # Reflection needs the pad to be smaller than the image; edge-extend beyond that.
  mode = "reflect" if pad_h < height and pad_w < width else "edge"
  return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def translate_files(workdir: str, files: list[tuple[str, str]], *, step: int = -1,
                    fit: str = "resize", deterministic: bool = False, dropout: bool = True,
                    paired: bool = False, seed: int = 0) -> Iterator[tuple[str, np.ndarray | DataError]]:
  """Yields (relative name, fake_b uint8 [H, W, C_out] at the input's size) or the DataError."""
  restored = evaluate.restore_checkpoint(workdir, None if step < 0 else step)
  config, state = restored.config, restored.state
  logging.info("Translating %d image(s) with step %d of %s.", len(files), restored.step, workdir)
  rng = jax.random.key(seed)
  for index, (path, name) in enumerate(files):
    try:
      image = folder.read_image(path)
      if paired:
        image_a, image_b = folder.split_pair(path, image)
        image = image_a if config.data.direction == "AtoB" else image_b
    except DataError as error:
      yield name, error
      continue
    height, width = image.shape[:2]
    fitted = fit_to_network(image, config.model.num_downs, config.data.crop_size, fit)
    real_a = images.to_float(fitted, config.model.input_nc)[None]
    fake_b = evaluate.translate_images(state, real_a, jax.random.fold_in(rng, index),
                                       deterministic=deterministic, dropout=dropout)
    out = images.to_uint8(np.asarray(fake_b)[0])
    if fit == "resize":
      out = images.resize(out if out.shape[-1] == 3 else out[..., 0], (height, width))
      out = out.reshape(height, width, -1)
    else:
      out = out[:height, :width]
    yield name, out


def _output_path(output: str, name: str, single: bool) -> str:
  if single and output.lower().endswith(".png"):
    return output
  return os.path.join(output, os.path.splitext(name)[0] + ".png")


FLAGS = flags.FLAGS   # the flags themselves are defined by `_define_flags`, run as a program


def _define_flags() -> None:
  # Defined only when run as a program, so that the module imports anywhere.
  flags.DEFINE_string("workdir", None, "A run directory (config.json and checkpoints/).")
  flags.DEFINE_string("input", None, "An image file, or a folder of images (searched recursively).")
  flags.DEFINE_string("output", None, "Output PNG file (for one input file) or folder.")
  flags.DEFINE_integer("step", -1, "Checkpoint step to use (-1: the latest).")
  flags.DEFINE_enum("fit", "resize", ["resize", "pad"], "How images are made to fit the U-Net.")
  flags.DEFINE_bool("deterministic", False,
                    "Running BatchNorm statistics and no dropout (default: the paper's test mode).")
  flags.DEFINE_bool("dropout", True,
                    "Dropout on in the paper's test mode (--nodropout: each image's own "
                    "BatchNorm statistics alone, as an exported model computes).")
  flags.DEFINE_bool("paired", False,
                    "Inputs are A|B files: use the half config.data.direction names.")
  flags.DEFINE_integer("seed", 0, "Seed of the dropout noise.")
  flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  del argv
  monitoring.quiet_library_logs(keep_tracebacks=cli.tracebacks_wanted())
  files = _input_files(FLAGS.input)
  single = len(files) == 1 and not os.path.isdir(FLAGS.input)
  failures = []
  for name, result in translate_files(FLAGS.workdir, files, step=FLAGS.step, fit=FLAGS.fit,
                                      deterministic=FLAGS.deterministic, dropout=FLAGS.dropout,
                                      paired=FLAGS.paired,
                                      seed=FLAGS.seed):
    if isinstance(result, DataError):
      failures.append(result)
      continue
    path = _output_path(FLAGS.output, name, single)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(result[..., 0] if result.shape[-1] == 1 else result).save(path)
  written = len(files) - len(failures)
  print(f"Wrote {written} image(s) to {FLAGS.output}.")
  if failures:
    print(f"Could not read {len(failures)} file(s):", file=sys.stderr)
    for error in failures:
      print(f"  {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
