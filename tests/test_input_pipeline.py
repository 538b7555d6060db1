"""The input pipeline: batch layout, jitter, order, resumption, the per-host split, eval."""

import itertools
import sys
import types

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import default
import p2p_jax.datasets
from p2p_jax import input_pipeline
from p2p_jax.datasets import DataError
from p2p_jax.datasets import synthetic
from tests.test_folder_source import SIZE, folder_config, noise, save, write_aligned


def host_rows(batch):
  """[devices, per_device, ...] device arrays -> [devices * per_device, ...] numpy."""
  return {key: np.asarray(value).reshape((-1,) + value.shape[2:]) for key, value in batch.items()}


def take(iterator, count):
  return [host_rows(batch) for batch in itertools.islice(iterator, count)]


def indexed_folder(root, count):
  """A|B files whose A is the constant grey 10 + 7 * index, so a row tells its example."""
  rng = np.random.default_rng(count)
  write_aligned(root, "train", [np.full((SIZE, SIZE, 3), 10 + 7 * i, np.uint8)
                                for i in range(count)], [noise(rng) for _ in range(count)])


def example_indices(rows):
  return np.round(((rows["real_a"].mean(axis=(1, 2, 3)) + 1) * 127.5 - 10) / 7).astype(int)


def test_tensorflow_sees_no_accelerator():
  assert tf.config.get_visible_devices("GPU") == []


def test_train_batches_are_sharded_floats_in_range():
  config = default.get_config("smoke")
  config.model.output_nc = 1
  batch = next(input_pipeline.create_train_iterator(config))
  assert set(batch) == {"real_a", "real_b"}
  assert batch["real_a"].shape == (8, 1, 32, 32, 3) and batch["real_b"].shape == (8, 1, 32, 32, 1)
  for value in batch.values():
    assert value.dtype == np.float32
    assert -1 <= float(value.min()) < float(value.max()) <= 1
    assert value.sharding.mesh.axis_names == ("batch",)
    assert list(value.sharding.mesh.devices.flat) == jax.local_devices()
    assert value.sharding.spec == jax.sharding.PartitionSpec("batch")
  assert input_pipeline.steps_per_epoch(config) == 32 // 8
  assert input_pipeline.num_examples(config, "test") == 8
  assert input_pipeline.pipeline_throughput(config, 2) > 0


def test_batch_size_must_split_over_the_devices():
  config = default.get_config("smoke")
  config.batch_size = 12
  with pytest.raises(ValueError, match=r"batch_size=12 does not split evenly over 8 device"):
    input_pipeline.create_train_iterator(config)
  config.batch_size = 8
  with pytest.raises(ValueError, match=r"over 16 device\(s\) \(2 process\(es\) x 8 local"):
    input_pipeline.create_train_iterator(config, process_index=0, process_count=2)
  config.batch_size = 64
  with pytest.raises(ValueError, match="has 32 examples, fewer than one global batch"):
    input_pipeline.steps_per_epoch(config)


def test_resumed_iterator_continues_the_unbroken_run_across_epochs():
  config = default.get_config("smoke")      # 32 examples, batch 8: 4 steps per epoch
  unbroken = take(input_pipeline.create_train_iterator(config), 10)
  resumed = take(input_pipeline.create_train_iterator(config, start_step=3), 7)
  for expected, got in zip(unbroken[3:], resumed):
    np.testing.assert_array_equal(got["real_a"], expected["real_a"])
    np.testing.assert_array_equal(got["real_b"], expected["real_b"])
  # Epochs differ: another order and other jitter.
  assert not np.array_equal(unbroken[0]["real_b"], unbroken[4]["real_b"])
  config.seed = 1
  other_seed = take(input_pipeline.create_train_iterator(config), 1)
  assert not np.array_equal(other_seed[0]["real_b"], unbroken[0]["real_b"])


def test_two_processes_together_see_the_one_process_global_batch(tmp_path):
  indexed_folder(tmp_path, 36)       # 36 = 2 global batches of 16 + a remainder of 4
  config = folder_config(tmp_path, preprocess="crop", crop_size=32)
  config.batch_size = 16
  one = take(input_pipeline.create_train_iterator(config, process_index=0, process_count=1), 4)
  parts = [take(input_pipeline.create_train_iterator(
      config, process_index=p, process_count=2, start_step=1), 3) for p in range(2)]
  for step in range(1, 4):
    for key in ("real_a", "real_b"):
      joined = np.concatenate([parts[0][step - 1][key], parts[1][step - 1][key]])
      np.testing.assert_array_equal(joined, one[step][key])
  for epoch in range(2):
    seen = np.concatenate([example_indices(one[2 * epoch + s]) for s in range(2)])
    assert len(set(seen.tolist())) == 32 and set(seen.tolist()) <= set(range(36))
  # Each epoch has its own order, and leaves out its own remainder.
  assert not np.array_equal(example_indices(one[0]), example_indices(one[2]))
  dropped = [set(range(36)) - set(np.concatenate([example_indices(one[2 * e + s])
                                                  for s in range(2)]).tolist()) for e in range(2)]
  assert dropped[0] != dropped[1]


