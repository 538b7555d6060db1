"""Orbax checkpoints of the pix2pix train state, and the config saved beside them.

A checkpoint holds the step, both networks' params, BatchNorm statistics and
optimiser states (the learning-rate schedule's position is the optimiser's
step count). The data position and the RNG are functions of the step and the
config, so restoring the state restores them too. Orbax writes each step to a
temporary directory and renames it when complete, so a crash during a save
leaves the previous checkpoint usable.

The resolved config is written to `workdir/config.json` (and `.yaml`), which
is what eval and predict read: restoring never needs the training flags again.
`check_same_run` compares a config with the one saved in a workdir, so that a
run is never resumed (or an ablation row continued) under other settings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from p2p_jax import devices

PyTree = Any
CONFIG_FILE = "config.json"


def _path(workdir: str) -> epath.Path:
  """A local path (made absolute) or a cloud one such as gs://bucket/run."""
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config as JSON (read back by `load_config`) and YAML (to read)."""
  root = _path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  for name, text in ((CONFIG_FILE, config.to_json(indent=2, sort_keys=True)),
                     ("config.yaml", config.to_yaml())):
    tmp = root / (name + ".tmp")
    tmp.write_text(text)
    tmp.replace(root / name)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = _path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} holds no p2p_jax run. Train into it first "
        f"(python -m p2p_jax.main --config=... --workdir={workdir}) or convert weights into it "
        f"(python -m p2p_jax.convert_torch ... --workdir={workdir}).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _config_differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, old value, new value) for every leaf in which two config dicts differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for key in sorted(set(old) | set(new))
            for d in _config_differences(old.get(key), new.get(key), f"{path}.{key}".lstrip("."))]
  return [] if old == new else [(path, old, new)]


MODEL_FIELDS = ("model.", "data.crop_size")   # what a checkpoint's arrays depend on


def check_same_run(config: ml_collections.ConfigDict, workdir: str, *,
                   fields: tuple[str, ...] = MODEL_FIELDS, ignore: tuple[str, ...] = (),
                   hint: str = "") -> None:
  """Refuses to resume a run in `workdir` saved under other settings than `config`'s.

  Compares the saved config with `config` in the fields that start with one of
  `fields` (empty: every field) and with none of `ignore`; raises ValueError
  naming the first that differs, both values, and `hint` (default: pass the
  saved value or use a new workdir). Nothing to compare without a saved config.
  """
  if not (_path(workdir) / CONFIG_FILE).exists():
    return
  saved = load_config(workdir).to_dict()
  for field, old, new in _config_differences(saved, json.loads(config.to_json())):
    if (fields and not field.startswith(fields)) or (ignore and field.startswith(ignore)):
      continue
    fix = hint or f"Use a new --workdir, or pass --config.{field}={old!r}."
    raise ValueError(f"{workdir} holds a run with config.{field}={old!r}, but this config says "
                     f"{new!r}. {fix}")


class Checkpointer:
  """Saves asynchronously when `is_due` (keeping the last `keep`); restores any step."""

  def __init__(self, workdir: str, *, every_steps: int = 1, keep: int | None = 3,
               read_only: bool = False):
    self.directory = _path(workdir) / "checkpoints"
    self.every_steps = max(every_steps, 1)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True when the runtime (e.g. a TPU maintenance event) asks this job to save and stop."""
    return self._manager.reached_preemption(step)

  def is_due(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: PyTree) -> None:
    """Saves a pmap-replicated `state` as checkpoint `step` (in the background)."""
    tree = jax.tree.map(devices.to_global, flax.serialization.to_state_dict(state))
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)),
                       force=True)

  def restore(self, template: PyTree, step: int | None = None) -> PyTree:
    """Restores into the structure of the unreplicated `template` (host numpy arrays).

    Works on any number of devices: the arrays come back to the host, to be
    replicated onto whatever devices this machine has.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"saved steps: {self.all_steps()}.")
    target = jax.tree.map(np.asarray, flax.serialization.to_state_dict(template))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return flax.serialization.from_state_dict(template, jax.tree.map(np.asarray, restored.state))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
