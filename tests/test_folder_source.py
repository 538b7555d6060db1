"""The folder source: both layouts, channel conversions, and every kind of bad input."""

import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import default
from p2p_jax import input_pipeline
from p2p_jax.datasets import DataError
from p2p_jax.datasets import folder

SIZE = 32


def save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path)
  return str(path)


def noise(rng, size=SIZE, width=None):
  return rng.integers(0, 256, (size, width or size, 3), dtype=np.uint8)


def write_aligned(root, split, images_a, images_b, ext="png"):
  """DIR/split/NNN.ext files holding A|B side by side; returns their paths."""
  return [save(os.path.join(root, split, f"{i:03d}.{ext}"), np.concatenate([a, b], axis=1))
          for i, (a, b) in enumerate(zip(images_a, images_b))]


def folder_config(root, **data):
  config = default.get_config("smoke")
  config.data.source = "folder"
  config.data.dir = str(root)
  config.data.update(data)
  return config


def write_png16(path, array):
  """A 16-bit grayscale or RGB PNG (PIL cannot write 16-bit RGB)."""
  height, width = array.shape[:2]
  colour_type = 0 if array.ndim == 2 else 2
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_official_layout_lists_sorted_pairs_recursively_and_splits_halves(tmp_path):
  rng = np.random.default_rng(0)
  a, b = noise(rng), noise(rng)
  save(tmp_path / "train" / "b.png", np.concatenate([a, b], axis=1))
  save(tmp_path / "train" / "sub" / "c.PNG", np.concatenate([b, a], axis=1))
  save(tmp_path / "train" / "a.jpg", np.concatenate([a, a], axis=1))
  (tmp_path / "train" / "notes.txt").write_text("not an image, and not listed")
  os.makedirs(tmp_path / "test")

  pairs, unpaired = folder.list_pairs(str(tmp_path), "train")
  assert [pair.name for pair in pairs] == ["a.jpg", "b.png", "sub/c.PNG"]
  assert unpaired == [] and all(pair.path_b is None for pair in pairs)
  image_a, image_b = folder.load_pair(pairs[1])
  np.testing.assert_array_equal(image_a, a)
  np.testing.assert_array_equal(image_b, b)
  assert folder.split_names(str(tmp_path)) == ("test", "train")


def test_two_folder_layout_pairs_by_relative_path(tmp_path):
  rng = np.random.default_rng(1)
  a1, b1, a2, b2 = (noise(rng) for _ in range(4))
  save(tmp_path / "train" / "A" / "city" / "1.png", a1)
  save(tmp_path / "train" / "B" / "city" / "1.bmp", b1)    # the extension may differ
  save(tmp_path / "train" / "A" / "2.png", a2)
  save(tmp_path / "train" / "B" / "2.png", b2)

  pairs, unpaired = folder.list_pairs(str(tmp_path), "train")
  assert [pair.name for pair in pairs] == ["2.png", "city/1.png"] and unpaired == []
  for pair, (a, b) in zip(pairs, [(a2, b2), (a1, b1)]):
    image_a, image_b = folder.load_pair(pair)
    np.testing.assert_array_equal(image_a, a)
    np.testing.assert_array_equal(image_b, b)


def test_images_of_every_mode_become_rgb_uint8(tmp_path):
  rng = np.random.default_rng(2)
  rgb = noise(rng)
  gray = rgb[..., 0]
  rgba = np.concatenate([rgb, rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)], axis=2)
  palette_image = Image.fromarray(rgb).quantize(16)
  palette_path = str(tmp_path / "palette.png")
  palette_image.save(palette_path)
  transparent_path = str(tmp_path / "palette_transparent.png")
  palette_image.save(transparent_path, transparency=0)
  gray16 = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 64).astype(np.uint16)
  gray16_path = str(tmp_path / "gray16.png")
  write_png16(gray16_path, gray16)
  rgb16_path = str(tmp_path / "rgb16.png")
  write_png16(rgb16_path, rgb.astype(np.uint16) * 257)

  np.testing.assert_array_equal(folder.read_image(save(tmp_path / "gray.png", gray)),
                                np.repeat(gray[..., None], 3, axis=2))
  np.testing.assert_array_equal(folder.read_image(save(tmp_path / "rgba.png", rgba)), rgb)
  expected_palette = np.asarray(palette_image.convert("RGB"))
  np.testing.assert_array_equal(folder.read_image(palette_path), expected_palette)
  np.testing.assert_array_equal(folder.read_image(transparent_path), expected_palette)
  image16 = folder.read_image(gray16_path)
  assert image16.dtype == np.uint8 and image16.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(image16[..., 1], np.round(gray16 / 257).astype(np.uint8))
  assert image16.max() == round(gray16.max() / 257) > 200    # scaled, not clipped to 255
  np.testing.assert_array_equal(folder.read_image(rgb16_path), rgb)


