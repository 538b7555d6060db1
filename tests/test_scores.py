"""The paper's scores: FCN-score (segmentation of generated photos) and Lab colour statistics."""

import os

import numpy as np
import pytest

from configs import default
from p2p_jax import color_stats
from p2p_jax import input_pipeline
from p2p_jax import segmentation


def _scores(labels, predictions, num_classes, mask=None):
  confusion = segmentation.confusion_matrix(np.array(labels), np.array(predictions), num_classes,
                                            mask)
  return segmentation.scores_from_confusion(confusion)


# ----------------------------------------------------------------------------- FCN-score

def test_perfect_prediction_scores_one():
  labels = np.random.default_rng(0).integers(0, 5, (3, 8, 8))
  assert _scores(labels, labels, 5) == {"per_pixel_acc": 1.0, "per_class_acc": 1.0,
                                        "class_iou": 1.0}


def test_shifted_prediction_scores_less():
  labels = np.zeros((1, 8, 8), int)
  labels[:, 2:6, 2:6] = 1
  labels[:, 0, :] = 2
  shifted = np.roll(labels, 1, axis=2)
  scores = _scores(labels, shifted, 3)
  assert all(0 < value < 1 for value in scores.values())
  assert scores["class_iou"] < scores["per_pixel_acc"]


def test_small_example_computed_by_hand():
  # true 0 0 / 1 2, predicted 0 1 / 1 1:
  #   per pixel 2/4; recalls 1/2, 1/1, 0/1; IoUs 1/2, 1/(1 + 3 - 1), 0/1.
  scores = _scores([[0, 0], [1, 2]], [[0, 1], [1, 1]], 3)
  assert scores["per_pixel_acc"] == pytest.approx(0.5)
  assert scores["per_class_acc"] == pytest.approx(0.5)
  assert scores["class_iou"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)


def test_absent_classes_and_mask():
  # Class 3 occurs nowhere: it leaves the means. Class 2 is only predicted: IoU 0, no recall.
  scores = _scores([[0, 1]], [[0, 2]], 4)
  assert scores["per_class_acc"] == pytest.approx(0.5)         # (1 + 0) / 2
  assert scores["class_iou"] == pytest.approx(1 / 3)           # (1 + 0 + 0) / 3
  masked = _scores([[0, 1]], [[0, 2]], 4, mask=np.array([[True, False]]))
  assert masked == {"per_pixel_acc": 1.0, "per_class_acc": 1.0, "class_iou": 1.0}
  confusion = segmentation.confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 0]), 2)
  np.testing.assert_array_equal(confusion, [[0, 1], [1, 1]])   # [true, predicted]


def test_class_ids_out_of_range_are_an_error():
  with pytest.raises(ValueError, match=r"predictions hold class ids outside \[0, 3\)"):
    segmentation.confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 3), 3)


class _OracleScorer:
  """Predicts the real photos' class maps perfectly and the generated ones' as class 0."""
  num_classes = 3

  def __init__(self, labels):
    self.labels, self.real = labels, None

  def predict(self, images):
    return self.labels if images is self.real else np.zeros_like(self.labels)


def test_fcn_score_hook_scores_real_and_generated_photos_apart():
  labels = np.zeros((4, 8, 8), np.int32)
  labels[:, 4:] = 1
  labels[3] = 2                        # only in a padding row: must not count
  real_b = np.zeros((4, 8, 8, 3), np.float32)
  scorer = _OracleScorer(labels)
  scorer.real = real_b
  hook = segmentation.FcnScore(scorer)
  hook.add({"labels": labels, "real_b": real_b}, np.ones_like(real_b),
           np.array([True, True, True, False]))
  result = hook.result()
  assert result["fcn_real_per_pixel_acc"] == 1.0 and result["fcn_real_class_iou"] == 1.0
  assert result["fcn_per_pixel_acc"] == pytest.approx(0.5)   # everything called class 0
  assert result["fcn_per_class_acc"] == pytest.approx(0.5)   # recalls 1 and 0
  assert result["fcn_class_iou"] == pytest.approx(0.25)      # IoUs 1/2 and 0


_SCORER_STEPS = 40


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
  """A scorer trained for a few steps on 16 real 32x32 labels2facades photos, cached."""
  directory = str(tmp_path_factory.mktemp("scorer"))
  segmentation.load_or_train_scorer(_scorer_config(), directory, steps=_SCORER_STEPS)
  return directory


def _scorer_config():
  config = default.get_config("smoke")
  config.data.name = "labels2facades"
  config.data.num_train_examples = 16
  return config


def test_scorer_is_cached_and_loads_without_training(scorer_dir, monkeypatch):
  config = _scorer_config()
  stem = os.path.join(scorer_dir, segmentation.scorer_key(config, _SCORER_STEPS))
  assert os.path.exists(f"{stem}.msgpack") and os.path.exists(f"{stem}.json")

  def no_training(*args, **kwargs):
    raise AssertionError("the cached scorer should have been loaded")
  monkeypatch.setattr(segmentation, "_train", no_training)
  scorer = segmentation.load_or_train_scorer(config, scorer_dir, steps=_SCORER_STEPS)
  assert scorer.info["train_images"] == 16 and scorer.info["image_size"] == [32, 32]
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  predictions = scorer.predict(images)
  assert predictions.shape == (2, 32, 32) and predictions.dtype == np.int32
  assert 0 <= predictions.min() and predictions.max() < 8
  assert scorer.levels == 2                      # pooled down to 8x8
  with pytest.raises(ValueError, match="multiples of 4"):
    scorer.predict(np.zeros((1, 10, 10, 3), np.float32))


