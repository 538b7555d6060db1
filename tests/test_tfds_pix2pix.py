"""The `pix2pix` TFDS builder on small fake tarballs made here; nothing is downloaded."""

import io
import os
import tarfile
import tempfile
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from p2p_jax.datasets import DataError
from p2p_jax.datasets import pix2pix_tfds

_FACADES_SPLITS = {"train": 3, "val": 2, "test": 1}
_DOWNLOAD = "tensorflow_datasets.core.download.DownloadManager.download"


def _pair_pixels(split_index: int, index: int, height: int = 8, width: int = 16) -> np.ndarray:
  """An A|B image: a flat colour on each half, different for every file and side."""
  pixels = np.empty((height, width, 3), np.uint8)
  pixels[:, :width // 2] = (230, 30 + 50 * index, 20 + 70 * split_index)    # A: red-ish
  pixels[:, width // 2:] = (20 + 70 * split_index, 30 + 50 * index, 230)    # B: blue-ish
  return pixels


def _jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # 4:4:4 so that no chroma block straddles the A|B border.
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, subsampling=0)
  return buffer.getvalue()


def _write_tarball(path: str, members: dict[str, bytes]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for member, data in members.items():
      info = tarfile.TarInfo(member)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _facades_members(splits=_FACADES_SPLITS) -> dict[str, bytes]:
  """The official layout, plus files the builder must skip."""
  members = {}
  for split_index, (split, count) in enumerate(splits.items()):
    for index in range(count):
      members[f"facades/{split}/{index + 1}.jpg"] = _jpeg(_pair_pixels(split_index, index))
  members["facades/train/._1.jpg"] = b"macOS resource fork, not an image"
  members["facades/README.txt"] = b"not an image"
  return members


def _decoded_halves(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  half = pixels.shape[1] // 2
  return pixels[:, :half], pixels[:, half:]


@pytest.fixture(scope="module")
def facades(tmp_path_factory):
  """(manual_dir holding facades.tar.gz, {member: jpeg bytes})."""
  manual_dir = str(tmp_path_factory.mktemp("manual"))
  members = _facades_members()
  _write_tarball(os.path.join(manual_dir, "facades.tar.gz"), members)
  return manual_dir, members


@pytest.fixture
def no_network():
  """Any download or GCS access fails the test."""
  def forbidden(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args} {kwargs}")
  with mock.patch(_DOWNLOAD, side_effect=forbidden), \
       mock.patch("tensorflow_datasets.core.download.DownloadManager.download_and_extract",
                  side_effect=forbidden), \
       mock.patch("tensorflow_datasets.core.utils.gcs_utils.exists", side_effect=forbidden), \
       mock.patch("tensorflow_datasets.core.utils.gcs_utils.download_gcs_dataset",
                  side_effect=forbidden):
    yield


# TFDS's own builder checks (registration, info, a full build through the mocked
# download, as_dataset, reload, split disjointness).
class Pix2pixDownloadTest(tfds.testing.DatasetBuilderTestCase):
  """The download path, with `download` mocked to return the fake tarball."""

  DATASET_CLASS = pix2pix_tfds.Pix2pix
  BUILDER_CONFIG_NAMES_TO_TEST = ["facades"]
  SPLITS = _FACADES_SPLITS
  DL_DOWNLOAD_RESULT = "download/facades.tar.gz"
  SKIP_CHECKSUMS = True    # the official server publishes no checksums

  @classmethod
  def setUpClass(cls):
    cls._example_dir = tempfile.TemporaryDirectory()
    cls.EXAMPLE_DIR = cls._example_dir.name
    cls._reachable = mock.patch.object(pix2pix_tfds, "_check_reachable")   # no network here
    cls._reachable.start()
    _write_tarball(os.path.join(cls.EXAMPLE_DIR, cls.DL_DOWNLOAD_RESULT), _facades_members())
    super().setUpClass()

  @classmethod
  def tearDownClass(cls):
    super().tearDownClass()
    cls._reachable.stop()
    cls._example_dir.cleanup()


def test_tfds_load_uses_the_manual_tarball_without_downloading(facades, tmp_path, no_network):
  manual_dir, members = facades
  datasets, info = tfds.load(
      "pix2pix/facades", data_dir=str(tmp_path), try_gcs=False, with_info=True,
      download_and_prepare_kwargs={
          "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)})
  assert {name: split.num_examples for name, split in info.splits.items()} == _FACADES_SPLITS
  assert set(info.features) == {"image_a", "image_b", "file_name"}
  assert info.features["image_a"].shape == (None, None, 3)
  assert info.features["image_a"].dtype == np.uint8
  for split, count in _FACADES_SPLITS.items():
    examples = list(tfds.as_numpy(datasets[split]))
    assert sorted(ex["file_name"].decode() for ex in examples) == [
        f"{index + 1}.jpg" for index in range(count)]
    for example in examples:
      data = members[f"facades/{split}/{example['file_name'].decode()}"]
      left, right = _decoded_halves(data)
      # Exactly the decoded halves of the file, stored losslessly ...
      np.testing.assert_array_equal(example["image_a"], left)
      np.testing.assert_array_equal(example["image_b"], right)
      # ... and A is the left (red) half, B the right (blue) one.
      assert example["image_a"].shape == example["image_b"].shape == (8, 8, 3)
      assert example["image_a"][..., 0].min() > 200 and example["image_a"][..., 2].max() < 180
      assert example["image_b"][..., 2].min() > 200 and example["image_b"][..., 0].max() < 180


def test_load_split_builds_once_and_slices(facades, tmp_path, no_network):
  manual_dir, _ = facades
  val = list(tfds.as_numpy(pix2pix_tfds.load_split(
      "facades", "val", str(tmp_path), manual_dir=manual_dir)))
  assert sorted(ex["file_name"].decode() for ex in val) == ["1.jpg", "2.jpg"]
  assert all(ex["image_a"].dtype == np.uint8 and ex["image_a"].shape == (8, 8, 3) for ex in val)
  # Built already: a second call reads it back, with no manual dir at all.
  first_train = list(pix2pix_tfds.load_split("facades", "train[:1]", str(tmp_path)))
  assert len(first_train) == 1
  assert set(first_train[0]) == {"image_a", "image_b", "file_name"}


def test_cloud_storage_is_not_consulted_even_where_enabled(facades, tmp_path, no_network):
  manual_dir, _ = facades
  with mock.patch("tensorflow_datasets.core.utils.gcs_utils._is_gcs_disabled", False):
    examples = list(pix2pix_tfds.load_split("facades", "test", str(tmp_path),
                                            manual_dir=manual_dir))
  assert len(examples) == 1


def test_split_names_and_bad_names():
  assert pix2pix_tfds.split_names("facades") == ("train", "val", "test")
  assert pix2pix_tfds.split_names("night2day") == ("train", "val", "test")
  for name in ("cityscapes", "maps", "edges2shoes", "edges2handbags"):
    assert pix2pix_tfds.split_names(name) == ("train", "val")
  with pytest.raises(DataError, match=r"no dataset 'facade'.*facades, cityscapes"):
    pix2pix_tfds.split_names("facade")
  with pytest.raises(DataError, match=r"pix2pix/maps: has no split 'test'.*train, val"):
    pix2pix_tfds.load_split("maps", "test", None)


def test_configs_describe_their_halves(tmp_path):
  builder = pix2pix_tfds.Pix2pix(config="facades", data_dir=str(tmp_path))
  assert [config.name for config in builder.BUILDER_CONFIGS] == [
      "facades", "cityscapes", "maps", "edges2shoes", "edges2handbags", "night2day"]
  assert "BtoA" in builder.info.description and "label map" in builder.info.description
  assert "Isola" in builder.info.citation and builder.info.homepage
  assert builder.builder_config.url == (
      "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/facades.tar.gz")
  for config in builder.BUILDER_CONFIGS:
    assert "image_a (left half)" in config.description
    assert "AtoB" in config.description or "BtoA" in config.description


def test_failed_download_says_where_to_put_the_tarball(tmp_path):
  manual_dir = tmp_path / "manual"
  with mock.patch(_DOWNLOAD, side_effect=ConnectionError("Network is unreachable")), \
       mock.patch.object(pix2pix_tfds, "_check_reachable"):
    with pytest.raises(DataError) as raised:
      pix2pix_tfds.load_split("maps", "val", str(tmp_path / "data"), manual_dir=str(manual_dir))
  message = str(raised.value)
  assert raised.value.path == str(manual_dir / "maps.tar.gz")
  assert message.startswith(f"{manual_dir / 'maps.tar.gz'}: not found")
  assert "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/maps.tar.gz" in message
  assert "Network is unreachable" in message and "--manual_dir" in message


def test_an_unreachable_server_fails_at_once_naming_the_manual_dir_and_smoke(tmp_path,
                                                                              monkeypatch):
  """No retries for minutes: a server that refuses (a closed local port) is an error now."""
  for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(pix2pix_tfds, "_URL_TEMPLATE", "http://127.0.0.1:9/{name}.tar.gz")
  with mock.patch(_DOWNLOAD, side_effect=AssertionError("the download was tried")):
    with pytest.raises(DataError) as raised:
      pix2pix_tfds.load_split("facades", "train", str(tmp_path / "data"),
                              manual_dir=str(tmp_path / "manual"))
  message = str(raised.value)
  assert "ConnectionRefusedError" in message
  assert "--config.data.tfds_manual_dir=DIR" in message and ":smoke" in message


@pytest.mark.parametrize("data, error", [
    (_jpeg(np.zeros((8, 15, 3), np.uint8)), r"is 15x8 \(WxH\), an odd width"),
    (_jpeg(np.zeros((8, 16, 3), np.uint8))[:40], r"is not a readable image"),
], ids=["odd_width", "truncated"])
def test_bad_image_error_names_the_file(tmp_path, no_network, data, error):
  members = _facades_members()
  members["facades/val/2.jpg"] = data
  _write_tarball(str(tmp_path / "manual" / "facades.tar.gz"), members)
  with pytest.raises(DataError, match=r"^facades/val/2\.jpg \(in .*/manual/facades\.tar\.gz\): "
                     + error):
    pix2pix_tfds.load_split("facades", "val", str(tmp_path / "data"),
                            manual_dir=str(tmp_path / "manual"))


def test_tarball_without_a_split_folder_is_refused(tmp_path, no_network):
  members = _facades_members({"train": 1, "val": 1})    # no facades/test/
  tarball = _write_tarball(str(tmp_path / "manual" / "facades.tar.gz"), members)
  with pytest.raises(DataError, match=r"holds no images under facades/test/"):
    pix2pix_tfds.load_split("facades", "test", str(tmp_path / "data"),
                            manual_dir=os.path.dirname(tarball))


def test_build_command(facades, tmp_path, no_network):
  """`python -m p2p_jax.datasets.pix2pix_tfds` parses and runs `tfds build`'s arguments."""
  manual_dir, _ = facades
  pix2pix_tfds.main(["pix2pix/facades", f"--data_dir={tmp_path}", f"--manual_dir={manual_dir}"])
  builder = tfds.builder("pix2pix/facades", data_dir=str(tmp_path), try_gcs=False)
  assert builder.is_prepared()
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == (
      _FACADES_SPLITS)
