"""The synthetic paired data: deterministic, well formed, and posing the intended problems.

edges2objects must give thin dark lines that trace B's objects while B's colours
stay unpredictable from A; labels2facades must give a palette label map whose
classes B visibly depicts, with colours that change from example to example.
"""

import numpy as np
import pytest

from p2p_jax.datasets import synthetic


def _render(task, index, **kwargs):
  return synthetic.render_pair(task, index, **kwargs)


def _dilate(mask, radius):
  """True where any pixel within the (2r+1)^2 window is True (no wrap-around)."""
  h, w = mask.shape
  padded = np.pad(mask, radius)
  out = np.zeros_like(mask)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[dy:dy + h, dx:dx + w]
  return out


def _erode(mask, radius):
  return ~_dilate(~mask, radius)


def _hue_and_spread(rgb):
  """Hue angle (radians) and max - min channel spread in [0, 1] of uint8 [..., 3] pixels."""
  r, g, b = np.moveaxis(rgb.astype(np.float64) / 255, -1, 0)
  return np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b), rgb.max(-1) / 255 - rgb.min(-1) / 255


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_same_arguments_give_identical_pairs_in_any_order(task):
  forward = [_render(task, i, split="val", seed=3, size=32) for i in (4, 7)]
  backward = [_render(task, i, split="val", seed=3, size=32) for i in (7, 4)][::-1]
  for first, second in zip(forward, backward):
    assert first.keys() == second.keys()
    for key in first:
      np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_index_split_and_seed_each_change_the_example(task):
  base = _render(task, 0, size=32)
  for change in (dict(index=1), dict(split="val"), dict(split="test"), dict(seed=1)):
    args = dict(index=0, size=32) | change
    other = _render(task, args.pop("index"), **args)
    for key in ("image_a", "image_b"):
      assert not np.array_equal(base[key], other[key]), (change, key)
  # The splits are different streams: no train photo turns up in val or test.
  train = {_render(task, i, size=32)["image_b"].tobytes() for i in range(8)}
  for split in ("val", "test"):
    assert not train & {_render(task, i, split=split, size=32)["image_b"].tobytes()
                        for i in range(8)}


@pytest.mark.parametrize("task", synthetic.TASKS)
@pytest.mark.parametrize("size", [16, 33, 64, 512])
def test_shapes_dtypes_and_value_ranges(task, size):
  pair = _render(task, 5, size=size)
  expected = {"image_a", "image_b"} | ({"labels"} if synthetic.num_classes(task) else set())
  assert set(pair) == expected
  for key in ("image_a", "image_b"):
    assert pair[key].dtype == np.uint8 and pair[key].shape == (size, size, 3), key
    assert pair[key].flags.c_contiguous, key
  assert pair["image_b"].std() > 5   # a picture, not a flat fill
  if "labels" in pair:
    assert pair["labels"].dtype == np.uint8 and pair["labels"].shape == (size, size)
    assert pair["labels"].max() < synthetic.num_classes(task)


def test_edge_map_is_thin_dark_lines_on_white_that_trace_the_photo():
  size = 128
  on_colour_edges, outline_drawn = [], []
  for index in range(16):
    pair = _render("edges2objects", index, size=size)
    a, b = pair["image_a"], pair["image_b"].astype(np.int16)
    assert (a == a[..., :1]).all()                      # grey lines
    dark = a[..., 0] < 128
    assert (a[..., 0] >= 250).mean() > 0.85             # mostly white paper
    assert 0.002 < dark.mean() < 0.08
    assert _erode(dark, 2).sum() <= 0.01 * dark.sum()   # lines, not filled blobs
    # Every line lies on a colour step of B: an object outline or an inner contour.
    step = np.zeros((size, size), bool)
    step[:, :-1] |= np.abs(b[:, 1:] - b[:, :-1]).max(-1) > 24
    step[:-1] |= np.abs(b[1:] - b[:-1]).max(-1) > 24
    on_colour_edges.append(_dilate(step, 2)[dark].mean())
    # And the outline of B's objects (saturated, on a grey background) is drawn.
    objects = _hue_and_spread(pair["image_b"])[1] > 40 / 255
    boundary = objects & ~_erode(objects, 1)
    outline_drawn.append(_dilate(dark, 2)[boundary].mean())
  assert min(on_colour_edges) > 0.8 and np.mean(on_colour_edges) > 0.95
  assert min(outline_drawn) > 0.6 and np.mean(outline_drawn) > 0.9


