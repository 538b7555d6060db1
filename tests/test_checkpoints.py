"""Checkpoints: exact round trip, crash-safe saves, the saved config, clear refusals."""

import os

import jax
import numpy as np
import pytest

from configs import default
from p2p_jax import checkpoints
from p2p_jax import devices
from p2p_jax import step as step_lib


@pytest.fixture(scope="module")
def state():
  config = default.get_config("smoke")
  config.model.update(ngf=4, ndf=4)
  return config, step_lib.create_train_state(jax.random.key(0), config, steps_per_epoch=10)


def _leaves(state):
  return jax.tree.leaves((state.step, state.generator, state.discriminator))


def test_round_trip_is_exact_and_any_step_restores(state, tmp_path):
  config, initial = state
  checkpointer = checkpoints.Checkpointer(str(tmp_path), keep=None)
  later = initial.replace(step=initial.step + 7, generator=initial.generator.replace(
      params=jax.tree.map(lambda p: p + 1.0, initial.generator.params)))
  checkpointer.save(3, devices.replicate(initial))
  checkpointer.save(7, devices.replicate(later))
  checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == [3, 7]
  for a, b in zip(_leaves(checkpointer.restore(initial)), _leaves(later)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(checkpointer.restore(initial, step=3)), _leaves(initial)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match=r"step 5 .* saved steps: \[3, 7\]"):
    checkpointer.restore(initial, step=5)
  checkpointer.close()


def test_an_unfinished_save_leaves_the_previous_checkpoint_usable(state, tmp_path):
  _, initial = state
  checkpointer = checkpoints.Checkpointer(str(tmp_path))
  checkpointer.save(2, devices.replicate(initial))
  checkpointer.close()
  # What a kill in the middle of writing step 4 leaves behind: a temporary directory.
  partial = os.path.join(checkpointer.directory, "4.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\x00truncated")
  reopened = checkpoints.Checkpointer(str(tmp_path))
  assert reopened.latest_step() == 2
  assert int(reopened.restore(initial).step) == int(initial.step)
  reopened.save(4, devices.replicate(initial))       # and the step can be written again
  reopened.wait_until_finished()
  assert reopened.all_steps() == [2, 4]
  reopened.close()


def test_config_round_trip_and_model_mismatch_message(state, tmp_path):
  config, _ = state
  checkpoints.save_config(config, str(tmp_path))
  loaded = checkpoints.load_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  assert os.path.exists(tmp_path / "config.yaml")
  checkpoints.check_same_run(config, str(tmp_path))            # same model: fine
  other = default.get_config("smoke")
  other.model.update(ngf=16, ndf=4)
  with pytest.raises(ValueError, match=r"config.model.ngf=4.*--config.model.ngf=4"):
    checkpoints.check_same_run(other, str(tmp_path))


def test_missing_run_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no p2p_jax run"):
    checkpoints.load_config(str(tmp_path))
