"""The commands users run, end to end on the synthetic data at `:smoke` size:
train, kill and resume, SIGTERM, NaN stop, eval on another device count, predict."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from configs import default
from p2p_jax import checkpoints
from p2p_jax import evaluate
from p2p_jax import monitoring
from p2p_jax import step as step_lib
from p2p_jax import train
from p2p_jax import validation
from p2p_jax import workdir as workdir_lib
from tests import damage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_config(**overrides):
  config = default.get_config("smoke")
  config.image_every_steps = 0
  for key, value in overrides.items():
    group, _, leaf = key.partition("__")
    if leaf:
      config[group][leaf] = value
    else:
      config[group] = value
  return config


def _command(module, *args, devices=8):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return [sys.executable, "-m", module, *args], env


def _run(module, *args, devices=8, timeout=300):
  cmd, env = _command(module, *args, devices=devices)
  result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _params(state):
  return jax.tree.leaves((state.generator.params, state.discriminator.params,
                          state.generator.batch_stats, state.discriminator.opt_state))


class _RecordingWriter(metric_writers.MetricWriter):
  """Keeps what the loop writes, so tests can read it back."""

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)

  def write_images(self, step, images):
    self.images.setdefault(step, {}).update({k: np.asarray(v) for k, v in images.items()})

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_videos(self, step, videos):
    pass

  def flush(self):
    pass

  def close(self):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 40-step smoke run on 8 devices, trained in this process without interruption."""
  workdir = str(tmp_path_factory.mktemp("unbroken"))
  writer = _RecordingWriter()
  config = _smoke_config(num_train_steps=40, log_every_steps=10, image_every_steps=20,
                         eval_every_steps=20, checkpoint_every_steps=20)
  state = train.train_and_evaluate(config, workdir, writer=writer)
  return workdir, state, writer


def test_training_writes_config_checkpoints_and_summaries(trained):
  workdir, state, writer = trained
  assert int(state.step) == 40
  assert sorted(writer.scalars[10]) == ["train/D_fake", "train/D_real", "train/G_GAN",
                                        "train/G_L1", "train/learning_rate"]
  assert writer.scalars[40]["train/G_L1"] < writer.scalars[10]["train/G_L1"]
  assert {"val/l1", "val/psnr", "val/ssim"} <= set(writer.scalars[20])
  grid = writer.images[20]["samples/input_output_target"]
  assert grid.shape == (1, 4 * 32, 3 * 32, 3) and 0 <= grid.min() and grid.max() <= 1
  saved = workdir_lib.load_config(workdir)
  assert saved.model.ngf == 8 and saved.num_train_steps == 40
  assert os.path.exists(os.path.join(workdir, "config.yaml"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))   # released


def test_killed_run_resumes_to_the_same_result(trained, tmp_path):
  """SIGKILL mid-run (possibly mid-save), restart, finish: equal to the unbroken run."""
  _, unbroken, _ = trained
  workdir = str(tmp_path / "killed")
  args = ["--config=configs/default.py:smoke", f"--workdir={workdir}",
          "--config.num_train_steps=40", "--config.image_every_steps=0"]
  cmd, env = _command("p2p_jax.main", *args)
  process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  marker = os.path.join(workdir, "checkpoints", "6")
  deadline = time.time() + 240
  while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  steps = checkpoints.Checkpointer(workdir, read_only=True).all_steps()
  assert steps and max(steps) < 40, f"the run was not interrupted: {steps}"

  resumed = train.train_and_evaluate(
      _smoke_config(num_train_steps=40, log_every_steps=10, image_every_steps=20,
                    eval_every_steps=20), workdir, writer=_RecordingWriter())
  assert int(resumed.step) == 40
  for a, b in zip(_params(resumed), _params(unbroken)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "term")
  cmd, env = _command("p2p_jax.main", "--config=configs/default.py:smoke", f"--workdir={workdir}",
                      "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
                      "--config.image_every_steps=0", "--config.log_every_steps=1")
  process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  for line in process.stderr:
    if "train/G_L1" in line:
      break
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-3000:]
  assert "Stop requested" in err
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))  # TensorBoard
  steps = checkpoints.Checkpointer(workdir, read_only=True).all_steps()
  assert len(steps) == 1 and 0 < steps[0] < 100000


