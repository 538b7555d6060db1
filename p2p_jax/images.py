"""Images in and out: [-1, 1] arrays to PNG, sample grids, and the eval HTML page."""

from __future__ import annotations

import html
import os
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image

LUMA = (0.299, 0.587, 0.114)      # ITU-R 601, as PIL's convert("L") weighs the channels


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[..., H, W, C] in [-1, 1] -> uint8; one channel is kept as [H, W, 1]."""
  return np.round((np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def resize(image: np.ndarray, size: tuple[int, int],
           resample: int = Image.BICUBIC) -> np.ndarray:
  """uint8 [h, w(, C)] to [size[0], size[1](, C)] by PIL (bicubic: overshoot clipped to 0..255)."""
  if tuple(image.shape[:2]) == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def to_float(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [H, W, 3] to float32 [H, W, channels] in [-1, 1]; one channel is the ITU-R 601 luma."""
  pixels = image.astype(np.float32)
  if channels == 1:
    pixels = np.einsum("hwc,c->hw", pixels, np.array(LUMA, np.float32))[..., None]
  return (pixels - 127.5) / 127.5


def as_rgb(image: np.ndarray) -> np.ndarray:
  """Repeats a single channel to three, so inputs and outputs of any channel count tile together."""
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def save_png(path: str, image: np.ndarray) -> None:
  """Writes [H, W, C] in [-1, 1] (C = 1 or 3) as an 8-bit PNG, atomically."""
  pixels = to_uint8(image)
  pil = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  tmp = epath.Path(path + ".tmp.png")          # local or cloud (gs://) paths alike
  with tmp.open("wb") as f:
    pil.save(f, format="PNG")
  tmp.replace(path)


def sample_grid(real_a: np.ndarray, fake_b: np.ndarray, real_b: np.ndarray,
                max_rows: int = 4) -> np.ndarray:
  """One row per example: input | output | target. Inputs [N, H, W, C] in [-1, 1];
  returns [rows * H, 3 * W, 3] float32 in [0, 1] (for image summaries)."""
  rows = []
  for a, f, b in list(zip(real_a, fake_b, real_b))[:max_rows]:
    rows.append(np.concatenate([as_rgb(a), as_rgb(f), as_rgb(b)], axis=1))
  return (np.concatenate(rows, axis=0).astype(np.float32) + 1) / 2


def write_index_html(path: str, title: str, names: Sequence[str], summary: dict) -> None:
  """A table of `images/<name>_{real_a,fake_b,real_b}.png` with the metrics above it."""
  lines = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif} td{padding:4px;text-align:center}"
           " img{width:256px;image-rendering:pixelated}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", "<table><tr>"]
  lines += [f"<td><b>{html.escape(str(k))}</b><br>{html.escape(str(v))}</td>"
            for k, v in summary.items()]
  lines += ["</tr></table>", "<table>",
            "<tr><th>name</th><th>input (real_a)</th><th>output (fake_b)</th>"
            "<th>target (real_b)</th></tr>"]
  for name in names:
    cells = "".join(f"<td><img src='images/{html.escape(name)}_{kind}.png'></td>"
                    for kind in ("real_a", "fake_b", "real_b"))
    lines.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
  lines += ["</table></body></html>"]
  epath.Path(path).write_text("\n".join(lines))


def safe_name(name: str) -> str:
  """A file-name-safe version of an example's name (path separators and odd characters)."""
  stem = os.path.splitext(str(name))[0]
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
