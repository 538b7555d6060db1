"""Images in and out: [-1, 1] arrays to PNG, sample grids, and the eval HTML page."""

from __future__ import annotations

import html
import json
import os

import numpy as np
from etils import epath
from PIL import Image

LUMA = (0.299, 0.587, 0.114)      # ITU-R 601, as PIL's convert("L") weighs the channels


def unit_to_uint8(pixels):
  """float [-1, 1] -> uint8, for NumPy and JAX arrays alike (rounded half to even)."""
  return ((pixels.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)


def uint8_to_unit(pixels):
  """uint8 (or any [0, 255]) -> float32 [-1, 1], for NumPy and JAX arrays alike."""
  return (pixels.astype(np.float32) - 127.5) / 127.5


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[..., H, W, C] in [-1, 1] -> uint8; one channel is kept as [H, W, 1]."""
  return unit_to_uint8(np.asarray(image, np.float32))


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
  return uint8_to_unit(pixels)


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


def write_index_html(path: str, title: str, rows: dict[str, dict[str, float]],
                     summary: dict) -> None:
  """A page of `images/<name>_{real_a,fake_b,real_b}.png`, each row with its scores.

  `rows`: name -> per-image scores ('l1', and 'lpips' where computed). The rows
  come worst first (highest LPIPS, else L1); the page can re-sort them by name.
  A summary line of `summary`'s main figures heads the page, its whole table below.
  """
  key = "lpips" if any("lpips" in r for r in rows.values()) else "l1"
  order = sorted(rows, key=lambda name: -rows[name].get(key, 0.0))
  shown = [m for m in ("l1", "lpips", "psnr", "ssim") if any(m in r for r in rows.values())]
  line = ", ".join(f"{m.upper()} {summary[m]:.4g}" for m in ("l1", "lpips", "psnr", "ssim")
                   if isinstance(summary.get(m), float))
  head = (f"{summary.get('num_images', '?')} images of the {summary.get('split', '?')} split, "
          f"{summary.get('mode', '?')} test mode: {line}.")
  lines = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif} td{padding:4px;text-align:center}"
           " img{width:256px;image-rendering:pixelated} th{cursor:pointer}</style>",
           # sign: +1 puts the highest first (L1, LPIPS: worst first), -1 the lowest (PSNR,
           # SSIM: worst first too), 0 sorts by name.
           "<script>function sortBy(col, sign) {"
           " const t = document.getElementById('rows'); const r = Array.from(t.rows).slice(1);"
           " r.sort((a, b) => sign ? sign * (b.cells[col].dataset.v - a.cells[col].dataset.v)"
           " : a.cells[col].textContent.localeCompare(b.cells[col].textContent));"
           " r.forEach(x => t.tBodies[0].appendChild(x)); }</script></head><body>",
           f"<h1>{html.escape(title)}</h1>", f"<p><b>{html.escape(head)}</b></p>",
           "<table><tr>"]
  lines += [f"<td><b>{html.escape(str(k))}</b><br>{html.escape(str(v))}</td>"
            for k, v in summary.items() if not isinstance(v, (list, dict))]
  lines += ["</tr></table>",
            f"<p>The first {len(rows)} images of the split, worst first by {key.upper()}; click "
            "a column's title to sort by it (scores worst first).</p>",
            "<table id='rows'><tbody><tr><th onclick='sortBy(0, 0)'>name</th>"]
  lines += [f"<th onclick='sortBy({i + 1}, {1 if m in ('l1', 'lpips') else -1})'>{m.upper()}"
            "</th>" for i, m in enumerate(shown)]
  lines += ["<th>input (real_a)</th><th>output (fake_b)</th><th>target (real_b)</th></tr>"]
  for name in order:
    scores = "".join(f"<td class='{m}' data-v='{rows[name].get(m, 0.0):.6g}'>"
                     f"{rows[name].get(m, 0.0):.4f}</td>" for m in shown)
    cells = "".join(f"<td><img src='images/{html.escape(name)}_{kind}.png'></td>"
                    for kind in ("real_a", "fake_b", "real_b"))
    lines.append(f"<tr><td>{html.escape(name)}</td>{scores}{cells}</tr>")
  lines += ["</tbody></table></body></html>"]
  epath.Path(path).write_text("\n".join(lines))


def write_step_index(step_dir: str, title: str) -> None:
  """`step_dir/index.html`: a line and a link for each evaluation under it (split, mode)."""
  entries = []
  for child in sorted(epath.Path(step_dir).iterdir()):
    metrics_path = child / "metrics.json"
    if metrics_path.exists():
      entries.append((child.name, json.loads(metrics_path.read_text())))
  lines = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title></head><body style='font-family:sans-serif'>",
           f"<h1>{html.escape(title)}</h1>", "<ul>"]
  for name, metrics in entries:
    figures = ", ".join(f"{m.upper()} {metrics[m]:.4g}" for m in ("l1", "lpips", "psnr", "ssim")
                        if isinstance(metrics.get(m), float))
    lines.append(f"<li><a href='{html.escape(name)}/index.html'>{html.escape(name)}</a>: "
                 f"{metrics.get('num_images', '?')} images, {html.escape(figures)}; "
                 f"{html.escape(str(metrics.get('test_mode', '')))}</li>")
  lines += ["</ul></body></html>"]
  epath.Path(step_dir, "index.html").write_text("\n".join(lines))


def safe_name(name: str) -> str:
  """A file-name-safe version of an example's name (path separators and odd characters)."""
  stem = os.path.splitext(str(name))[0]
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