@pytest.mark.parametrize("fault", ["nan", "diverged"])
def test_a_bad_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                      fault):
  real_step = step_lib.pmap_train_step
  factor = np.nan if fault == "nan" else 1e6     # 1e6: finite, and past config.max_loss

  def poisoned(*args, **kwargs):
    """The real step, whose third update goes wrong: its state and losses are scaled."""
    compiled, calls = real_step(*args, **kwargs), []
    def run(state, batch, rng):
      calls.append(None)
      state, metrics = compiled(state, batch, rng)
      if len(calls) == 3:
        state, metrics = jax.tree.map(lambda x: x * factor if x.dtype.kind == "f" else x,
                                      (state, metrics))
      return state, metrics
    return run
  monkeypatch.setattr(step_lib, "pmap_train_step", poisoned)
  workdir = str(tmp_path / fault)
  config = _smoke_config(num_train_steps=8, log_every_steps=4, checkpoint_every_steps=2)
  error_type, message = ((monitoring.NonFiniteLossError, r"step 3: .*G_L1=nan") if fault == "nan"
                         else (monitoring.DivergedLossError,
                               r"above config.max_loss=10000 at step 3: .*G_L1=\d"))
  with pytest.raises(error_type, match=message) as error:
    train.train_and_evaluate(config, workdir)
  assert "last good checkpoint (step 2)" in str(error.value)
  assert checkpoints.Checkpointer(workdir, read_only=True).all_steps() == [2]
  state = evaluate.restore_state(workdir)
  assert all(np.isfinite(leaf).all() and np.abs(leaf).max() < 1e3 for leaf in _params(state))


def test_max_loss_bounds_the_losses_only_and_zero_turns_it_off():
  window = monitoring.MetricWindow()
  window.add(7, {"G_GAN": np.float32(5.6e13), "G_L1": np.float32(3.0),
                 "learning_rate": np.float32(1e6)})
  window.check_finite(None, 0.0)                       # off: only NaN and Inf stop a run
  with pytest.raises(monitoring.DivergedLossError, match=r"step 7: G_GAN=5\.6e\+13; .*no "
                     "checkpoint was written yet"):
    window.check_finite(None, 1e4)
  calm = monitoring.MetricWindow()
  calm.add(1, {"G_GAN": np.float32(0.7), "learning_rate": np.float32(1e6)})
  calm.check_finite(None, 1e4)                         # the learning rate is no loss


def test_eval_on_one_device_of_a_run_trained_on_eight_needs_no_config(trained):
  workdir, _, _ = trained
  result = _run("p2p_jax.main", f"--workdir={workdir}", "--mode=eval", devices=1)
  out = evaluate.result_dir(workdir, 40, "test", deterministic=False)
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == 40 and metrics["num_images"] == 8 and metrics["mode"] == "paper"
  assert metrics["split"] == "test" and metrics["data"] == "synthetic:edges2objects"
  assert 0 < metrics["l1"] < 2 and metrics["psnr"] > 0 and -1 <= metrics["ssim"] <= 1
  assert "own BatchNorm statistics" in metrics["test_mode"]
  worst = [entry["l1"] for entry in metrics["worst_l1"]]
  assert len(worst) == 8 and worst == sorted(worst, reverse=True)
  names = sorted(os.listdir(os.path.join(out, "images")))
  assert len(names) == 3 * 4 and names[0].endswith("_fake_b.png")   # eval.save_images = 4
  with open(os.path.join(out, "index.html")) as f:
    page = f.read()
  assert page.count("<img") == 12 and "8 images of the test split, paper test mode: L1" in page
  assert metrics["lpips_net"] == "alexnet" and 0 < metrics["lpips"] < 1   # 32 px: just enough
  shown = [float(v) for v in re.findall(r"<td class='lpips' data-v='([0-9.e+-]+)'>", page)]
  assert len(shown) == 4 and shown == sorted(shown, reverse=True)          # worst first
  assert f"Wrote {out}/metrics.json and {out}/index.html" in result.stderr


def test_each_test_mode_has_its_own_directory_and_the_architecture_is_the_checkpoints(trained):
  workdir, _, _ = trained
  paper = evaluate.evaluate(_smoke_config(), workdir)
  deterministic = evaluate.evaluate(_smoke_config(eval__deterministic=True), workdir)
  assert (paper["mode"], deterministic["mode"]) == ("paper", "deterministic")
  assert paper["l1"] != deterministic["l1"]
  for result in (paper, deterministic):
    with open(os.path.join(evaluate.result_dir(workdir, 40, "test", result["deterministic"]),
                           "metrics.json")) as f:
      assert json.load(f)["l1"] == result["l1"]        # neither overwrote the other
  with open(os.path.join(workdir, "eval", "step_40", "index.html")) as f:
    overview = f.read()
  assert "test_paper/index.html" in overview and "test_deterministic/index.html" in overview
  with pytest.raises(validation.ConfigError, match=r"config.model.ngf=8, but this config says "
                     r"16\. Evaluation uses the checkpoint's architecture"):
    evaluate.evaluate(_smoke_config(model__ngf=16), workdir)
  # The dtype is not the architecture: the float32 run's checkpoint evaluated in bfloat16,
  # into a directory of its own beside the float32 results.
  bfloat16 = evaluate.evaluate(_smoke_config(eval__deterministic=True, model__dtype="bfloat16"),
                               workdir)
  assert (bfloat16["dtype"], deterministic["dtype"]) == ("bfloat16", "float32")
  assert bfloat16["l1"] != deterministic["l1"]
  assert bfloat16["l1"] == pytest.approx(deterministic["l1"], abs=0.02)
  for result, compute in ((deterministic, ()), (bfloat16, ("bfloat16", "auto", "auto"))):
    with open(os.path.join(evaluate.result_dir(workdir, 40, "test", True, compute),
                           "metrics.json")) as f:
      assert json.load(f)["l1"] == result["l1"]
  with open(os.path.join(workdir, "eval", "step_40", "index.html")) as f:
    assert "test_deterministic_bfloat16_auto_auto/index.html" in f.read()


