"""The benchmark runs the real pmapped step and reports what the speed work relies on."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from p2p_jax import bench
from p2p_jax import devices
from p2p_jax import hardware
from p2p_jax import step as step_lib
from p2p_jax.ops import choose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIELDS = ("sec_per_step_median", "images_per_sec", "compile_s", "flops_per_step",
           "gflops_per_sec", "matmul_gflops_per_sec", "model_flops_per_step",
           "model_gflops_per_sec", "mfu", "peak_gflops_per_sec", "peak_source", "forms",
           "params_generator", "params_discriminator", "batch_size", "image_size", "devices",
           "backend", "peak_rss_mb", "page_faults_per_step", "malloc", "device_memory_in_use_mb",
           "peak_device_memory_mb", "optimizer_sec", "donated")


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
  # Model FLOPs from the layer shapes (per device, times the 8 devices) and MFU against the
  # CPU's measured matmul rate; the forms `auto` ran on this CPU.
  layers = step_lib.trace_layers(_smoke_config(), per_device_batch=1)
  assert result["model_flops_per_step"] == 8 * step_lib.model_flops(layers)
  assert result["model_gflops_per_sec"] == pytest.approx(
      result["model_flops_per_step"] / result["sec_per_step_median"] / 1e9)
  assert result["peak_gflops_per_sec"] == result["matmul_gflops_per_sec"]
  assert result["mfu"] == pytest.approx(
      result["model_gflops_per_sec"] / result["peak_gflops_per_sec"])
  assert "measured in this run" in result["peak_source"]
  assert result["forms"] == step_lib.describe_forms(layers)
  assert result["peak_device_memory_mb"] is None     # the CPU backend keeps no such count
  assert result["page_faults_per_step"] >= 0
  assert result["malloc"] == hardware.freed_memory_policy   # None: imported, not run as a program
  assert result["optimizer_sec"] > 0
  assert result["donated"] is False               # as training on CPUs: step.donates_state


def test_the_optimizer_timing_runs_the_steps_adam_on_every_device():
  state = step_lib.create_train_state(jax.random.key(0), _smoke_config(), steps_per_epoch=1e9)
  expected = {}
  for name, tx in (("generator", state.settings.gen_tx),
                   ("discriminator", state.settings.disc_tx)):
    net = getattr(state, name)
    grads = jax.tree.map(lambda p: np.full(p.shape, 1e-3, p.dtype), net.params)
    for _ in range(3):          # the compiling update and the two timed ones
      net = net.apply_gradients(grads, net.batch_stats, tx)
    expected[name] = net
  replicated, donated = devices.replicate(state), devices.replicate(state)
  seconds, gen, disc = bench.time_optimizer(replicated, repeats=2)
  assert seconds > 0
  # Undonated on these CPUs, as the step (step.donates_state): the state given stays readable.
  first = jax.tree.leaves(replicated.generator.params)[0]
  np.testing.assert_array_equal(first[0], jax.tree.leaves(state.generator.params)[0])
  _, donated_gen, _ = bench.time_optimizer(donated, repeats=2, donate=True)
  assert jax.tree.leaves(donated.generator.params)[0].is_deleted()
  jax.tree.map(np.testing.assert_array_equal, donated_gen.params, gen.params)
  for name, net in (("generator", gen), ("discriminator", disc)):
    want = expected[name]
    assert not np.allclose(jax.tree.leaves(want.params)[0],
                           jax.tree.leaves(getattr(state, name).params)[0])
    for replica in range(8):
      got = jax.tree.map(lambda x: x[replica], net)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                   got.params, want.params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12),
                   got.opt_state, want.opt_state)


def test_forms_of_the_layers_count_the_same_parameters():
  auto = bench.run(_smoke_config(), steps=1, warmup=0)
  xla = bench.run(_smoke_config(conv_impl="xla", upconv_impl="subpixel"), steps=1, warmup=0,
                  donate=True)
  assert xla["donated"] is True        # read from the compiled program's input/output aliases
  assert (auto["params_generator"], auto["params_discriminator"]) == (
      xla["params_generator"], xla["params_discriminator"])
  assert auto["conv_impl"] == "auto" and xla["conv_impl"] == "xla"


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
  config = _smoke_config()
  config.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 does not split evenly over 8 device"):
    bench.run(config, steps=1)


def test_cli_prints_one_json_object_last_in_the_pipeline_and_loop_modes(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  # (step mode's command line: test_step_mode_runs_where_only_jax_is_installed)
  for mode, extra in (("pipeline", []),
                      ("loop", ["--config.batch_size=2", "--config.data.cache=memory"])):
    out = subprocess.run(
        [sys.executable, "-m", "p2p_jax.bench", "--config=configs/edges2shoes.py:smoke",
         f"--mode={mode}", "--steps=2", "--warmup=0", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mode"] == mode
    if mode == "pipeline":
      assert result["source"] == "synthetic" and result["batches"] == 2
      assert result["pairs_per_sec"] > 0 and result["decode_only_pairs_per_sec"] > 0
      assert result["fraction_of_decode_only"] == pytest.approx(
          result["pairs_per_sec"] / result["decode_only_pairs_per_sec"])
      assert result["pairs_per_sec_per_core"] * result["cores"] == pytest.approx(
          result["pairs_per_sec"])
      assert len(result["rounds"]["pipeline"]) == 2
    else:
      assert result["devices"] == 2 and result["cache"] == "memory"
      assert 0 < result["sec_per_step_alone"] and 0 < result["sec_per_step_loop"]
      # Run as a program of the package: the malloc policy was settled at its import.
      assert "glibc" in result["malloc"], result["malloc"]
      assert result["waiting_fraction"] == pytest.approx(
          max(0.0, 1 - result["sec_per_step_alone"] / result["sec_per_step_loop"]))


@pytest.mark.parametrize("device_kind,name,bf16,fp32", [
    ("NVIDIA H200", "NVIDIA H200", 989.4, 494.7),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.4, 494.7),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.0, 378.0),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312.0, 156.0),
    ("TPU v4", "TPU v4", 275.0, 275.0),
    ("TPU v5 lite", "TPU v5e", 197.0, 197.0),
    ("TPU v5p", "TPU v5p", 459.0, 459.0),
    ("TPU v6 lite", "TPU v6e", 918.0, 918.0),
])
def test_vendor_peaks_are_found_by_device_kind(device_kind, name, bf16, fp32):
  peak = hardware.vendor_peak(device_kind)
  assert (peak.name, peak.bfloat16_tflops, peak.float32_tflops) == (name, bf16, fp32)
  assert hardware.peak_flops(peak, "bfloat16") == bf16 * 1e12
  assert hardware.peak_flops(peak, "float32") == fp32 * 1e12
  assert peak.source
  assert hardware.vendor_peak("cpu") is None


_BLOCKER = """
import sys
class Blocker:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu", "PIL"):
      raise ImportError(f"{name} is not installed on this accelerator host")
