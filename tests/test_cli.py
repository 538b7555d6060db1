"""A mistake a user can make is answered in one line naming the field and the fix, and
leaves the workdir as it was; `--traceback` brings the traceback back."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import default
from p2p_jax import cli
from p2p_jax import config_checks
from p2p_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, **environ):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2", **environ)
  return subprocess.run([sys.executable, "-m", "p2p_jax.main", *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, message", [
    ("--config.model.ngff=16",
     "Error: --config.model.ngff=16: config.model has no field 'ngff' (did you mean 'ngf'?)"),
    ("--config.modl.ngf=16",
     "Error: --config.modl.ngf=16: config has no field 'modl' (did you mean 'model'?)"),
    ("--config.batch_size=abc", "Error: flag --config.batch_size=abc: invalid literal for int()"),
])
def test_a_flag_that_does_not_parse_is_one_line(tmp_path, flag, message):
  workdir = tmp_path / "run"
  result = _main("--config=configs/default.py:smoke", f"--workdir={workdir}", flag)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr
  assert not workdir.exists()


def test_a_bad_value_is_one_line_and_writes_nothing_unless_tracebacks_are_asked_for(tmp_path):
  workdir = tmp_path / "run"
  result = _main("--config=configs/default.py:smoke", f"--workdir={workdir}",
                 "--config.model.norm=Batch")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "Error: config.model.norm='Batch' is not one of 'batch', 'instance', 'none' (did you mean "
      "'batch'?). Pass e.g. --config.model.norm=batch.")
  assert "Traceback" not in result.stderr and "oneDNN" not in result.stderr
  assert not workdir.exists()
  again = _main("--config=configs/default.py:smoke", f"--workdir={workdir}",
                "--config.model.norm=Batch", "--traceback")
  assert again.returncode == 1 and "Traceback (most recent call last)" in again.stderr
  assert "validation.ConfigError" in again.stderr


def test_a_bad_environment_setting_is_one_line_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  result = _main("--config=configs/default.py:smoke,bf16", f"--workdir={workdir}",
                 P2P_JAX_CPU_BFLOAT16_UNITS="true")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "Error: P2P_JAX_CPU_BFLOAT16_UNITS='true': set it to 1 (the CPU has bfloat16 units), 0 "
      "(it has none), or unset it to read /proc/cpuinfo.")
  assert "Traceback" not in result.stderr and not workdir.exists()


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, r"config.batch_size=0 must be at least 1, e.g. --config.batch_size=1\."),
    ("batch_size", -8, r"config.batch_size=-8 must be at least 1"),
    ("batch_size", 3, r"config.batch_size=3 does not split evenly over 2 device\(s\).*"
                      r"--config.batch_size=2\."),
    ("optim.learning_rate", 1e30, r"config.optim.learning_rate=1e\+30 must be in \(0, 1\], e.g. "
                                  r"--config.optim.learning_rate=0.0002\."),
    ("optim.learning_rate", float("nan"), r"config.optim.learning_rate=nan must be in \(0, 1\]"),
    ("model.dropout_rate", 1.0, r"config.model.dropout_rate=1.0 must be in \[0, 1\)"),
    ("num_train_steps", 0, r"config.num_train_steps=0 must be -1 or at least 1"),
    ("data.preprocess", "resize_crop", r"config.data.preprocess='resize_crop' is not one of .*"
                                       r"\(did you mean 'resize_and_crop'\?\)"),
    ("data.source", "tfsd", r"config.data.source='tfsd' .*\(did you mean 'tfds'\?\)"),
    ("model.dtype", "bf16", r"config.model.dtype='bf16' is not one of 'float32', 'bfloat16'"),
    ("data.name", "labels2facade", r"config.data.name='labels2facade' .*\(did you mean "
                                   r"'labels2facades'\?\)"),
    ("data.crop_size", 48, r"config.data.crop_size=48 is not a multiple of 2\*\*num_downs=32 "
                           r".*--config.data.crop_size=32\."),
    ("data.load_size", 16, r"config.data.load_size=16 is smaller than config.data.crop_size=32"),
])
def test_every_value_is_checked_with_the_field_and_the_fix(field, value, message):
  config = default.get_config("smoke")
  group, _, leaf = field.rpartition(".")
  (config[group] if group else config)[leaf] = value
  with pytest.raises(validation.ConfigError, match=message):
    config_checks.check_config(config, num_devices=2)


def test_the_defaults_and_every_shipped_config_pass():
  configs_dir = os.path.join(ROOT, "configs")
  for name in sorted(os.listdir(configs_dir)):
    if name.endswith(".py") and name != "__init__.py":
      module = importlib.import_module(f"configs.{name[:-3]}")
      for variant in ("", "smoke"):
        config_checks.check_config(module.get_config(variant), num_devices=1)


def test_override_errors_name_the_flag():
  error = AttributeError("'\\'ngff\\'\\nDid you mean \"ngf\" instead of \"ngff\"?'")
  assert cli.describe_override_error(error, ["prog", "--config.model.ngff=3"]) == (
      "--config.model.ngff=3: config.model has no field 'ngff' (did you mean 'ngf'?)")
