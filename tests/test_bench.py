"""The benchmark runs the real pmapped step and reports what the speed work relies on."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from p2p_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIELDS = ("sec_per_step_median", "images_per_sec", "compile_s", "flops_per_step",
           "gflops_per_sec", "matmul_gflops_per_sec", "params_generator",
           "params_discriminator", "batch_size", "image_size", "devices", "backend",
           "peak_rss_mb")


def _smoke_config(**overrides):
  config = default.get_config("smoke")
  config.batch_size = 8                      # one image per simulated device
  for key, value in overrides.items():
    config.model[key] = value
  return config


def test_step_mode_reports_every_field_from_the_real_step():
  result = bench.run(_smoke_config(), steps=2, warmup=1)
  assert set(_FIELDS) <= set(result)
  assert result["devices"] == 8 and result["backend"] == "cpu"
  assert result["batch_size"] == 8 and result["image_size"] == 32
  assert len(result["step_times"]) == 2
  assert result["sec_per_step_median"] == pytest.approx(np.median(result["step_times"]))
  assert result["images_per_sec"] == pytest.approx(8 / result["sec_per_step_median"])
  # Parameter counts of the smoke-sized networks, as the models report them.
  assert result["params_generator"] > result["params_discriminator"] > 0
  # XLA counts the convolutions' FLOPs: at least the generator's forward pass over the batch
  # (2 FLOPs per multiply-add, 16 taps per output pixel of its first convolution alone).
  first_conv = 2 * 8 * 16 * 16 * 16 * 3 * 8
  assert result["flops_per_step"] > first_conv
  assert result["gflops_per_sec"] == pytest.approx(
      result["flops_per_step"] / result["sec_per_step_median"] / 1e9)
  assert result["matmul_gflops_per_sec"] > 0
  assert all(np.isfinite(list(result["losses"].values())))


def test_forms_of_the_layers_count_the_same_parameters():
  auto = bench.run(_smoke_config(), steps=1, warmup=0)
  xla = bench.run(_smoke_config(conv_impl="xla", upconv_impl="subpixel"), steps=1, warmup=0)
  assert (auto["params_generator"], auto["params_discriminator"]) == (
      xla["params_generator"], xla["params_discriminator"])
  assert auto["conv_impl"] == "auto" and xla["conv_impl"] == "xla"


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
  config = _smoke_config()
  config.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 does not split evenly over 8 device"):
    bench.run(config, steps=1)


def test_cli_prints_one_json_object_last_in_both_modes(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  for mode, extra in (("step", ["--config.batch_size=2"]), ("pipeline", [])):
    out = subprocess.run(
        [sys.executable, "-m", "p2p_jax.bench", "--config=configs/edges2shoes.py:smoke",
         f"--mode={mode}", "--steps=2", "--warmup=0", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mode"] == mode and result["images_per_sec"] > 0
    if mode == "step":
      assert set(_FIELDS) <= set(result) and result["devices"] == 2
    else:
      assert result["source"] == "synthetic" and result["batches"] == 2