def test_scorer_reads_real_test_photos_better_than_chance(scorer_dir, monkeypatch):
  monkeypatch.setattr(segmentation, "_train", None)   # loaded, never retrained
  config = _scorer_config()
  scorer = segmentation.load_or_train_scorer(config, scorer_dir, steps=_SCORER_STEPS)
  confusion = 0
  for batch in input_pipeline.create_eval_iterator(config):   # the test split: unseen photos
    confusion = confusion + segmentation.confusion_matrix(
        batch["labels"], scorer.predict(batch["real_b"]), 8, batch["mask"][:, None, None])
  scores = segmentation.scores_from_confusion(confusion)
  majority = confusion.sum(axis=1).max() / confusion.sum()   # always guessing the commonest class
  assert scores["per_pixel_acc"] > majority + 0.1
  assert scores["per_class_acc"] > 0.25                       # the majority guess: 1 / 8


def test_fcn_score_needs_class_maps(tmp_path):
  config = default.get_config("smoke")        # edges2objects: no class maps
  config.eval.fcn_score = True
  assert not segmentation.has_class_maps(config)
  with pytest.raises(ValueError, match="no class maps.*fcn_score=False"):
    segmentation.create_fcn_score(config, str(tmp_path))
  config.eval.fcn_score = False
  assert segmentation.create_fcn_score(config, str(tmp_path)) is None


# ----------------------------------------------------------------------------- colour

def test_lab_of_known_colours():
  lab = color_stats.srgb_to_lab(np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0.5, 0.5, 0.5]]))
  np.testing.assert_allclose(lab[0], [100, 0, 0], atol=1e-3)
  np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.02)   # sRGB red
  np.testing.assert_allclose(lab[2], [0, 0, 0], atol=1e-3)
  np.testing.assert_allclose(lab[3, 1:], [0, 0], atol=1e-3)             # greys have no chroma


def _photos():
  rng = np.random.default_rng(0)
  hues = rng.uniform(-1, 1, (6, 1, 1, 3))
  return np.clip(hues + rng.normal(0, 0.1, (6, 16, 16, 3)), -1, 1).astype(np.float32)


def _desaturate(images, keep):
  grey = images.mean(axis=-1, keepdims=True)
  return grey + keep * (images - grey)


def test_identical_images_have_no_colour_distance():
  real = _photos()
  stats = color_stats.color_statistics(real, real)
  assert stats["ab_hist_distance"] == 0.0
  assert stats["hist_intersection_L"] == pytest.approx(1.0)
  assert stats["hist_intersection_a"] == stats["hist_intersection_b"] == pytest.approx(1.0)
  assert stats["mean_chroma_fake"] == stats["mean_chroma_real"] > 0


def test_desaturated_images_are_further_and_duller():
  real = _photos()
  slightly = color_stats.color_statistics(_desaturate(real, 0.8), real)
  strongly = color_stats.color_statistics(_desaturate(real, 0.3), real)
  assert 0 < slightly["ab_hist_distance"] < strongly["ab_hist_distance"] <= 1
  assert strongly["hist_intersection_a"] < slightly["hist_intersection_a"] < 1
  assert strongly["mean_chroma_fake"] < slightly["mean_chroma_fake"] < slightly["mean_chroma_real"]


def test_colour_hook_counts_only_kept_rows():
  real = _photos()
  fake = real.copy()
  fake[-1] = 0                                   # a grey padding row
  hook = color_stats.ColorStats()
  keep = np.array([True] * 5 + [False])
  hook.add({"real_b": real}, fake, keep)
  assert hook.result()["ab_hist_distance"] == 0.0


def test_region_spread_tells_a_blotchy_wall_from_an_even_one():
  """Two regions per image; the blotchy output paints one of them in two colours."""
  labels = np.zeros((2, 16, 16), np.int32)
  labels[:, :, 8:] = 1
  even = np.zeros((2, 16, 16, 3), np.float32)
  even[..., 0] = 0.6                              # a reddish wall, left; grey, right
  even[:, :, 8:] = 0.0
  blotchy = even.copy()
  blotchy[:, :8, :8] = [-0.6, 0.6, -0.6]          # half the wall turns green
  hook = color_stats.ColorStats()
  hook.add({"real_b": even, "labels": labels}, blotchy, np.ones(2, bool))
  result = hook.result()
  assert result["region_ab_spread_real"] == pytest.approx(0.0, abs=1e-3)
  total, pixels = color_stats.region_spreads(blotchy, labels)
  assert pixels == 2 * 16 * 16 and result["region_ab_spread_fake"] == pytest.approx(total / pixels)
  assert result["region_ab_spread_fake"] > 20     # Lab units: a red/green split of one region
  assert "region_ab_spread_fake" not in color_stats.color_statistics(even, even)   # no labels
