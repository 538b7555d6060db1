"""Checkpoints: exact round trip, crash-safe saves, digests that catch damage, the fallback to
the newest good step, self-describing checkpoints, and the workdir's config, history and lock."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from p2p_jax import checkpoints
from p2p_jax import devices
from p2p_jax import step as step_lib
from p2p_jax import train
from p2p_jax import validation
from p2p_jax import workdir as workdir_lib
from tests import damage as damage_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def state():
  config = default.get_config("smoke")
  config.model.update(ngf=4, ndf=4)
  return config, step_lib.create_train_state(jax.random.key(0), config, steps_per_epoch=10)


def _leaves(state):
  return jax.tree.leaves((state.step, state.generator, state.discriminator))


def _bumped(state, amount):
  return state.replace(step=state.step + amount, generator=state.generator.replace(
      params=jax.tree.map(lambda p: p + float(amount), state.generator.params)))


def _saved(workdir, states, config, keep=None):
  """A checkpointer of `workdir` holding `states` ({step: state}), all written."""
  checkpointer = checkpoints.Checkpointer(str(workdir), keep=keep)
  for step, value in states.items():
    checkpointer.save(step, devices.replicate(value), config)
  checkpointer.wait_until_finished()
  return checkpointer


def test_round_trip_is_exact_and_any_step_restores(state, tmp_path):
  config, initial = state
  later = _bumped(initial, 7)
  checkpointer = _saved(tmp_path, {3: initial, 7: later}, config)
  assert checkpointer.all_steps() == [3, 7]
  restored = checkpointer.restore(lambda saved: initial)
  assert restored.step == 7 and restored.damaged == ()
  assert restored.config.to_dict() == config.to_dict()       # the checkpoint describes itself
  for a, b in zip(_leaves(restored.state), _leaves(later)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(checkpointer.restore(lambda saved: initial, step=3).state),
                  _leaves(initial)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoints.CheckpointError, match=r"step 5 .* saved steps: \[3, 7\]"):
    checkpointer.restore(lambda saved: initial, step=5)
  checkpointer.close()


def test_an_unfinished_save_leaves_the_previous_checkpoint_usable(state, tmp_path):
  config, initial = state
  _saved(tmp_path, {2: initial}, config).close()
  # What a kill in the middle of writing step 4 leaves behind: a temporary directory.
  partial = os.path.join(tmp_path, "checkpoints", "4.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\x00truncated")
  reopened = checkpoints.Checkpointer(str(tmp_path))
  assert reopened.latest_step() == 2
  assert reopened.restore(lambda saved: initial).step == 2
  reopened.save(4, devices.replicate(initial), config)   # and the step can be written again
  reopened.wait_until_finished()
  assert reopened.all_steps() == [2, 4]
  reopened.close()


def _edit_config(workdir, step):
  """A changed digit in the saved config (its learning rate): still valid JSON."""
  path = os.path.join(workdir, "checkpoints", str(step), "config", "metadata")
  text = open(path).read()
  assert '"learning_rate": 0.0002' in text
  open(path, "w").write(text.replace('"learning_rate": 0.0002', '"learning_rate": 0.0003'))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "config"])
def test_a_damaged_checkpoint_is_named_and_the_newest_good_one_restored(state, tmp_path, damage,
                                                                        caplog):
  config, initial = state
  _saved(tmp_path, {2: initial, 4: _bumped(initial, 2), 6: _bumped(initial, 4)}, config).close()
  if damage == "config":
    _edit_config(str(tmp_path), 6)
  else:
    target = damage_lib.largest_value(tmp_path, 6)
    getattr(damage_lib, damage)(target)

  reader = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  with caplog.at_level("WARNING"):
    restored = reader.restore(lambda saved: initial)
  assert restored.step == 4 and restored.damaged == (6,)
  for a, b in zip(_leaves(restored.state), _leaves(_bumped(initial, 2))):
    np.testing.assert_array_equal(a, b)
  warning = next(r.getMessage() for r in caplog.records if "step 6" in r.getMessage())
  assert "\n" not in warning
  if damage == "flip":                 # read fine, caught by the digest, which names the array
    assert re.search(r"array (generator|discriminator)/\S+ .*differs from the digest", warning)
  elif damage == "config":
    assert "its config differs from the digest" in warning
  else:                                # TensorStore's read error, with the array it was reading
    assert re.search(r"array (generator|discriminator)/\S+ cannot be read", warning), warning

  # Asked for by number, the damaged step is an error listing the good ones.
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"step 6 .* is damaged: .*Steps that verify: \[2, 4\]") as error:
    reader.restore(lambda saved: initial, step=6)
  assert "\n" not in str(error.value)
  reader.close()
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "6"))   # a reader moves nothing

  # A training moves it aside, so that its next save of step 6 does not meet it.
  writer = checkpoints.Checkpointer(str(tmp_path))
  writer.set_aside(writer.restore(lambda saved: initial).damaged)
  assert writer.all_steps() == [2, 4]
  assert os.path.isdir(os.path.join(tmp_path, checkpoints.DAMAGED_DIR, "6", "state"))
  writer.save(6, devices.replicate(initial), config)
  writer.close()


def test_a_bare_step_folder_is_never_a_checkpoint(state, tmp_path):
  config, initial = state
  _saved(tmp_path, {2: initial}, config).close()
  os.makedirs(os.path.join(tmp_path, "checkpoints", "9", "state"))   # no finished save wrote it
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  assert checkpointer.all_steps() == [2] and checkpointer.incomplete_steps() == ["9"]
  assert checkpointer.restore(lambda saved: initial).step == 2
  checkpointer.set_aside()
  assert checkpointer.incomplete_steps() == []
  assert os.path.isdir(os.path.join(tmp_path, checkpoints.DAMAGED_DIR, "9"))
  checkpointer.close()


def test_no_good_checkpoint_left_is_one_line_naming_each(state, tmp_path):
  config, initial = state
  _saved(tmp_path, {2: initial}, config).close()
  damage_lib.flip(damage_lib.largest_value(tmp_path, 2))
  checkpointer = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  with pytest.raises(checkpoints.CheckpointError, match=r"No checkpoint .* step 2: array") as error:
    checkpointer.restore(lambda saved: initial)
  assert "\n" not in str(error.value)
  checkpointer.close()


def test_a_config_of_another_architecture_is_refused_not_taken_for_damage(state, tmp_path):
  config, initial = state
  _saved(tmp_path, {2: initial}, config).close()
  other = default.get_config("smoke")
  other.model.update(ngf=8, ndf=4)
  bigger = step_lib.create_train_state(jax.random.key(0), other, steps_per_epoch=10)
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(validation.ConfigError,
                     match=r"holds generator/\S+ of shape \(8,\), but this config makes \(16,\)"):
    checkpointer.restore(lambda saved: bigger)                 # not CheckpointError: no damage
  other.model.update(ngf=4, n_layers_d=2)                      # one D layer fewer: other names
  fewer = step_lib.create_train_state(jax.random.key(0), other, steps_per_epoch=10)
  with pytest.raises(validation.ConfigError, match=r"holds discriminator/\S+, which this config "
                     r"does not make"):
    checkpointer.restore(lambda saved: fewer)
  assert checkpointer.restore(lambda saved: initial).damaged == ()
  checkpointer.close()


@pytest.mark.parametrize("field, value", [("dtype", "bfloat16"), ("conv_impl", "xla"),
                                          ("upconv_impl", "subpixel")])
def test_a_run_resumes_under_another_dtype_or_other_forms(state, tmp_path, caplog, field,
                                                         value):
  """They choose how the step computes, not what a checkpoint holds: the arrays restore
  as saved, into networks of the new config's dtype and forms, and the log says so."""
  config, initial = state
  saved = _bumped(initial, 1)
  workdir_lib.save_config(config, str(tmp_path))
  _saved(tmp_path, {2: saved}, config).close()
  changed = default.get_config("smoke")
  changed.model.update(ngf=4, ndf=4)
  changed.model[field] = value
  template = step_lib.create_train_state(jax.random.key(1), changed, steps_per_epoch=10)
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  try:
    with caplog.at_level(logging.WARNING):
      resumed = train._restore(checkpointer, template, changed, str(tmp_path))
  finally:
    checkpointer.close()
  for got, want in zip(_leaves(resumed), _leaves(saved)):
    np.testing.assert_array_equal(got, want)
  assert resumed.settings is template.settings
  assert f"model.{field} {config.model[field]} -> {value}" in caplog.text
  changed.model.ngf = 8                                        # the architecture still counts
  with pytest.raises(validation.ConfigError, match=r"config.model.ngf=4"):
    workdir_lib.check_same_run(changed, workdir_lib.load_config(str(tmp_path)).to_dict(),
                               str(tmp_path))


