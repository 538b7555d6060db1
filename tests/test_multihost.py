"""The multi-host path on one machine: `launch/local.sh 2` runs two processes of two CPU
devices each, coordinated over localhost; stopped and resumed, they train as one process
with four devices, and their checkpoint restores on one device."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from p2p_jax import evaluate
from tests.test_input_pipeline import indexed_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, "launch", "local.sh")
NUM_STEPS = 4                     # of the global batch 8: one epoch of 36 examples
ROWS_PER_STEP = 8

# p2p_jax.main, also dumping what the test compares: the final state's leaves, and
# the example index of every row this process's training steps read.
_WORKER = '''
import os
import jax
import numpy as np
from absl import app
from p2p_jax import input_pipeline, main, train

_create_train_iterator = input_pipeline.create_train_iterator
_train_and_evaluate = train.train_and_evaluate
indices = []

def recording_iterator(config, **kwargs):
  for batch in _create_train_iterator(config, **kwargs):
    indices.append(np.asarray(batch["index"]).reshape(-1))
    yield batch

def train_and_dump(config, workdir, writer=None):
  state = _train_and_evaluate(config, workdir, writer)
  leaves = jax.tree.leaves((state.step, state.generator, state.discriminator))
  np.savez(os.path.join(workdir, f"dump_{jax.process_index()}_step{int(state.step)}.npz"),
           *leaves, indices=np.stack(indices))
  return state

input_pipeline.create_train_iterator = recording_iterator
train.train_and_evaluate = train_and_dump
app.run(main.main)
'''


def _env(devices=None, **extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", **extra)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _load_dump(path):
  with np.load(path) as dump:
    leaves = [dump[f"arr_{i}"] for i in range(len(dump.files) - 1)]
    return leaves, dump["indices"]


@pytest.fixture
def spawn():
  """Starts commands in their own process groups; kills what is left of them at the end."""
  started = []

  def start(command, env):
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started.append(process)
    return process
  yield start
  for process in started:
    if process.poll() is None:    # a failed assertion, or a hang: no process may outlive us
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()


def _check(process, what, log_dir=None):
  out, _ = process.communicate(timeout=300)
  logs = out or ""
  if log_dir and os.path.isdir(log_dir):
    for name in sorted(os.listdir(log_dir)):
      with open(os.path.join(log_dir, name)) as f:
        logs += f"\n--- {name}\n" + f.read()[-3000:]
  assert process.returncode == 0, f"{what} failed:\n{logs[-8000:]}"


def test_two_processes_train_and_resume_as_one_process_with_four_devices(tmp_path, spawn):
  data = tmp_path / "data"
  indexed_folder(data, 36)
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  flags = ["--config=configs/default.py:smoke", "--config.data.source=folder",
           f"--config.data.dir={data}", "--config.data.preprocess=crop",
           # A constant learning rate: a run stopped at step 2 then follows the same
           # schedule as one meant to stop there.
           "--config.optim.n_epochs_decay=0",
           # Adam moves a weight whose gradient is ~0 by about lr * g / |g|: a sign the
           # rounding of the cross-process sum decides. A larger eps keeps that update
           # continuous in g, so the two runs can be compared to 1e-5.
           "--config.optim.eps=1e-3"]
  multi_dir, single_dir = str(tmp_path / "two_processes"), str(tmp_path / "one_process")

  def two_processes(num_steps):
    log_dir = str(tmp_path / f"logs_{num_steps}")
    return log_dir, spawn(
        ["bash", LOCAL_SH, "2", *flags, f"--config.num_train_steps={num_steps}",
         f"--workdir={multi_dir}"],
        _env(PYTHON=sys.executable, ENTRY_POINT=str(worker), LOG_DIR=log_dir,
             DEVICES_PER_PROCESS="2"))

  # Each run mostly waits on its own compiles, so two at a time.
  single = spawn([sys.executable, str(worker), *flags, f"--config.num_train_steps={NUM_STEPS}",
                  f"--workdir={single_dir}"], _env(devices=4))
  log_dir, first = two_processes(NUM_STEPS // 2)
  _check(first, "launch/local.sh 2 (first half)", log_dir)
  log_dir, second = two_processes(NUM_STEPS)     # resumes from the first half's checkpoint
  # The checkpoint the two processes wrote restores in one process on one device.
  evaluation = spawn(
      [sys.executable, "-m", "p2p_jax.main", *flags, f"--workdir={multi_dir}", "--mode=eval",
       f"--config.eval.step={NUM_STEPS // 2}", "--config.data.eval_split=train",
       "--config.eval.num_images=8", "--config.eval.deterministic=True"], _env(devices=1))
  _check(second, "launch/local.sh 2 (second half)", log_dir)
  _check(single, "the one-process run")
  _check(evaluation, "the one-device eval")
  with open(os.path.join(log_dir, "process_1.log")) as f:
    assert f"Resuming from the checkpoint of step {NUM_STEPS // 2}" in f.read()

  dumps = [[_load_dump(os.path.join(multi_dir, f"dump_{p}_step{step}.npz"))
            for step in (NUM_STEPS // 2, NUM_STEPS)] for p in range(2)]
  leaves_0, leaves_1 = dumps[0][1][0], dumps[1][1][0]
  leaves_single, indices_single = _load_dump(
      os.path.join(single_dir, f"dump_0_step{NUM_STEPS}.npz"))
  assert int(leaves_0[0]) == int(leaves_single[0]) == NUM_STEPS
  # Replicas of one computation: bit for bit the same on both processes.
  assert len(leaves_0) == len(leaves_1) == len(leaves_single)
  for a, b in zip(leaves_0, leaves_1):
    np.testing.assert_array_equal(a, b)
  # ... and, stopped and resumed halfway, what one unbroken process with four devices computes.
  for a, b in zip(leaves_0, leaves_single):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The last checkpoint holds exactly the final state.
  restored = evaluate.restore_state(multi_dir)
  for a, b in zip(jax.tree.leaves((restored.step, restored.generator, restored.discriminator)),
                  leaves_0):
    np.testing.assert_array_equal(a, b)

  # Each step, process 0 read the first half of the global batch and process 1 the
  # second; over the epoch every example was read by exactly one process.
  indices_0, indices_1 = (np.concatenate([half[1] for half in halves]) for halves in dumps)
  assert indices_0.shape == indices_1.shape == (NUM_STEPS, ROWS_PER_STEP // 2)
  np.testing.assert_array_equal(np.concatenate([indices_0, indices_1], axis=1),
                                indices_single)
  assert not set(indices_0.flat) & set(indices_1.flat)
  seen = np.concatenate([indices_0.ravel(), indices_1.ravel()])
  assert len(set(seen.tolist())) == NUM_STEPS * ROWS_PER_STEP and set(seen) <= set(range(36))

  # Only process 0 wrote the config and TensorBoard summaries (one file per run), and
  # held the workdir's one lock, released at the end.
  assert os.path.exists(os.path.join(multi_dir, "config.json"))
  assert not os.path.exists(os.path.join(multi_dir, "train.lock"))
  events = [name for name in os.listdir(multi_dir) if name.startswith("events.out.tfevents")]
  assert len(events) == 2, events

  with open(os.path.join(multi_dir, "eval", f"step_{NUM_STEPS // 2}", "train_deterministic",
                         "metrics.json")) as f:
    result = json.load(f)
  assert result["step"] == NUM_STEPS // 2 and result["num_images"] == 8
  assert 0 < result["l1"] < 2
