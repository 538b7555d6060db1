"""The input pipeline: batch layout, jitter, order, resumption, the per-host split, eval."""

import functools
import itertools
import logging
import os
import subprocess
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
from p2p_jax.datasets.preprocess import Preprocess
from tests.test_folder_source import SIZE, folder_config, noise, save, write_aligned


@functools.lru_cache(maxsize=None)
def _jitter(prep):
  return jax.pmap(prep.train)


def host_rows(config, batch):
  """A train batch as host rows [devices * per_device, ...], with the networks' inputs
  'real_a' / 'real_b' made by the jitter the training step runs."""
  real_a, real_b = _jitter(Preprocess.from_config(config))(batch)
  batch = dict(batch, real_a=real_a, real_b=real_b)
  return {key: np.asarray(value).reshape((-1,) + value.shape[2:]) for key, value in batch.items()}


def take(config, count, **kwargs):
  """The first `count` train batches, as `host_rows`."""
  iterator = input_pipeline.create_train_iterator(config, **kwargs)
  return [host_rows(config, batch) for batch in itertools.islice(iterator, count)]


def indexed_folder(root, count):
  """A|B files whose A is the constant grey 10 + 7 * index, so a row tells its example."""
  rng = np.random.default_rng(count)
  write_aligned(root, "train", [np.full((SIZE, SIZE, 3), 10 + 7 * i, np.uint8)
                                for i in range(count)], [noise(rng) for _ in range(count)])


def example_indices(rows):
  return np.round(((rows["real_a"].mean(axis=(1, 2, 3)) + 1) * 127.5 - 10) / 7).astype(int)


def test_tensorflow_sees_no_accelerator():
  assert tf.config.get_visible_devices("GPU") == []


def test_train_batches_are_sharded_uint8_pairs_with_their_examples():
  config = default.get_config("smoke")
  config.model.output_nc = 1
  batch = next(input_pipeline.create_train_iterator(config))
  assert set(batch) == {"image_a", "image_b", "index", "epoch"}
  assert batch["image_a"].shape == batch["image_b"].shape == (8, 1, 32, 32, 3)
  assert batch["image_a"].dtype == np.uint8 and batch["index"].dtype == np.int32
  assert np.asarray(batch["epoch"]).tolist() == [[0]] * 8
  assert len(set(np.asarray(batch["index"]).ravel().tolist())) == 8
  rows = host_rows(config, batch)
  assert rows["real_a"].shape == (8, 32, 32, 3) and rows["real_b"].shape == (8, 32, 32, 1)
  for key in ("real_a", "real_b"):
    assert rows[key].dtype == np.float32
    assert -1 <= float(rows[key].min()) < float(rows[key].max()) <= 1
  for value in batch.values():
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
  unbroken = take(config, 10)
  resumed = take(config, 7, start_step=3)
  for expected, got in zip(unbroken[3:], resumed):
    for key in ("real_a", "real_b", "index", "epoch"):
      np.testing.assert_array_equal(got[key], expected[key])
  # Epochs differ: another order and other jitter.
  assert not np.array_equal(unbroken[0]["real_b"], unbroken[4]["real_b"])
  assert sorted(np.concatenate([b["index"] for b in unbroken[:4]]).tolist()) == list(range(32))
  config.seed = 1
  other_seed = take(config, 1)
  assert not np.array_equal(other_seed[0]["real_b"], unbroken[0]["real_b"])


def test_two_processes_together_see_the_one_process_global_batch(tmp_path):
  indexed_folder(tmp_path, 36)       # 36 = 2 global batches of 16 + a remainder of 4
  config = folder_config(tmp_path, preprocess="crop", crop_size=32)
  config.batch_size = 16
  one = take(config, 4, process_index=0, process_count=1)
  parts = [take(config, 3, process_index=p, process_count=2, start_step=1) for p in range(2)]
  for step in range(1, 4):
    for key in ("real_a", "real_b", "index"):
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
  a_to_b = take(config, 2)
  config.data.direction = "BtoA"
  b_to_a = take(config, 2)
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
  for rows in take(config, 4):
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


