"""Synthetic paired images, rendered on the fly: the default data of p2p_jax.

Two tasks mirror the paper's, with nothing to download:

  edges2objects (like edges2shoes). B is a product-photo-like picture: one to
    three solid objects (ellipses, rounded boxes, convex polygons, bags with a
    handle) in saturated colours, shaded by one directional light, with a
    specular highlight and a soft shadow on a light background. A is the
    objects' outlines and some inner contours (a sole band, a stripe, an inset
    panel) as thin dark lines on white. Each object's hue is drawn uniformly
    and independently of its shape, so A does not determine B's colours: an
    L1-only generator can only predict a dull average, and vivid colours need
    the adversarial loss (the paper's point).

  labels2facades (like facades). A is a building facade label map in
    FACADE_PALETTE: sky, roof, wall, a grid of windows over several floors,
    doors, balconies, cornices and sills. B is a rendered photo with per-class
    textures (bricks or plaster, window frames, reflections and blinds, railings,
    roof tiles), cast shadows, a sun gradient and noise. Wall, roof, glass and
    frame colours are random per example. The class map comes back as
    'labels', to score generated photos by segmentation (FCN-score).

Every example depends only on (task, seed, split, index): its random generator
is seeded from those four numbers, so examples can be rendered in any order or
in parallel, and the splits are disjoint streams.
"""

from __future__ import annotations

import colorsys
import functools
import operator

import numpy as np

from p2p_jax.validation import check_choice

TASKS = ("edges2objects", "labels2facades")
SPLITS = ("train", "val", "test")

FACADE_CLASSES = ("sky", "roof", "wall", "window", "door", "balcony", "cornice", "sill")
FACADE_PALETTE = np.array([
    [120, 200, 250],  # sky
    [170, 30, 30],    # roof
    [20, 60, 200],    # wall
    [250, 220, 40],   # window
    [255, 120, 0],    # door
    [40, 190, 70],    # balcony
    [200, 60, 220],   # cornice
    [120, 255, 230],  # sill
], np.uint8)
FACADE_PALETTE.setflags(write=False)
_SKY, _ROOF, _WALL, _WINDOW, _DOOR, _BALCONY, _CORNICE, _SILL = range(len(FACADE_CLASSES))

_MIN_SIZE = 16
_INK_DARKNESS = 0.92   # a full-strength line is 255 * (1 - 0.92) = 20 on a white page


def num_classes(task: str) -> int:
  """Classes in the 'labels' feature of `task`: 8 for labels2facades, 0 for edges2objects."""
  check_choice("synthetic task", task, TASKS)
  return len(FACADE_CLASSES) if task == "labels2facades" else 0


def render_pair(task: str, index: int, *, split: str = "train", seed: int = 0,
                size: int = 256) -> dict[str, np.ndarray]:
  """Renders example `index` of `split` of a synthetic task.

  Returns {'image_a': uint8 [size, size, 3], 'image_b': uint8 [size, size, 3]},
  A the network input (edge map or label map), B the target photo; for
  labels2facades also 'labels': uint8 [size, size] class ids in
  [0, num_classes(task)), with image_a == FACADE_PALETTE[labels].
  """
  check_choice("synthetic task", task, TASKS)
  check_choice("synthetic split", split, SPLITS)
  index, seed, size = operator.index(index), operator.index(seed), operator.index(size)
  if index < 0 or seed < 0:
    raise ValueError(f"Synthetic index and seed must be >= 0, got index={index}, seed={seed}.")
  if size < _MIN_SIZE:
    raise ValueError(f"Synthetic image size must be >= {_MIN_SIZE}, got {size}.")
  rng = np.random.default_rng((seed, TASKS.index(task), SPLITS.index(split), index))
  if task == "edges2objects":
    return _render_objects(rng, size)
  return _render_facade(rng, size)