def test_direction_swaps_input_and_target():
  config = default.get_config("smoke")
  a_to_b = take(input_pipeline.create_train_iterator(config), 2)
  config.data.direction = "BtoA"
  b_to_a = take(input_pipeline.create_train_iterator(config), 2)
  for forward, backward in zip(a_to_b, b_to_a):
    np.testing.assert_array_equal(forward["real_a"], backward["real_b"])
    np.testing.assert_array_equal(forward["real_b"], backward["real_a"])


@pytest.mark.parametrize("preprocess", ["crop", "resize_and_crop"])
def test_a_and_b_get_the_same_crop_and_flip(tmp_path, preprocess):
  rng = np.random.default_rng(9)
  images_a = [noise(rng, 40) for _ in range(16)]
  write_aligned(tmp_path, "train", images_a, [255 - a for a in images_a])   # B = 255 - A
  config = folder_config(tmp_path, preprocess=preprocess, load_size=40)
  flips, offsets = set(), set()
  for rows in take(input_pipeline.create_train_iterator(config), 4):
    # Bicubic resizing commutes with 255 - x up to rounding: one grey level.
    np.testing.assert_allclose(rows["real_b"], -rows["real_a"], atol=1 / 127.5 + 1e-6)
    if preprocess == "crop":
      for real_a in rows["real_a"]:
        pixels = np.round((real_a + 1) * 127.5).astype(np.uint8)
        for image, flip, top, left in itertools.product(images_a, (False, True), range(9),
                                                        range(9)):
          window = image[top:top + 32, left:left + 32]
          if np.array_equal(window[:, ::-1] if flip else window, pixels):
            flips.add(flip)
            offsets.add((top, left))
            break
        else:
          raise AssertionError("a training image is no crop of any A")
  if preprocess == "crop":
    assert flips == {False, True} and len(offsets) > 4


def test_preprocess_modes_for_non_square_images(tmp_path):
  rng = np.random.default_rng(10)
  write_aligned(tmp_path / "wide", "train", [noise(rng, 32, 64) for _ in range(8)],
                [noise(rng, 32, 64) for _ in range(8)])
  config = folder_config(tmp_path / "wide", preprocess="none")
  assert host_rows(next(input_pipeline.create_train_iterator(config)))["real_a"].shape == (
      8, 32, 64, 3)
  config = folder_config(tmp_path / "wide", preprocess="scale_width_and_crop", load_size=48)
  assert host_rows(next(input_pipeline.create_train_iterator(config)))["real_b"].shape == (
      8, 32, 32, 3)
  config = folder_config(tmp_path / "wide", preprocess="scale_width", load_size=64)
  assert host_rows(next(input_pipeline.create_train_iterator(config)))["real_a"].shape == (
      8, 32, 64, 3)
  eval_batch = next(input_pipeline.create_eval_iterator(config, "train"))
  assert eval_batch["real_a"].shape == (8, 32, 64, 3)     # the training scale, uncropped
  config.data.load_size = 48
  with pytest.raises(ValueError, match="load_size=48 wide, not a multiple of 2\\*\\*num_downs=32"):
    input_pipeline.create_train_iterator(config)

  paths = write_aligned(tmp_path / "odd", "train", [noise(rng, 40) for _ in range(8)],
                        [noise(rng, 40) for _ in range(8)])
  config = folder_config(tmp_path / "odd", preprocess="none")
  with pytest.raises(DataError, match=r"is 40x40 \(WxH\).*multiples of 32.*"
                     "preprocess=resize_and_crop") as info:
    next(input_pipeline.create_train_iterator(config))
  assert info.value.path in paths
  config = folder_config(tmp_path / "odd", preprocess="crop", crop_size=64)
  config.model.num_downs = 6
  with pytest.raises(DataError, match=r"is 40x40 \(WxH\), smaller than the 64x64 crop"):
    next(input_pipeline.create_train_iterator(config))

  for i in range(8, 15):
    save(tmp_path / "wide" / "train" / f"{i:03d}.png", noise(rng, 32, 128))
  save(tmp_path / "wide" / "train" / "zz.png", noise(rng, 64, 128))   # 16 images: 2 batches
  config = folder_config(tmp_path / "wide", preprocess="none")
  with pytest.raises(DataError, match=r"becomes a \d+x\d+ .*all batches need one size"):
    take(input_pipeline.create_train_iterator(config), 2)