def test_preprocess_modes_for_non_square_images(tmp_path, caplog):
  rng = np.random.default_rng(10)
  write_aligned(tmp_path / "wide", "train", [noise(rng, 32, 64) for _ in range(8)],
                [noise(rng, 32, 64) for _ in range(8)])
  config = folder_config(tmp_path / "wide", preprocess="none")
  assert take(config, 1)[0]["real_a"].shape == (8, 32, 64, 3)
  config = folder_config(tmp_path / "wide", preprocess="scale_width_and_crop", load_size=48)
  assert take(config, 1)[0]["real_b"].shape == (8, 32, 32, 3)
  config = folder_config(tmp_path / "wide", preprocess="scale_width", load_size=64)
  assert take(config, 1)[0]["real_a"].shape == (8, 32, 64, 3)
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
  assert info.value.path == paths[0]     # the image that sets the split's size
  config = folder_config(tmp_path / "odd", preprocess="crop", crop_size=64)
  config.model.num_downs = 6
  with pytest.raises(DataError, match=r"is 40x40 \(WxH\), smaller than the 64x64 crop"):
    next(input_pipeline.create_train_iterator(config))

  for i in range(8, 15):
    save(tmp_path / "wide" / "train" / f"{i:03d}.png", noise(rng, 32, 128))
  save(tmp_path / "wide" / "train" / "zz.png", noise(rng, 64, 128))   # 16 images: 2 batches
  config = folder_config(tmp_path / "wide", preprocess="none")
  with caplog.at_level(logging.WARNING):
    batches = take(config, 2)     # one epoch
  assert all(batch["image_a"].shape == (8, 32, 64, 3) for batch in batches)
  assert any("Epoch 0 of split 'train': 1 image(s) were not 64x32 (WxH)" in r.getMessage()
             for r in caplog.records)


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

  unbroken = take(config, 5)
  resumed = take(config, 2, start_step=3)
  for expected, got in zip(unbroken[3:], resumed):
    np.testing.assert_array_equal(got["real_a"], expected["real_a"])
  np.testing.assert_allclose(unbroken[0]["real_b"], -unbroken[0]["real_a"], atol=1 / 127.5 + 1e-6)
  for epoch in range(2):
    seen = np.concatenate([example_indices(unbroken[2 * epoch + s]) for s in range(2)])
    assert len(set(seen.tolist())) == 16 and set(seen.tolist()) <= set(range(20))

  config.data.cache = "memory"        # from epoch 1 on, the same shuffle of indices alone
  cached = take(config, 5)
  for expected, got in zip(unbroken, cached):
    for key in ("real_a", "index", "epoch"):
      np.testing.assert_array_equal(got[key], expected[key])
  config.data.cache = ""

  config.batch_size = 16
  parts = [example_indices(take(config, 1, process_index=p, process_count=2)[0])
           for p in range(2)]
  assert not set(parts[0].tolist()) & set(parts[1].tolist())

  config.eval.batch_size = 4
  batches = list(input_pipeline.create_eval_iterator(config, process_index=1, process_count=2))
  assert [batch["name"].tolist() for batch in batches] == [["1.jpg", "3.jpg", "5.jpg", ""]]
  assert batches[0]["mask"].tolist() == [True, True, True, False]


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_cache_gives_the_batches_of_an_uncached_run(tmp_path, kind):
  indexed_folder(tmp_path / "data", 20)     # batch 8: 2 steps per epoch, 4 examples left over
  config = folder_config(tmp_path / "data", preprocess="crop", crop_size=32)
  plain = take(config, 7)
  path = str(tmp_path / "cache" / "pairs.npy")
  config.data.cache = "memory" if kind == "memory" else path
  cached = take(config, 7)                  # 3.5 epochs: the cache is read from epoch 1 on
  for expected, got in zip(plain, cached):
    for key in ("real_a", "real_b", "index", "epoch"):
      np.testing.assert_array_equal(got[key], expected[key])
  if kind == "memory":
    return
  assert os.path.exists(path) and not os.path.exists(path + ".partial")
  # The next run reads the file, not the images: garble them, keeping their size and time
  # (the first one is read when the split is opened).
  for name in sorted(os.listdir(tmp_path / "data" / "train"))[1:]:
    image = tmp_path / "data" / "train" / name
    info = os.stat(image)
    image.write_bytes(b"x" * info.st_size)
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns))
  again = take(config, 3, start_step=4)
  for expected, got in zip(plain[4:], again):
    np.testing.assert_array_equal(got["real_a"], expected["real_a"])