def test_object_colours_cannot_be_predicted_from_the_edge_map():
  size, count = 64, 64
  hues, edge_features = [], []
  for index in range(count):
    pair = _render("edges2objects", index, size=size)
    hue, spread = _hue_and_spread(pair["image_b"])
    hues.append(np.angle(np.exp(1j * hue[spread > 0.25]).mean()))
    dark = pair["image_a"][..., 0] < 128
    ys, xs = np.nonzero(dark)
    edge_features.append([dark.mean(), xs.mean(), ys.mean(),
                          dark[:, :size // 2].mean() - dark[:, size // 2:].mean()])
  hues, edge_features = np.array(hues), np.array(edge_features)
  # Hues cover the colour wheel, so the best guess from A alone is a dull average.
  bins = np.histogram(np.mod(hues, 2 * np.pi), bins=12, range=(0, 2 * np.pi))[0]
  assert (bins > 0).sum() >= 9, bins
  assert abs(np.exp(1j * hues).mean()) < 0.35
  # No simple statistic of the edges tells the hue (|r| ~ 0.125 by chance for 64 samples).
  for feature in edge_features.T:
    for hue_coordinate in (np.cos(hues), np.sin(hues)):
      assert abs(np.corrcoef(feature, hue_coordinate)[0, 1]) < 0.4


def test_facade_label_map_is_the_palette_of_the_labels_and_shows_every_class():
  classes = synthetic.num_classes("labels2facades")
  assert classes == len(synthetic.FACADE_CLASSES) == len(synthetic.FACADE_PALETTE) >= 6
  assert {"sky", "roof", "wall", "window", "door", "balcony"} <= set(synthetic.FACADE_CLASSES)
  assert synthetic.FACADE_PALETTE.dtype == np.uint8
  assert len(np.unique(synthetic.FACADE_PALETTE, axis=0)) == classes
  with pytest.raises(ValueError):
    synthetic.FACADE_PALETTE[0, 0] = 1   # shared constant: read-only
  seen = set()
  for index in range(8):
    pair = _render("labels2facades", index, size=64)
    np.testing.assert_array_equal(pair["image_a"], synthetic.FACADE_PALETTE[pair["labels"]])
    seen |= set(np.unique(pair["labels"]).tolist())
  assert seen == set(range(classes))


def test_facade_photo_depicts_the_classes_in_colours_that_vary_per_example():
  wall, window = synthetic.FACADE_CLASSES.index("wall"), synthetic.FACADE_CLASSES.index("window")
  wall_colours = []
  for index in range(8):
    pair = _render("labels2facades", index, size=64)
    labels, photo = pair["labels"], pair["image_b"].astype(np.float64)
    present = [c for c in np.unique(labels) if (labels == c).sum() >= 4]
    means = np.stack([photo[labels == c].mean(0) for c in present])
    assert np.linalg.norm(means[present.index(wall)] - means[present.index(window)]) > 30
    # Classify each pixel by the nearest class-mean colour: far above chance (1 / K).
    nearest = np.array(present)[np.argmin(((photo[..., None, :] - means) ** 2).sum(-1), -1)]
    assert np.mean([(nearest[labels == c] == c).mean() for c in present]) > 0.4
    wall_colours.append(means[present.index(wall)])
  wall_colours = np.array(wall_colours)
  distances = np.linalg.norm(wall_colours[:, None] - wall_colours[None], axis=-1)
  assert np.all(distances[np.triu_indices(8, 1)] > 10)   # no two walls alike


def test_unknown_names_and_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match=r"synthetic task='edges2shoes'.*'edges2objects', 'labels2facades'"):
    synthetic.render_pair("edges2shoes", 0)
  with pytest.raises(ValueError, match=r"synthetic split='training'.*'train', 'val', 'test'"):
    synthetic.render_pair("edges2objects", 0, split="training")
  with pytest.raises(ValueError, match="'edges2shoes'"):
    synthetic.num_classes("edges2shoes")
  with pytest.raises(ValueError, match="index=-1"):
    synthetic.render_pair("edges2objects", -1)
  with pytest.raises(ValueError, match="size must be >= 16, got 8"):
    synthetic.render_pair("labels2facades", 0, size=8)
  assert synthetic.num_classes("edges2objects") == 0