sys.meta_path.insert(0, Blocker())
import runpy
sys.argv = ["p2p_jax.bench"] + sys.argv[1:]
runpy.run_module("p2p_jax.bench", run_name="__main__", alter_sys=True)
"""


def test_step_mode_runs_where_only_jax_is_installed():
  """Neither TensorFlow, TFDS, clu nor PIL is imported by the step benchmark."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)                    # one CPU device
  out = subprocess.run(
      [sys.executable, "-c", _BLOCKER, "--config=configs/default.py:smoke",
       "--config.batch_size=1", "--steps=1", "--warmup=0", "--donate=yes"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["mode"] == "step" and set(_FIELDS) <= set(result) and result["devices"] == 1
  assert result["donated"] is True and "state donated" in out.stderr   # --donate=yes on a CPU


def test_the_accelerator_check_runs_in_its_smoke_mode():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", ACCEL_CHECK_SMOKE="1",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)                    # one CPU device, as one accelerator
  out = subprocess.run([os.path.join(ROOT, "launch", "accelerator_check.sh")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["mode"] == "check" and result["smoke"] and not result["failures"]
  runs = {(run["batch_size"], run["dtype"], run["forms_name"]) for run in result["runs"]}
  assert runs == {(batch, dtype, forms) for batch in (1,) for dtype in ("float32", "bfloat16")
                  for forms in ("by_shape", "xla")}
  assert all(run["images_per_sec"] > 0 and 0 < run["mfu"] for run in result["runs"])
  assert result["training"]["steps"] == 10 and result["auto_is"] == "by_shape"
  assert all(np.isfinite(list(result["training"]["final_losses"].values())))


@pytest.mark.parametrize("units", [False, True])
def test_layers_mode_times_each_distinct_layer_in_every_form(monkeypatch, units):
  """Each distinct layer once, in every candidate form, the chosen one among them; in
  bfloat16 on a CPU with bfloat16 units the chosen forms are dots, or float32 (timed
  beside them for every layer) for the innermost levels."""
  monkeypatch.setattr(hardware, "cpu_bfloat16_units", lambda: units)
  config = _smoke_config()
  config.model.num_downs = 3
  config.model.n_layers_d = 1
  config.model.dtype = "bfloat16"
  result = bench.run_layers(config, repeats=1)
  traced = step_lib.trace_layers(bench._with(config, batch_size=8, conv_impl="by_shape",
                                             upconv_impl="by_shape"), 1)
  distinct = {(layer.kind, layer.x_shape, layer.kernel_shape, layer.stride)
              for layers in traced.values() for layer in layers}
  rows = result["layers"]
  assert {(row["kind"], tuple(row["x_shape"]), tuple(row["kernel_shape"]), row["stride"])
          for row in rows} == distinct and len(rows) == len(distinct)
  for row in rows:
    assert row["dtype"] == "bfloat16" and row["chosen"] in row["ms"]
    assert row["ms"][row["fastest"]] == min(row["ms"].values())
    assert row["chosen_over_fastest"] >= 1 and len(row["ms"]) >= 3
  assert result["chosen_ms"] >= result["fastest_ms"] > 0
  assert result["cpu_bfloat16_units"] is units and result["peak_rss_mb"] > 0
  for row in rows:
    if units:
      assert row["chosen"] in ("matmul", "taps", "nested", "cols", "kernel_major", "float32")
      assert "float32" in row["ms"]
      assert (row["chosen"] == "float32") is choose.in_float32(
          row["kind"], row["x_shape"], row["stride"], "bfloat16"), row
    else:                 # bfloat16 without the units keeps float32's rules
      assert row["chosen"] == (
          choose.conv_form(row["x_shape"], row["kernel_shape"], row["stride"], "float32")
          if row["kind"] == "conv4x4"
          else choose.conv_transpose_form(row["x_shape"], row["kernel_shape"][3], "float32"))
      assert "float32" not in row["ms"]
  # The smoke U-Net's innermost levels (a few pixels) run in float32 where there are units.
  assert any(row["chosen"] == "float32" for row in rows) is units


class _FakeLibc:
  def __init__(self, accepts=True):
    self.calls, self.accepts = [], accepts

  def mallopt(self, option, value):
    self.calls.append((option, value))
    return 1 if self.accepts else 0


@pytest.fixture
def malloc_host(monkeypatch):
  """A CPU-only Linux host with glibc, no malloc settings in the environment, and a libc
  that records what it is asked (the test process's own malloc is left alone)."""
  libc = _FakeLibc()
  monkeypatch.setattr(hardware.ctypes, "CDLL", lambda name: libc)
  monkeypatch.setattr(hardware.sys, "platform", "linux")
  monkeypatch.setattr(hardware.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
  for name in (hardware.KEEP_MEMORY_ENV,) + hardware._GLIBC_MALLOC_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(hardware, "freed_memory_policy", None)
  return libc


def test_glibc_keeps_freed_memory_on_a_cpu_only_host(malloc_host):
  said = hardware.keep_freed_memory()
  assert said.startswith("glibc keeps freed memory") and hardware.freed_memory_policy == said
  # One arena, no mmap, a 2 GiB trim threshold: mallopt's M_ARENA_MAX, M_MMAP_MAX and
  # M_TRIM_THRESHOLD.
  assert sorted(malloc_host.calls) == [(-8, 1), (-4, 0), (-1, 2 ** 31 - 1)]


@pytest.mark.parametrize("env,plugin,expected", [
    ({hardware.KEEP_MEMORY_ENV: "0"}, False, "glibc's defaults (P2P_JAX_KEEP_FREED_MEMORY=0)"),
    ({hardware.KEEP_MEMORY_ENV: "yes"}, False, "P2P_JAX_KEEP_FREED_MEMORY='yes' is not 0 or 1"),
    ({"MALLOC_ARENA_MAX": "4"}, False, "glibc's malloc as the environment sets it"),
    ({}, True, "glibc's defaults (an accelerator plugin is installed)"),
])
def test_an_explicit_setting_or_an_accelerator_leaves_malloc_alone(malloc_host, monkeypatch, env,
                                                                  plugin, expected):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  if plugin:
    monkeypatch.setattr(hardware.importlib.util, "find_spec",
                        lambda name: object() if name == "jax_cuda12_plugin" else None)
  assert hardware.keep_freed_memory().startswith(expected)
  assert malloc_host.calls == []


def test_the_policy_can_be_asked_for_beside_an_accelerator_plugin(malloc_host, monkeypatch):
  monkeypatch.setenv(hardware.KEEP_MEMORY_ENV, "1")
  monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: object())
  assert hardware.keep_freed_memory().startswith("glibc keeps freed memory")
  assert len(malloc_host.calls) == 3


def test_a_refused_mallopt_or_another_libc_keeps_the_defaults(malloc_host, monkeypatch):
  malloc_host.accepts = False
  assert hardware.keep_freed_memory() == "glibc refused mallopt: its defaults kept"
  monkeypatch.setattr(hardware.platform, "libc_ver", lambda: ("", ""))   # musl, macOS
  malloc_host.calls.clear()
  assert hardware.keep_freed_memory() == "not glibc: its defaults kept"
  assert malloc_host.calls == []
