"""`python -m p2p_jax.export`: each format, loaded with its own runtime, translates real
images as `predict` does, at batch 1 and 3 and at a non-square size."""

import builtins
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from p2p_jax import evaluate
from p2p_jax import export
from p2p_jax import images as images_lib
from p2p_jax import predict
from p2p_jax import step as step_lib
from p2p_jax import train
from p2p_jax.validation import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "tests", "data", "photos")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A smoke run (32x32, a 5-level U-Net) of a few steps: running statistics that moved."""
  path = str(tmp_path_factory.mktemp("trained"))
  config = default.get_config("smoke")
  config.image_every_steps = 0
  config.num_train_steps = 3
  train.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope="module")
def state(workdir):
  return evaluate.restore_state(workdir)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  """`exported(fmt)`: (path, record) of one artifact per format, written on first use and
  shared by the tests that read it."""
  made = {}

  def get(fmt):
    if fmt not in made:
      output = str(tmp_path_factory.mktemp(fmt) / "1")     # TF Serving's version layout
      made[fmt] = output, export.export(workdir, fmt, output, platforms=("cpu",))
    return made[fmt]
  return get


def _photos(height, width, count):
  """uint8 [count, height, width, 3]: the test photos, resized."""
  names = sorted(os.listdir(PHOTOS))
  names = [name for name in names if name.endswith(".jpg")][:count]
  return np.stack([images_lib.resize(np.asarray(Image.open(os.path.join(PHOTOS, name))
                                                .convert("RGB")), (height, width))
                   for name in names])


def _as_float(pixels):
  return np.stack([images_lib.to_float(image, 3) for image in pixels])


def _predicted(state, real_a, deterministic=False):
  return np.asarray(evaluate.translate_images(state, real_a, None, deterministic=deterministic,
                                              dropout=False))


def test_each_image_with_its_own_statistics_is_the_image_alone_as_a_batch_of_one(state):
  real_a = _as_float(_photos(32, 32, 3))
  together = step_lib.eval_step(state, real_a, None, dropout=False)
  generator = state.settings.generator.clone(bn_axis_name=None)
  alone = [generator.apply(state.generator.variables(), image[None], deterministic=True)[0]
           for image in real_a]
  np.testing.assert_allclose(together, np.stack(alone), atol=1e-5)
  # ... and not the running statistics
  assert np.abs(together - step_lib.eval_step(state, real_a, None, deterministic=True)).max() > 1e-2


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_an_artifact_translates_as_predict_at_batch_1_and_3_and_a_non_square_size(
    fmt, exported, state):
  levels = {name: logging.getLogger(name).level for name in ("", "absl")}
  output, record = exported(fmt)
  # The converters leave the caller's logging as it was (TensorFlow's SavedModel code sets
  # absl's logger to WARNING, which hid every later INFO line).
  assert {name: logging.getLogger(name).level for name in levels} == levels
  translate = export.LOADERS[fmt](output)
  square, tall = _as_float(_photos(32, 32, 3)), _as_float(_photos(64, 32, 1))
  for real_a in (square, square[:1], tall):
    np.testing.assert_allclose(translate(real_a), _predicted(state, real_a), atol=TOLERANCE,
                               err_msg=f"{fmt} at {real_a.shape}")
  with open(export.metadata_path(output)) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(record))
  assert saved["format"] == fmt and saved["step"] == 3 and saved["test_mode"] == "paper"
  assert saved["image_size"] == "any" and saved["input"]["height"] == "any multiple of 32"
  assert saved["config"]["model"]["num_downs"] == 5
  assert saved["verified_max_difference"] <= TOLERANCE
  assert not os.path.exists(output + ".partial")


def test_the_savedmodel_uint8_signature_is_predict_to_one_level(workdir, exported, tmp_path):
  output, _ = exported("savedmodel")
  pixels = _photos(32, 32, 3)
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  files = []
  for index, image in enumerate(pixels):
    Image.fromarray(image).save(inputs / f"{index}.png")
    files.append((str(inputs / f"{index}.png"), f"{index}.png"))
  predicted = np.stack([out for _, out in predict.translate_files(workdir, files, dropout=False)])
  served = export.load_savedmodel(output, "uint8")(pixels)
  assert served.dtype == np.uint8 and served.shape == pixels.shape
  assert np.abs(served.astype(int) - predicted.astype(int)).max() <= 1


def test_deterministic_export_uses_the_running_statistics(workdir, state, tmp_path):
  output = str(tmp_path / "running.jax")
  record = export.export(workdir, "stablehlo", output, deterministic=True, platforms=("cpu",))
  assert record["test_mode"] == "deterministic" and record["batch_norm"] == "running statistics"
  real_a = _as_float(_photos(32, 32, 3))
  got = export.load_stablehlo(output)(real_a)
  np.testing.assert_allclose(got, _predicted(state, real_a, deterministic=True), atol=TOLERANCE)
  assert np.abs(got - _predicted(state, real_a)).max() > 1e-2


def test_a_fixed_batch_and_size_are_the_artifacts_only_shape(workdir, tmp_path):
  output = str(tmp_path / "fixed.jax")
  record = export.export(workdir, "stablehlo", output, batch=2, size="32x64",
                         platforms=("cpu", "cuda", "tpu"))
  assert record["image_size"] == [32, 64] and record["platforms"] == ["cpu", "cuda", "tpu"]
  with open(output, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.in_avals[0].shape == (2, 32, 64, 3)
  assert exported.platforms == ("cpu", "cuda", "tpu")
  with pytest.raises(Exception, match="shape"):
    exported.call(np.zeros((1, 32, 64, 3), np.float32))


def test_bad_requests_are_clear_errors_and_leave_nothing(workdir, tmp_path, monkeypatch):
  output = str(tmp_path / "model")
  with pytest.raises(UsageError, match="multiples of 32.*--size"):
    export.export(workdir, "stablehlo", output, size="100")
  with pytest.raises(UsageError, match="not 'any', N or HxW"):
    export.export(workdir, "stablehlo", output, size="big")
  with pytest.raises(UsageError, match="'tflite' is not one of stablehlo, savedmodel, onnx"):
    export.export(workdir, "tflite", output)
  with pytest.raises(UsageError, match="--platforms: gpu"):
    export.export(workdir, "stablehlo", output, platforms=("gpu",))
  empty = tmp_path / "no_run"
  empty.mkdir()
  with pytest.raises(Exception, match=str(empty)):
    export.export(str(empty), "stablehlo", output)

  real_import = builtins.__import__

  def without_jax2onnx(name, *args, **kwargs):
    if name.startswith("jax2onnx"):
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", without_jax2onnx)
  with pytest.raises(UsageError, match="needs jax2onnx.*requirements-export.txt"):
    export.export(workdir, "onnx", output)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["no_run"]

  (tmp_path / "taken.onnx").write_bytes(b"keep me")
  with pytest.raises(UsageError, match="exists: pass --overwrite"):
    export.export(workdir, "onnx", str(tmp_path / "taken.onnx"))
  assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"


def test_the_command_names_the_formats_for_an_unknown_one(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, "-m", "p2p_jax.export", f"--workdir={tmp_path}", "--format=tflite",
       f"--output={tmp_path / 'model'}"], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2
  assert "--format" in result.stderr and "stablehlo" in result.stderr