def test_config_history_and_model_mismatch_message(state, tmp_path):
  config, _ = state
  workdir = str(tmp_path)
  workdir_lib.save_config(config, workdir)
  assert workdir_lib.load_config(workdir).to_dict() == config.to_dict()
  assert os.path.exists(tmp_path / "config.yaml")
  changed = default.get_config("smoke")
  changed.model.update(ngf=4, ndf=4)
  changed.optim.learning_rate = 1e-4
  workdir_lib.save_config(changed, workdir, start_step=40)
  workdir_lib.save_config(changed, workdir, start_step=80)     # no change: no new line
  entries = workdir_lib.history(workdir)
  assert len(entries) == 2 and entries[0]["config"]["model"]["ngf"] == 4
  assert entries[1]["start_step"] == 40
  assert entries[1]["changed"] == {"optim.learning_rate": [config.optim.learning_rate, 1e-4]}
  saved = workdir_lib.load_config(workdir).to_dict()
  workdir_lib.check_same_run(changed, saved, workdir)          # same model: fine
  other = default.get_config("smoke")
  other.model.update(ngf=16, ndf=4)
  with pytest.raises(validation.ConfigError, match=r"config.model.ngf=4.*--config.model.ngf=4"):
    workdir_lib.check_same_run(other, saved, workdir)