def test_grayscale_channels_for_the_networks(tmp_path):
  rng = np.random.default_rng(3)
  images_a = [noise(rng) for _ in range(8)]
  images_b = [np.repeat(noise(rng)[..., :1], 3, axis=2) for _ in range(8)]
  write_aligned(tmp_path, "test", images_a, images_b)
  config = folder_config(tmp_path)
  config.model.input_nc = 1
  config.model.output_nc = 1
  batch = next(input_pipeline.create_eval_iterator(config))
  assert batch["real_a"].shape == (8, SIZE, SIZE, 1) and batch["real_b"].shape[-1] == 1
  luma = images_a[0].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(batch["real_a"][0, ..., 0], luma / 127.5 - 1, atol=1e-5)
  np.testing.assert_allclose(batch["real_b"][0, ..., 0], images_b[0][..., 0] / 127.5 - 1,
                             atol=1e-5)


def _write_bad(kind, path):
  if kind == "zero-byte":
    open(path, "wb").close()
    return "empty file"
  if kind == "not an image":
    with open(path, "w") as f:
      f.write("these are not the pixels you are looking for\n" * 20)
    return "not an image file"
  if kind == "truncated":
    save(path, np.random.default_rng(4).integers(0, 256, (SIZE, 2 * SIZE, 3), dtype=np.uint8))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
    return "corrupt or truncated"
  if kind == "odd width":
    save(path, np.zeros((SIZE, 2 * SIZE + 1, 3), np.uint8))
    return "odd width"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["zero-byte", "not an image", "truncated", "odd width"])
def test_a_bad_file_gives_one_plain_error_naming_it(tmp_path, kind):
  rng = np.random.default_rng(5)
  paths = write_aligned(tmp_path, "train", [noise(rng) for _ in range(8)],
                        [noise(rng) for _ in range(8)])
  reason = _write_bad(kind, paths[5])
  config = folder_config(tmp_path)
  with pytest.raises(DataError) as info:
    next(input_pipeline.create_train_iterator(config))
  assert info.value.path == paths[5]
  message = str(info.value)
  assert paths[5] in message and reason in message and "skip_bad_images" in message
  assert "tensorflow" not in message.lower()


def test_folder_structure_errors_name_the_path_and_the_fix(tmp_path):
  config = folder_config(tmp_path / "nowhere")
  with pytest.raises(DataError, match="nowhere: no such directory.*config.data.dir"):
    input_pipeline.create_train_iterator(config)

  os.makedirs(tmp_path / "data" / "val")
  config = folder_config(tmp_path / "data")
  with pytest.raises(DataError, match=r"no split folder 'train' \(splits found: val\)"):
    input_pipeline.create_train_iterator(config)
  with pytest.raises(DataError, match=r"val: no images"):
    input_pipeline.create_eval_iterator(config, "val")

  rng = np.random.default_rng(6)
  for i in range(3):
    save(tmp_path / "data" / "train" / "A" / f"{i}.png", noise(rng))
    if i != 1:
      save(tmp_path / "data" / "train" / "B" / f"{i}.png", noise(rng))
  save(tmp_path / "data" / "train" / "B" / "7.png", noise(rng))
  with pytest.raises(DataError) as info:
    input_pipeline.num_examples(config, "train")
  assert info.value.path == str(tmp_path / "data" / "train" / "A" / "1.png")
  assert "has no B image" in str(info.value) and "1 more unpaired" in str(info.value)

  config.data.skip_bad_images = True
  assert input_pipeline.num_examples(config, "train") == 2