def test_predict_a_folder_of_mixed_images(trained, tmp_path):
  workdir, _, _ = trained
  inputs = tmp_path / "inputs"
  (inputs / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(inputs / "rgb.png")
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(inputs / "photo.jpg")
  Image.fromarray(rng.integers(0, 255, (20, 70), np.uint8), "L").save(inputs / "gray.png")
  Image.fromarray(rng.integers(0, 255, (33, 31, 4), np.uint8), "RGBA").save(
      inputs / "sub" / "alpha.png")
  (inputs / "broken.png").write_bytes(b"not an image")
  out = tmp_path / "out"
  cmd, env = _command("p2p_jax.predict", f"--workdir={workdir}", f"--input={inputs}",
                      f"--output={out}", "--fit=pad", devices=1)
  result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1                       # one file could not be read...
  assert "broken.png" in result.stderr and "not an image" in result.stderr
  assert "Wrote 4 image(s)" in result.stdout          # ... the others were translated
  sizes = {path: Image.open(out / path).size for path in
           ("rgb.png", "photo.png", "gray.png", "sub/alpha.png")}
  assert sizes == {"rgb.png": (50, 40), "photo.png": (32, 32), "gray.png": (70, 20),
                   "sub/alpha.png": (31, 33)}
  assert Image.open(out / "rgb.png").mode == "RGB"


def _snapshot(workdir):
  """Every file under `workdir` with its bytes."""
  found = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = f.read()
  return found


def test_a_refused_run_leaves_the_workdir_as_it_was_and_a_resume_keeps_a_history(trained,
                                                                                  tmp_path):
  source, unbroken, _ = trained
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)
  before = _snapshot(workdir)
  other_model = _smoke_config(num_train_steps=42, model__ngf=16)
  with pytest.raises(validation.ConfigError, match=r"config.model.ngf=8, but this config says 16"):
    train.train_and_evaluate(other_model, workdir, writer=_RecordingWriter())
  with workdir_lib.TrainLock(workdir):                 # another job trains here
    with pytest.raises(workdir_lib.WorkdirError, match="in use by another training job"):
      train.train_and_evaluate(_smoke_config(num_train_steps=42), workdir)
  assert _snapshot(workdir) == before

  # A resume under another learning rate: the change is kept, each checkpoint says its own.
  config = _smoke_config(num_train_steps=42, checkpoint_every_steps=20)
  config.optim.learning_rate = 1e-4
  assert int(train.train_and_evaluate(config, workdir, writer=_RecordingWriter()).step) == 42
  entries = workdir_lib.history(workdir)
  assert [e["start_step"] for e in entries] == [0, 40]
  assert entries[1]["changed"]["optim.learning_rate"] == [2e-4, 1e-4]
  assert entries[1]["changed"]["num_train_steps"] == [40, 42]
  reader = checkpoints.Checkpointer(workdir, read_only=True)
  assert reader.saved_config(40).optim.learning_rate == 2e-4
  assert reader.saved_config(42).optim.learning_rate == 1e-4
  reader.close()
  assert workdir_lib.load_config(workdir).optim.learning_rate == 1e-4


def test_eval_falls_back_from_a_damaged_checkpoint_and_refuses_it_by_number(trained, tmp_path):
  source, _, _ = trained
  workdir = str(tmp_path / "damaged")
  shutil.copytree(source, workdir)
  damage.flip(damage.largest_value(workdir, 40))

  assert evaluate.evaluate(_smoke_config(), workdir)["step"] == 20
  cmd, env = _command("p2p_jax.main", f"--workdir={workdir}", "--mode=eval",
                      "--config=configs/default.py:smoke", "--config.eval.step=40", devices=1)
  result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r"Error: Checkpoint step 40 .* is damaged: array \S+ .*Steps that verify: "
                  r"\[20\]", last), result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_a_full_workdir_stops_training_in_one_line(tmp_path):
  """The checkpoint's files cannot be written (a file size limit: what a full disk does)."""
  workdir = str(tmp_path / "full")
  cmd, env = _command("p2p_jax.main", "--config=configs/default.py:smoke", f"--workdir={workdir}",
                      "--config.num_train_steps=2", "--config.image_every_steps=0", devices=1)

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails, no signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

  result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r"Error: Could not write checkpoint step 2: \S+ is full \(File too large\): "
                  r"free space .*no checkpoint was saved before it\.$", last), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert checkpoints.Checkpointer(workdir, read_only=True).all_steps() == []