def test_missing_run_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no p2p_jax run"):
    workdir_lib.load_config(str(tmp_path))


_HOLD_LOCK = """
import sys, time
from p2p_jax import workdir
workdir.TrainLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_one_training_per_workdir_and_a_stale_lock_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, workdir], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf"in use by another training job \(host \S+, pid {holder.pid}, "
                             r"started \d{4}-.*delete .*train.lock") as error:
      workdir_lib.TrainLock(workdir).acquire()
    assert "\n" not in str(error.value)
  finally:
    holder.kill()                       # a job killed outright leaves its lock file behind
    holder.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  with caplog.at_level("WARNING"):
    with workdir_lib.TrainLock(workdir) as lock:
      assert json.load(open(lock.file))["token"] == lock._holder["token"]
      with pytest.raises(workdir_lib.WorkdirError):        # held: a second one is refused
        workdir_lib.TrainLock(workdir).acquire()
  assert any(f"pid {holder.pid}" in r.getMessage() and "gone" in r.getMessage()
             for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))   # released


def test_a_cloud_style_lock_is_refused_while_fresh_waited_for_and_then_taken_over(tmp_path,
                                                                                   monkeypatch):
  monkeypatch.setattr(workdir_lib, "is_remote", lambda workdir: True)
  workdir = str(tmp_path)
  timing = {"stale_seconds": 1.0, "refresh_seconds": 0.2}
  first = workdir_lib.TrainLock(workdir, **timing)
  first.acquire()
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another training job"):
    workdir_lib.TrainLock(workdir, **timing).acquire()     # rewritten just now: a live job
  first._stop.set()                     # its job is gone: nobody rewrites the lock any more
  first._refresher.join()
  lock_file = os.path.join(workdir, workdir_lib.LOCK_FILE)
  holder = json.load(open(lock_file))
  holder["refreshed"] = time.time() - 0.6     # past two refreshes, short of stale: wait
  open(lock_file, "w").write(json.dumps(holder))
  second = workdir_lib.TrainLock(workdir, **timing)
  began = time.monotonic()
  second.acquire()
  assert time.monotonic() - began >= 0.3
  assert json.load(open(lock_file))["token"] == second._holder["token"] != holder["token"]
  second.release()
  assert not os.path.exists(lock_file)


def test_an_unwritable_workdir_is_one_line(tmp_path):
  target = tmp_path / "read_only"
  target.mkdir()
  target.chmod(0o555)
  workdir = str(target)
  if os.access(workdir, os.W_OK):       # root writes anywhere: take a file system that refuses
    workdir = "/sys/kernel"
  with pytest.raises(workdir_lib.WorkdirError, match=r"is not writable \(.*\): pass a --workdir"):
    workdir_lib.check_writable(workdir)