def _keep_freed_memory_for_reuse() -> None:
  """Stops glibc from handing the renderers' freed memory back to the OS each time.

  A render allocates and frees 3-5 MiB of temporaries. glibc's malloc returns
  free memory at the top of the heap to the OS once it exceeds a trim threshold
  (128 KiB at start), so every render page-faults it all in again, which
  halves the throughput. glibc raises that threshold to twice the size of any
  freed mmap-backed block: allocating and freeing one 16 MiB block (never
  touched) once makes it keep up to 32 MiB for reuse. Other allocators ignore it.
  """
  np.empty(16 << 20, np.uint8)


_keep_freed_memory_for_reuse()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


@functools.lru_cache(maxsize=32)
def _smoothing_matrix(size: int, step: int, sigma: float) -> np.ndarray:
  """[size, ceil(size / step)] float32: Gaussian interpolation from every step-th pixel.

  `m @ grid @ m.T` turns a grid sampled at pixels 0, step, 2 * step, ... into a
  smooth [size, size] image: one cheap way to blur and upsample at once. Rows
  are normalised for the interior, so the image fades to zero past its border.
  """
  pixels = np.arange(size, dtype=np.float64)[:, None]
  samples = np.arange(0, size, step, dtype=np.float64)[None, :]
  weights = np.exp(-0.5 * ((pixels - samples) / sigma) ** 2)
  weights[weights < 1e-4] = 0   # denormal float32 products would be very slow
  return (weights * step / (sigma * np.sqrt(2 * np.pi))).astype(np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """float in [0, 1] (clipped) -> uint8 in [0, 255], rounded; overwrites `image`."""
  image *= 255
  image += 0.5
  return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _channels_last(planes: np.ndarray) -> np.ndarray:
  """[3, H, W] -> [H, W, 3], contiguous."""
  return np.stack(list(planes), axis=-1)


def _fraction(x: np.ndarray) -> np.ndarray:
  """x - floor(x), in place (much faster than x % 1)."""
  x -= np.floor(x)
  return x


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """out[y, x] = image[y - dy, x - dx], zero where that falls outside."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  if abs(dy) < h and abs(dx) < w:
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


# ----------------------------------------------------------------------------- edges2objects

def _ellipse_sdf(x, y, a, b):
  """Approximate signed distance (pixels) to the ellipse x^2/a^2 + y^2/b^2 = 1."""
  k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
  k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
  # k0 / k1 lies in [min(a, b), max(a, b)]; the clip only matters at the centre (0 / 0).
  return (k0 - 1) * np.clip(k0 / np.maximum(k1, 1e-12), min(a, b), max(a, b))


def _box_sdf(x, y, hx, hy, r):
  """Signed distance to a box of half-sizes (hx, hy) with corner radius r."""
  qx, qy = np.abs(x) - (hx - r), np.abs(y) - (hy - r)
  outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
  return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _polygon_sdf(x, y, normals, offsets):
  """Signed distance to a convex polygon given as half-planes n.p <= d (exact inside)."""
  return np.max(normals[:, 0, None, None] * x + normals[:, 1, None, None] * y
                - offsets[:, None, None], axis=0)


def _random_shape(rng, radius):
  """A random shape in its own frame: (sdf(x, y) function, extent in pixels)."""
  kind = rng.choice(4, p=(0.3, 0.3, 0.25, 0.15))
  if kind == 0:
    a, b = radius, radius * rng.uniform(0.45, 1.0)
    return (lambda x, y: _ellipse_sdf(x, y, a, b)), radius
  if kind == 1:
    hx, hy = radius * rng.uniform(0.6, 0.95), radius * rng.uniform(0.35, 0.85)
    r = rng.uniform(0.05, 0.5) * min(hx, hy)
    return (lambda x, y: _box_sdf(x, y, hx, hy, r)), float(np.hypot(hx, hy))
  if kind == 2:    # convex: corners at increasing angles on an ellipse
    k = rng.integers(3, 8)
    angles = 2 * np.pi * (np.arange(k) + rng.uniform(-0.3, 0.3, k)) / k
    corners = np.stack([np.cos(angles), rng.uniform(0.6, 1.0) * np.sin(angles)], 1) * radius
    edges = np.roll(corners, -1, axis=0) - corners
    normals = np.stack([edges[:, 1], -edges[:, 0]], 1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offsets = np.sum(normals * corners, axis=1)
    normals *= np.sign(offsets)[:, None]   # outward, whatever the winding
    normals, offsets = normals.astype(np.float32), np.abs(offsets).astype(np.float32)
    return (lambda x, y: _polygon_sdf(x, y, normals, offsets)), radius
  # A bag: a rounded body with an elliptic ring handle on top.
  hx, hy = radius * rng.uniform(0.6, 0.85), radius * rng.uniform(0.4, 0.6)
  r = rng.uniform(0.1, 0.3) * hy
  ring_a, ring_b = hx * rng.uniform(0.4, 0.7), radius * rng.uniform(0.3, 0.45)
  thickness, drop = radius * rng.uniform(0.04, 0.08), 0.3 * radius

  def bag(x, y):
    body = _box_sdf(x, y - drop, hx, hy, r)
    handle = np.abs(_ellipse_sdf(x, y - drop + hy, ring_a, ring_b)) - thickness
    return np.minimum(body, handle)
  return bag, float(np.hypot(hx, hy)) + drop


def _random_details(rng, radius):
  """0 to 2 inner contours, each a function (sdf, x, y) -> signed distance to its region."""
  details = []
  for kind in rng.choice(3, size=rng.integers(0, 3), replace=False):
    if kind == 0:    # sole: the part of the object beyond a line
      angle = rng.normal(0, 0.25) + rng.choice([0.0, np.pi])
      nx, ny, c = float(np.sin(angle)), float(np.cos(angle)), radius * rng.uniform(0.2, 0.6)
      details.append(lambda sdf, x, y, nx=nx, ny=ny, c=c: c - (nx * x + ny * y))
    elif kind == 1:  # stripe across the object
      angle = rng.uniform(0, np.pi)
      nx, ny = float(np.cos(angle)), float(np.sin(angle))
      c, half = radius * rng.uniform(-0.4, 0.4), radius * rng.uniform(0.06, 0.15)
      details.append(lambda sdf, x, y, nx=nx, ny=ny, c=c, half=half:
                     np.abs(nx * x + ny * y - c) - half)
    else:            # inset panel
      inset = radius * rng.uniform(0.12, 0.3)
      details.append(lambda sdf, x, y, inset=inset: sdf + inset)
  return details


def _object_colour(rng):
  """Saturated colour of uniform hue, drawn without looking at the shape."""
  return _hsv(rng.uniform(), rng.uniform(0.55, 0.95), rng.uniform(0.5, 0.92))


def _render_object(rng, size, num_objects, light, line_width, centres):
  """One object in its bounding window: (window slices, alpha, rgb [3, h, w], ink), float32."""
  scale = {1: (0.24, 0.36), 2: (0.16, 0.25)}.get(num_objects, (0.12, 0.19))
  radius = size * rng.uniform(*scale)
  sdf_fn, extent = _random_shape(rng, radius)
  margin = min(extent, 0.5 * size)
  cx, cy = (rng.uniform(margin, size - margin) for _ in range(2))
  angle = rng.uniform(-0.5, 0.5) if rng.uniform() < 0.6 else rng.uniform(0, 2 * np.pi)
  details = _random_details(rng, radius)
  base = _object_colour(rng)
  # A detail is another random hue, or a clearly lighter or darker shade of the base.
  detail_colours = [_object_colour(rng) if rng.uniform() < 0.5 else
                    base + 0.6 * (1 - base) if rng.uniform() < 0.5 else 0.45 * base
                    for _ in details]

  reach = extent + line_width + 2
  y0, y1 = int(max(cy - reach, 0)), int(min(cy + reach + 1, size))
  x0, x1 = int(max(cx - reach, 0)), int(min(cx + reach + 1, size))
  dy, dx = centres[y0:y1, None] - cy, centres[None, x0:x1] - cx
  cos, sin = float(np.cos(angle)), float(np.sin(angle))
  x, y = cos * dx + sin * dy, cos * dy - sin * dx
  sdf = sdf_fn(x, y)
  alpha = np.clip(0.5 - sdf, 0, 1)
  half_line = 0.5 * line_width + 0.5   # anti-aliased: ink fades over the last pixel
  ink = np.clip(half_line - np.abs(sdf), 0, 1)
  rgb = np.empty((3,) + alpha.shape, np.float32)   # channels first: numpy is fast on wide rows
  rgb[:] = base[:, None, None]
  for detail_fn, colour in zip(details, detail_colours):
    inner = detail_fn(sdf, x, y)
    rgb += np.clip(0.5 - inner, 0, 1) * (colour[:, None, None] - rgb)
    ink = np.maximum(ink, np.clip(half_line - np.abs(inner), 0, 1) * alpha)

  # Brighter towards the light, a darker rim, and a glossy spot on the lit side.
  lx, ly = light
  shade = np.clip(0.82 + (0.3 / radius) * (dx * lx + dy * ly)
                  - (0.12 / radius ** 2) * (dx * dx + dy * dy), 0.3, 1.2)
  shade *= 0.72 + 0.28 * np.clip(sdf * (-1 / (0.15 * radius)), 0, 1)
  sigma = radius * rng.uniform(0.1, 0.22)
  sx, sy = dx - 0.45 * radius * lx, dy - 0.45 * radius * ly
  spot = rng.uniform(0.3, 0.75) * np.exp((sx * sx + sy * sy) * (-0.5 / sigma ** 2))
  rgb *= shade
  np.minimum(rgb, 1, out=rgb)
  rgb += spot * (1 - rgb)
  return (slice(y0, y1), slice(x0, x1)), alpha, rgb, ink


def _render_objects(rng, size):
  centres = np.arange(size, dtype=np.float32) + 0.5
  line_width = max(1.0, size / 160)
  light_angle = rng.uniform(-np.pi + 0.3, -0.3)   # the light is above: y grows downwards
  light = (float(np.cos(light_angle)), float(np.sin(light_angle)))
  num_objects = int(rng.choice([1, 2, 3], p=(0.45, 0.35, 0.2)))
  objects = [_render_object(rng, size, num_objects, light, line_width, centres)
             for _ in range(num_objects)]

  # Soft shadow: the objects' union, pushed away from the light and blurred.
  union = np.zeros((size, size), np.float32)
  for window, alpha, _, _ in objects:
    union[window] = np.maximum(union[window], alpha)
  reach = size * rng.uniform(0.02, 0.06)
  union = _shift(union, int(round(0.02 * size - light[1] * reach)), int(round(-light[0] * reach)))
  step = max(1, size // 64)
  smooth = _smoothing_matrix(size, step, size / 40)
  shadow = smooth @ union[::step, ::step] @ smooth.T

  rows = rng.uniform(0.86, 0.97) + rng.uniform(-0.06, 0.03) * (centres / size - 0.5)
  tint = rng.uniform(-0.015, 0.015, 3).astype(np.float32)
  light_left = 1 - rng.uniform(0.3, 0.5) * shadow
  photo = np.stack([(rows[:, None] + tint[c]) * light_left for c in range(3)])
  ink = np.zeros((size, size), np.float32)
  for window, alpha, rgb, object_ink in objects:   # back to front: the front hides the back
    photo[(slice(None),) + window] += alpha * (rgb - photo[(slice(None),) + window])
    ink[window] = np.maximum(ink[window] * (1 - alpha), object_ink)
  edges = _to_uint8(1 - _INK_DARKNESS * ink)
  return {"image_a": np.stack([edges] * 3, axis=-1), "image_b": _channels_last(_to_uint8(photo))}


# ----------------------------------------------------------------------------- labels2facades

class _Facade:
  """A label map; each painted part also gets local coordinates u, v in (0, 1) and an id."""

  def __init__(self, size):
    self.size = size
    self.labels = np.full((size, size), _SKY, np.uint8)
    self.u = np.zeros((size, size), np.float32)
    self.v = np.zeros((size, size), np.float32)
    self.part = np.zeros((size, size), np.float32)   # float: it feeds float arithmetic
    self._ramp = np.arange(size, dtype=np.float32) + 0.5
    self._num_parts = 0

  def paint(self, cls, y0, y1, x0, x1, *, part=True):
    """Fills the rectangle [y0, y1) x [x0, x1) (floats, at least one pixel) with `cls`."""
    y0, x0 = min(max(round(y0), 0), self.size - 1), min(max(round(x0), 0), self.size - 1)
    y1, x1 = max(y0 + 1, min(round(y1), self.size)), max(x0 + 1, min(round(x1), self.size))
    self.labels[y0:y1, x0:x1] = cls
    if part:
      self._num_parts += 1
      self.u[y0:y1, x0:x1] = self._ramp[:x1 - x0] / (x1 - x0)
      self.v[y0:y1, x0:x1] = self._ramp[:y1 - y0, None] / (y1 - y0)
      self.part[y0:y1, x0:x1] = self._num_parts


def _facade_layout(rng, size):
  """Paints a random facade: roof over a grid of floors x columns of windows."""
  f = _Facade(size)
  s = float(size)
  left = s * rng.uniform(0, 0.08) if rng.uniform() < 0.5 else 0.0
  right = s - (s * rng.uniform(0, 0.08) if rng.uniform() < 0.5 else 0.0)
  roof_top = s * rng.uniform(0.02, 0.12)
  roof_base = roof_top + s * rng.uniform(0.05, 0.15)
  f.paint(_WALL, roof_base, s, left, right, part=False)
  if rng.uniform() < 0.45:     # gable: a trapezoid, narrower at the top
    rows = slice(int(round(roof_top)), int(round(roof_base)))
    y = np.arange(size, dtype=np.float32)[rows, None] + 0.5
    x = np.arange(size, dtype=np.float32)[None, :] + 0.5
    half_base = 0.5 * (right - left) + s * 0.02
    half_top = half_base * rng.uniform(0.0, 0.6)
    half = half_top + (half_base - half_top) * (y - roof_top) / max(roof_base - roof_top, 1)
    f.labels[rows][np.abs(x - 0.5 * (left + right)) <= half] = _ROOF
  else:
    f.paint(_ROOF, roof_top, roof_base, left, right, part=False)
  cornice = s * rng.uniform(0.012, 0.03) if rng.uniform() < 0.85 else 0.0
  if cornice:
    f.paint(_CORNICE, roof_base, roof_base + cornice, left - 0.01 * s, right + 0.01 * s)

  top = roof_base + cornice
  num_floors, num_columns = int(rng.integers(3, 7)), int(rng.integers(2, 7))
  ground = rng.uniform(1.0, 1.4)
  floor_h = (s - top) / (num_floors - 1 + ground)
  column_w = (right - left) / num_columns
  win_w, win_h = column_w * rng.uniform(0.35, 0.65), floor_h * rng.uniform(0.45, 0.7)
  win_top = (floor_h - win_h) * rng.uniform(0.3, 0.6)
  sill_h = max(1.0, s * 0.012) if rng.uniform() < 0.7 else 0.0
  string_courses = rng.uniform() < 0.4
  balcony_floors = rng.uniform(size=num_floors) < (0.5 if rng.uniform() < 0.6 else 0.0)
  balcony_h, continuous = win_h * rng.uniform(0.25, 0.4), rng.uniform() < 0.3
  doors = rng.choice(num_columns, size=1 + int(rng.uniform() < 0.3), replace=False)
  door_w, door_h = column_w * rng.uniform(0.4, 0.7), floor_h * ground * rng.uniform(0.65, 0.85)

  for floor in range(num_floors):
    y0 = top + floor * floor_h
    if string_courses and floor:
      f.paint(_CORNICE, y0, y0 + 0.6 * max(cornice, 0.015 * s), left, right)
    is_ground = floor == num_floors - 1
    for column in range(num_columns):
      cx = left + (column + 0.5) * column_w
      if is_ground and column in doors:
        f.paint(_DOOR, s - door_h, s, cx - door_w / 2, cx + door_w / 2)
        continue
      wy0 = y0 + win_top * (ground if is_ground else 1)
      f.paint(_WINDOW, wy0, wy0 + win_h, cx - win_w / 2, cx + win_w / 2)
      if sill_h:
        f.paint(_SILL, wy0 + win_h, wy0 + win_h + sill_h, cx - 0.6 * win_w, cx + 0.6 * win_w)
      if balcony_floors[floor] and not is_ground and not continuous:
        f.paint(_BALCONY, wy0 + win_h - balcony_h, wy0 + win_h + sill_h,
                cx - 0.65 * win_w, cx + 0.65 * win_w)
    if balcony_floors[floor] and not is_ground and continuous:
      wy1 = y0 + win_top + win_h + sill_h
      f.paint(_BALCONY, wy1 - balcony_h - sill_h, wy1, left + 0.03 * s, right - 0.03 * s)
  return f


def _facade_colours(rng):
  """Base colours [K + 2, 3] float32 in [0, 1]: the classes, then frames and blinds."""
  wall = _hsv(rng.uniform(), rng.uniform(0.05, 0.55), rng.uniform(0.45, 0.9))
  stone = wall + rng.uniform(0.3, 0.6) * (1 - wall)
  roof_hue = rng.uniform(-0.02, 0.08) if rng.uniform() < 0.6 else rng.uniform(0.55, 0.65)
  door_hue = rng.uniform(0.03, 0.12) if rng.uniform() < 0.7 else rng.uniform()
  frame = (_hsv(0, 0, rng.uniform(0.85, 0.97)) if rng.uniform() < 0.6 else
           _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.2, 0.4)))
  return np.stack([
      _hsv(rng.uniform(0.53, 0.63), rng.uniform(0.1, 0.5), rng.uniform(0.75, 0.95)),   # sky
      _hsv(roof_hue, rng.uniform(0.2, 0.6), rng.uniform(0.22, 0.45)),                  # roof
      wall,
      _hsv(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.4), rng.uniform(0.12, 0.28)),    # glass
      _hsv(door_hue, rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.45)),                   # door
      _hsv(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.08, 0.3)),               # balcony
      stone,                                                                             # cornice
      stone * rng.uniform(0.85, 0.95),                                                   # sill
      frame,
      _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.25), 0.85),                     # blind
  ]).astype(np.float32)


def _wall_texture(rng, size, ys, xs):
  """Brightness [size, size] float32: bricks with mortar and a tint per brick, or plaster."""
  if rng.uniform() < 0.6:
    brick_h = max(2, int(round(size * rng.uniform(0.012, 0.022))))
    brick_w = int(round(brick_h * rng.uniform(2.2, 3.2)))
    courses = ys // brick_h
    odd = courses % 2 == 1          # every other course is offset by half a brick
    shifted = xs + brick_w // 2
    column = np.where(odd, shifted // brick_w, xs // brick_w)
    mortar = (ys % brick_h == 0) | np.where(odd, shifted % brick_w == 0, xs % brick_w == 0)
    columns = size // brick_w + 2
    tints = rng.uniform(0.88, 1.12, size=(size // brick_h + 1) * columns).astype(np.float32)
    return np.where(mortar, np.float32(rng.uniform(0.7, 1.25)),
                    np.take(tints, courses * columns + column))
  step = max(2, size // 16)
  smooth = _smoothing_matrix(size, step, 1.2 * step)
  blotches = smooth @ rng.uniform(-1, 1, size=(smooth.shape[1],) * 2).astype(np.float32) @ smooth.T
  return 1 + 0.12 * blotches


def _render_facade(rng, size):
  f = _facade_layout(rng, size)
  labels, u, v = f.labels, f.u, f.v
  colours = _facade_colours(rng)
  frame_id, blind_id = len(FACADE_CLASSES), len(FACADE_CLASSES) + 1
  ys, xs = np.arange(size, dtype=np.int32)[:, None], np.arange(size, dtype=np.int32)[None, :]
  sky, wall, window, door = (labels == c for c in (_SKY, _WALL, _WINDOW, _DOOR))
  # Per-pane values in [0, 1): part ids scattered by golden-ratio steps, a cheap
  # stand-in for a random table lookup that looks just as irregular across panes.
  tone, glint_at, blind_at = (_fraction(f.part * step + rng.uniform())
                              for step in (0.618034, 0.754878, 0.569840))

  # Brightness per class: the sky lightens towards the horizon, roof tiles come in
  # rows, stone mouldings darken underneath, each pane has its own tone and a
  # diagonal glint, doors have planks and panel lines, railings have gaps.
  shade = np.where(wall, _wall_texture(rng, size, ys, xs), np.float32(1))
  shade = np.where(sky, (0.85 + (0.3 / size) * ys).astype(np.float32), shade)
  shade[(labels == _ROOF) & (ys % max(2, size // 64) == 0)] = 0.7
  stone = (labels == _CORNICE) | (labels == _SILL)
  shade = np.where(stone, 1.05 - 0.35 * v, shade)
  glint = np.clip(1 - 4 * np.abs(u + 0.6 * v - 1.6 * glint_at), 0, 1)
  shade = np.where(window, 0.7 + 0.6 * tone + 1.5 * glint, shade)
  panel = (np.abs(u - 0.5) < 0.03) | (np.abs(v - 0.45) < 0.02)
  planks = np.where((xs // max(2, size // 64)) % 2 == 1, np.float32(1.1), np.float32(0.9))
  shade = np.where(door, np.where(panel, np.float32(0.6), planks), shade)
  bar_gap = max(3, size // 40)
  bar = (xs % bar_gap < max(1, bar_gap // 3)) | (v < 0.15) | (v > 0.9)
  shade[(labels == _BALCONY) & ~bar] = 0.45

  # Window and door frames (windows also get a mullion and a transom); some blinds.
  frame = rng.uniform(0.06, 0.12)
  border = (u < frame) | (u > 1 - frame) | (v < frame) | (v > 1 - frame)
  cross = (np.abs(u - 0.5) < frame / 2) | (np.abs(v - 0.35) < frame / 2)
  on_frame = (border & (window | door)) | (cross & window)
  blind = window & ~on_frame & (blind_at < 0.3) & (v < 2 * blind_at)
  surface = np.where(on_frame, np.uint8(frame_id), np.where(blind, np.uint8(blind_id), labels))
  shade[on_frame] = 1
  shade[blind & (ys % 3 == 0)] = 0.85

  # Shadows cast downwards by the roof, cornices, sills and balconies; the sun's
  # gradient across the facade; sensor noise.
  overhangs = np.take(np.isin(np.arange(len(FACADE_CLASSES)), (_ROOF, _BALCONY, _CORNICE, _SILL)),
                      labels)
  shade[_shift(overhangs, max(1, size // 64), 0) & ~overhangs] *= 0.7
  shade *= (1 + rng.uniform(-0.25, 0.25) * (xs / size - 0.5)).astype(np.float32)
  noise = rng.random((size, size), dtype=np.float32)
  noise -= 0.5
  noise *= rng.uniform(0.03, 0.08)
  photo = np.stack([np.take(channel, surface) for channel in np.ascontiguousarray(colours.T)])
  photo *= shade
  photo += noise
  return {"image_a": np.take(FACADE_PALETTE, labels, axis=0),
          "image_b": _channels_last(_to_uint8(photo)),
          "labels": labels}