def test_eval_pass_is_deterministic_padded_and_split_over_processes(tmp_path):
  rng = np.random.default_rng(11)
  images_a = [noise(rng, 40) for _ in range(10)]
  write_aligned(tmp_path, "val", images_a, [noise(rng, 40) for _ in range(10)])
  config = folder_config(tmp_path, eval_split="val")
  config.eval.batch_size = 4
  batches = list(input_pipeline.create_eval_iterator(config))
  assert [batch["mask"].tolist() for batch in batches] == [[True] * 4, [True] * 4,
                                                           [True, True, False, False]]
  assert batches[2]["name"].tolist() == ["008.png", "009.png", "", ""]
  assert batches[0]["real_a"].shape == (4, 32, 32, 3) and batches[0]["real_a"].dtype == np.float32
  assert not batches[2]["real_a"][2:].any() and "labels" not in batches[0]
  resized = np.asarray(noise_free_resize(images_a[0]), np.float32) / 127.5 - 1
  np.testing.assert_allclose(batches[0]["real_a"][0], resized, atol=1e-6)
  again = list(input_pipeline.create_eval_iterator(config))
  np.testing.assert_array_equal(again[1]["real_b"], batches[1]["real_b"])

  parts = [list(input_pipeline.create_eval_iterator(config, process_index=p, process_count=2))
           for p in range(2)]
  assert [len(part) for part in parts] == [2, 2]            # 5 each: a batch of 4, one of 1
  names = [name for part in parts for batch in part for name in batch["name"] if name]
  assert names == [f"{i:03d}.png" for i in range(10)]


def noise_free_resize(image):
  from PIL import Image
  return Image.fromarray(image).resize((32, 32), Image.BICUBIC)


def test_eval_labels_come_with_class_map_sources():
  config = default.get_config("smoke")
  config.data.name = "labels2facades"
  (batch,) = list(input_pipeline.create_eval_iterator(config))
  labels = batch["labels"]
  assert labels.shape == (8, 32, 32) and labels.dtype == np.int32
  assert 0 <= labels.min() and labels.max() < synthetic.num_classes("labels2facades")
  # The label map A is the palette of the class map, pixel for pixel.
  expected = synthetic.FACADE_PALETTE[labels].astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(batch["real_a"], expected, atol=1e-6)
  assert batch["name"][0] == "000000" and batch["mask"].all()


def test_tfds_source_streams_shards_and_resumes(monkeypatch):
  """The tfds branch, on a stand-in for `pix2pix_tfds.load_split` (the builder is tested apart)."""
  def load_split(name, split, data_dir, *, manual_dir=None):
    count = 20 if split == "train" else 6
    images_a = np.stack([np.full((40, 40, 3), 10 + 7 * i, np.uint8) for i in range(count)])
    return tf.data.Dataset.from_tensor_slices({
        "image_a": images_a, "image_b": 255 - images_a,
        "file_name": [f"{i}.jpg" for i in range(count)]})

  fake = types.ModuleType("p2p_jax.datasets.pix2pix_tfds")
  fake.load_split = load_split
  monkeypatch.setitem(sys.modules, fake.__name__, fake)
  monkeypatch.setattr(p2p_jax.datasets, "pix2pix_tfds", fake, raising=False)
  config = default.get_config("smoke")
  config.data.source, config.data.name = "tfds", "facades"
  assert input_pipeline.num_examples(config, "train") == 20
  assert input_pipeline.steps_per_epoch(config) == 2

  unbroken = take(input_pipeline.create_train_iterator(config), 5)
  resumed = take(input_pipeline.create_train_iterator(config, start_step=3), 2)
  for expected, got in zip(unbroken[3:], resumed):
    np.testing.assert_array_equal(got["real_a"], expected["real_a"])
  np.testing.assert_allclose(unbroken[0]["real_b"], -unbroken[0]["real_a"], atol=1 / 127.5 + 1e-6)
  for epoch in range(2):
    seen = np.concatenate([example_indices(unbroken[2 * epoch + s]) for s in range(2)])
    assert len(set(seen.tolist())) == 16 and set(seen.tolist()) <= set(range(20))

  config.batch_size = 16
  parts = [example_indices(take(input_pipeline.create_train_iterator(
      config, process_index=p, process_count=2), 1)[0]) for p in range(2)]
  assert not set(parts[0].tolist()) & set(parts[1].tolist())

  config.eval.batch_size = 4
  batches = list(input_pipeline.create_eval_iterator(config, process_index=1, process_count=2))
  assert [batch["name"].tolist() for batch in batches] == [["1.jpg", "3.jpg", "5.jpg", ""]]
  assert batches[0]["mask"].tolist() == [True, True, True, False]