def test_skip_bad_images_fills_the_batch_and_reports_the_files(tmp_path, caplog):
  rng = np.random.default_rng(7)
  paths = write_aligned(tmp_path, "train", [noise(rng) for _ in range(16)],
                        [noise(rng) for _ in range(16)])
  _write_bad("truncated", paths[3])
  _write_bad("zero-byte", paths[12])
  config = folder_config(tmp_path, skip_bad_images=True)
  assert input_pipeline.steps_per_epoch(config) == 2
  iterator = input_pipeline.create_train_iterator(config)
  with caplog.at_level(logging.WARNING):
    batches = [next(iterator) for _ in range(2)]   # one epoch: every file is read
  good = [i for i in range(16) if i not in (3, 12)]
  for batch in batches:
    assert batch["image_a"].shape == (8, 1, SIZE, SIZE, 3)
    assert set(np.asarray(batch["index"]).ravel().tolist()) <= set(good)
  assert set(np.concatenate([np.asarray(b["index"]).ravel() for b in batches])) == set(good)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  report = [w for w in warnings if "2 bad images skipped in epoch 0" in w]
  assert len(report) == 1 and paths[3] in report[0] and paths[12] in report[0]


def test_eval_masks_out_skipped_images(tmp_path, caplog):
  rng = np.random.default_rng(8)
  paths = write_aligned(tmp_path, "test", [noise(rng) for _ in range(6)],
                        [noise(rng) for _ in range(6)])
  _write_bad("not an image", paths[2])
  config = folder_config(tmp_path)
  with pytest.raises(DataError, match="002.png: is not an image file"):
    list(input_pipeline.create_eval_iterator(config))
  config.data.skip_bad_images = True
  with caplog.at_level(logging.WARNING):
    (batch,) = list(input_pipeline.create_eval_iterator(config))
  assert batch["mask"].tolist() == [True, True, False, True, True, True, False, False]
  assert batch["name"][3] == "003.png"
  assert any(paths[2] in r.getMessage() for r in caplog.records)


def test_tensorflow_decodes_every_mode_as_pil_does(tmp_path):
  """The pipeline decodes with TensorFlow; `read_image` (PIL) is the reference it must equal."""
  import glob
  import tensorflow as tf
  rng = np.random.default_rng(12)
  rgb = noise(rng)
  palette = Image.fromarray(rgb).quantize(16)
  palette.save(tmp_path / "palette_transparent.png", transparency=0)
  write_png16(str(tmp_path / "gray16.png"),
              (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 64).astype(np.uint16))
  write_png16(str(tmp_path / "rgb16.png"), rng.integers(0, 65536, (SIZE, SIZE, 3)))
  write_png16(str(tmp_path / "gray16_noise.png"), rng.integers(0, 65536, (SIZE, SIZE)))
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
  paths = [save(tmp_path / "gray.png", rgb[..., 0]), save(tmp_path / "rgb.bmp", rgb),
           save(tmp_path / "rgba.png", np.concatenate([rgb, rgb[..., :1]], axis=2)),
           str(tmp_path / "palette_transparent.png"), str(tmp_path / "gray16.png"),
           str(tmp_path / "rgb16.png"), str(tmp_path / "gray16_noise.png"),
           str(tmp_path / "cmyk.jpg")]
  paths += sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "photos", "*.jpg")))
  for path in paths:
    decoded = folder.tf_decode(tf.io.read_file(path)).numpy()
    np.testing.assert_array_equal(decoded, folder.read_image(path), err_msg=path)


def test_files_tensorflow_cannot_decode_go_through_pil(tmp_path, caplog):
  rng = np.random.default_rng(13)
  images_a = [noise(rng) for _ in range(8)]
  paths = write_aligned(tmp_path, "train", images_a, [noise(rng) for _ in range(8)])
  pair = np.concatenate([images_a[2], images_a[2]], axis=1)
  Image.fromarray(pair).save(paths[2], format="TIFF")       # a TIFF behind a .png name
  os.remove(paths[5])
  save(tmp_path / "train" / "005.tif", np.concatenate([images_a[5], images_a[5]], axis=1))
  config = folder_config(tmp_path, preprocess="none")
  with caplog.at_level(logging.INFO):
    batch = next(input_pipeline.create_train_iterator(config))
  rows = {int(i): image for i, image in zip(np.asarray(batch["index"]).ravel(),
                                             np.asarray(batch["image_a"]).reshape(8, SIZE, SIZE, 3))}
  for index in range(8):
    np.testing.assert_array_equal(rows[index], images_a[index])
  assert any("with PIL: TensorFlow cannot" in r.getMessage() for r in caplog.records)