def test_a_cache_file_left_half_written_is_made_again(tmp_path, caplog):
  indexed_folder(tmp_path / "data", 20)
  config = folder_config(tmp_path / "data", preprocess="crop", crop_size=32)
  config.data.cache = path = str(tmp_path / "pairs.npy")
  take(config, 1)                           # stopped inside the first epoch
  assert os.path.exists(path + ".partial") and not os.path.exists(path)
  take(config, 4)
  assert os.path.exists(path) and not os.path.exists(path + ".partial")
  # Another dataset under the same path: the key differs, so the file is made again.
  save(tmp_path / "data" / "train" / "999.png", np.zeros((SIZE, 2 * SIZE, 3), np.uint8))
  with caplog.at_level(logging.WARNING):
    take(config, 1)
  assert any("was made from other data" in r.getMessage() for r in caplog.records)
  config.data.cache = ""
  uncached = take(config, 4)
  # The remade cache holds the new image: from epoch 1 on it serves the uncached batches.
  config.data.cache = path
  for expected, got in zip(uncached, take(config, 4)):
    np.testing.assert_array_equal(got["real_a"], expected["real_a"])
  assert os.path.exists(path)


_SERVICE_RUN = """
import itertools, sys
import jax, numpy as np
from configs import default
from p2p_jax import data_service, input_pipeline, train

def take(config, count, **kwargs):
  batches = input_pipeline.create_train_iterator(config, **kwargs)
  return [jax.device_get(batch) for batch in itertools.islice(batches, count)]

dispatcher = data_service.start_dispatcher()
workers = [data_service.start_worker(dispatcher.target) for _ in range(2)]
config = default.get_config("smoke")
plain = take(config, 6)
config.data.service_address = dispatcher.target
served = take(config, 6) + take(config, 2, start_step=4)
for expected, got in zip(plain + plain[4:6], served):
  for key in ("image_a", "image_b", "index", "epoch"):
    np.testing.assert_array_equal(got[key], expected[key])
config.num_train_steps, config.image_every_steps, config.log_every_steps = 2, 0, 1
state = train.train_and_evaluate(config, sys.argv[1])
assert int(state.step) == 2, state.step
assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.generator.params))
print("trained through", dispatcher.target, "with", len(workers), "workers")
"""


def test_the_tf_data_service_gives_the_same_batches_and_trains_through_it(tmp_path):
  """In a process of its own: the service's servers run until their process ends."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", _SERVICE_RUN, str(tmp_path / "run")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trained through grpc://localhost:" in result.stdout
  assert "with 2 workers" in result.stdout


def test_train_batches_keep_one_structure_across_the_cache_and_leave_class_maps_home():
  config = default.get_config("smoke")
  config.data.name, config.data.cache = "labels2facades", "memory"   # a source with class maps
  batches = list(itertools.islice(input_pipeline.create_train_iterator(config), 6))
  structures = {jax.tree.structure(batch) for batch in batches}    # epoch 0 decoded, 1 cached
  assert len(structures) == 1 and set(batches[0]) == {"image_a", "image_b", "index", "epoch"}


def test_a_split_of_mixed_sizes_crosses_at_the_resize_target_resized_once(tmp_path, caplog):
  rng = np.random.default_rng(14)
  sizes = [(32, 48), (40, 40), (64, 32), (36, 60)] * 2
  write_aligned(tmp_path, "train", [noise(rng, h, w) for h, w in sizes],
                [noise(rng, h, w) for h, w in sizes])
  config = folder_config(tmp_path, preprocess="resize_and_crop", load_size=40, crop_size=32)
  with caplog.at_level(logging.WARNING):
    (batch,) = take(config, 1)
  assert batch["image_a"].shape == (8, 40, 40, 3)       # load_size: one resize per image
  assert any("several sizes" in r.getMessage() and "at 40x40" in r.getMessage()
             for r in caplog.records)
  config.data.eval_split = "train"
  assert next(input_pipeline.create_eval_iterator(config))["real_a"].shape == (8, 32, 32, 3)
