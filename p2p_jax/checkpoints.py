"""Orbax checkpoints of the pix2pix train state that prove their integrity and describe themselves.

Each checkpoint `checkpoints/<step>/` holds three Orbax items:

  state     the step, both networks' params, BatchNorm statistics and optimiser states
            (the learning-rate schedule's position is the optimiser's step count; the
            data position and the RNG are functions of the step and the config);
  config    the config it was trained with, so eval, predict, export and resume read
            the architecture from the checkpoint they restore;
  digests   a SHA-256 of every array of `state`, taken at save time.

Orbax writes each step into a temporary directory and renames it when complete,
so a crash during a save leaves the previous checkpoint usable; it checks the
files' structure but not their contents, so a flipped byte would restore
silently. `Checkpointer.restore` verifies every array against its digest; a
checkpoint that fails, or cannot be read, is reported in one line (step, array,
what happened) and the newest checkpoint that verifies is restored instead.
A training then moves the damaged ones aside (to `damaged_checkpoints/`, never
deleting them), so that its next saves do not meet them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import sys
from typing import Any, Callable, NamedTuple

import flax.serialization
import flax.traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from p2p_jax import devices
from p2p_jax import validation
from p2p_jax import workdir as workdir_lib

PyTree = Any
DAMAGED_DIR = "damaged_checkpoints"
_COMPLETE_MARKER = "_CHECKPOINT_METADATA"   # Orbax writes it into every step it finalises
_DIGEST = "sha256"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written, or none of those asked for can be restored.

  The message is one line: which step, which array, what happened, and the fix.
  """


class Restored(NamedTuple):
  state: PyTree                                # the template's structure, host numpy arrays
  step: int
  config: ml_collections.ConfigDict | None     # None for checkpoints saved without one
  damaged: tuple[int, ...]                     # newer steps skipped because they did not verify


class _Damaged(Exception):
  """One checkpoint failed to read or to verify; the message says how."""


def _drop_abandoned_read_callbacks(hook):
  """A `sys.unraisablehook` that ignores TensorStore's callbacks into the event loop of a
  restore that already failed (`RuntimeError: Event loop is closed`), and passes on the rest.

  When one array of a checkpoint cannot be read, Orbax's restore ends and closes its
  loop while other reads are still under way; their completions then find it closed.
  """
  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  quiet.p2p_jax = True
  return quiet


if not getattr(sys.unraisablehook, "p2p_jax", False):
  sys.unraisablehook = _drop_abandoned_read_callbacks(sys.unraisablehook)


def array_digests(tree: PyTree) -> dict[str, str]:
  """'generator/params/down_1/kernel' -> SHA-256 of its dtype, shape and bytes, for a host tree."""
  flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(tree), sep="/")

  def digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    hasher = hashlib.new(_DIGEST, f"{array.dtype.str}{array.shape}".encode())
    hasher.update(memoryview(array).cast("B") if array.size else b"")
    return hasher.hexdigest()

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:   # hashlib frees the GIL
    values = pool.map(digest, (np.asarray(v) for v in flat.values()))
    return dict(zip(flat.keys(), values))


class Checkpointer:
  """Saves asynchronously when `is_due` (keeping the last `keep`); restores verified steps."""

  def __init__(self, workdir: str, *, every_steps: int = 1, keep: int | None = 3,
               read_only: bool = False):
    self.workdir = workdir
    self.directory = workdir_lib.path(workdir) / "checkpoints"
    self.every_steps = max(every_steps, 1)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "config": ocp.JsonCheckpointHandler(),
                         "digests": ocp.JsonCheckpointHandler()})
    except OSError as error:
      raise CheckpointError(workdir_lib.describe_write_error(error, str(self.directory))
                            or f"Cannot open {self.directory}: {error}") from error
    self._saved_steps: list[int] = []
    self._complete: set[int] = set()

  # ---------------------------------------------------------------- what is there

  def all_steps(self) -> list[int]:
    """The steps of complete checkpoints (not yet verified), and of this object's saves still
    being written; bare step folders are not among them."""
    steps = sorted(step for step in self._manager.all_steps()
                   if step in self._saved_steps or step in self._complete
                   or (self.directory / str(step) / _COMPLETE_MARKER).exists())
    self._complete.update(steps)   # the loop asks at every logging step: look once per step
    return steps

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def incomplete_steps(self) -> list[str]:
    """Folders named like a step that no finished save wrote (made by hand, or copied in part)."""
    if not self.directory.exists():
      return []
    return sorted(child.name for child in self.directory.iterdir()
                  if child.name.isdigit() and not (child / _COMPLETE_MARKER).exists())

  def reached_preemption(self, step: int) -> bool:
    """True when the runtime (e.g. a TPU maintenance event) asks this job to save and stop."""
    return self._manager.reached_preemption(step)

  def is_due(self, step: int) -> bool:
    return step % self.every_steps == 0

  # ---------------------------------------------------------------- save

  def save(self, step: int, state: PyTree, config: ml_collections.ConfigDict | None = None
           ) -> None:
    """Saves a pmap-replicated `state` (and the `config` it trains with) as checkpoint `step`.

    The digests are taken here, from the first device's copy; the writing goes on
    in the background. A failure to write, this save's or the previous one's, is a
    CheckpointError naming the directory and the fix.
    """
    digests = {"algorithm": _DIGEST, "arrays": array_digests(devices.unreplicate(state))}
    items = {"state": ocp.args.StandardSave(
        jax.tree.map(devices.to_global, flax.serialization.to_state_dict(state)))}
    if config is not None:
      saved = workdir_lib.as_dict(config)
      digests["config"] = _config_digest(saved)
      items["config"] = ocp.args.JsonSave(saved)
    items["digests"] = ocp.args.JsonSave(digests)
    self._saved_steps.append(step)
    self._guard_writes(lambda: self._manager.save(step, args=ocp.args.Composite(**items),
                                                  force=True))

  def wait_until_finished(self) -> None:
    self._guard_writes(self._manager.wait_until_finished)

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def _guard_writes(self, write: Callable[[], Any]) -> None:
    """Runs `write`; what stops it, or the background save before it, is a CheckpointError."""
    try:
      write()
    except Exception as error:  # pylint: disable=broad-except
      # Orbax's background threads re-raise whatever stopped them (TensorStore's
      # status text, an OSError...): say it in one line, with what is still safe.
      failed = self._saved_steps.pop() if self._saved_steps else None
      which = f"checkpoint step {failed}" if failed is not None else "a checkpoint"
      good = [s for s in self._manager.all_steps()
              if (self.directory / str(s) / _COMPLETE_MARKER).exists()]
      kept = (f"the checkpoints before it ({good}) are intact" if good
              else "no checkpoint was saved before it")
      reason = (workdir_lib.describe_write_error(error, str(self.directory))
                or _first_line(error))
      raise CheckpointError(f"Could not write {which}: {reason}; {kept}.") from error

  # ---------------------------------------------------------------- restore

  def restore(self, template_for: Callable[[ml_collections.ConfigDict | None], PyTree],
              step: int | None = None) -> Restored:
    """Restores and verifies checkpoint `step`, or the newest one that verifies.

    `template_for(config)` gets the checkpoint's own config (None if it was saved
    without one) and returns the unreplicated structure to restore into; what it
    raises (a config that does not match the run, say) comes out unchanged.

    With `step` None, each damaged checkpoint on the way down is reported in a
    warning and skipped. With `step` given, a damaged one is a CheckpointError
    that lists the steps that verify. A read that fails for a reason that may
    pass (the storage not answering) is a CheckpointError too, and nothing is
    taken for damaged. With several processes, every process reads (Orbax's
    reads are collective) and they must agree on the step. The arrays come
    back to the host, to be replicated onto whatever devices this machine has.
    """
    self.wait_until_finished()
    restored = self._restore_newest(template_for, step)
    if jax.process_count() > 1:
      # Orbax reads collectively, so every process walks the same steps; should the storage
      # have shown them different files, say so rather than train from different states.
      chosen = np.asarray(multihost_utils.process_allgather(np.int64(restored.step)))
      if len(set(chosen.tolist())) > 1:
        raise CheckpointError(
            f"The processes restored different checkpoints of {self.directory} (steps "
            f"{chosen.tolist()}): they do not see the same files. Check the storage, then run "
            "again.")
    return restored

  def _restore_newest(self, template_for: Callable[..., PyTree], step: int | None) -> Restored:
    steps = self.all_steps()
    if step is not None and step not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; saved steps: "
                            f"{steps}.")
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    damaged: list[tuple[int, str]] = []
    for candidate in ([step] if step is not None else reversed(steps)):
      try:
        restored = self._restore_verified(candidate, template_for)
      except _Damaged as damage:
        damaged.append((candidate, str(damage)))
        if step is not None:
          good = self.verified_steps(template_for, exclude=(step,))
          raise CheckpointError(
              f"Checkpoint step {step} in {self.directory} is damaged: {damage}. Steps that "
              f"verify: {good or 'none'}; pass one of them as the step, or omit it to use the "
              "newest that verifies.") from None
        logging.warning("Checkpoint step %d in %s is damaged: %s; trying the one before.",
                        candidate, self.directory, damage)
        continue
      if damaged:
        logging.warning("Restored checkpoint step %d instead of the damaged step(s) %s.",
                        restored.step, [s for s, _ in damaged])
      return restored._replace(damaged=tuple(s for s, _ in damaged))
    raise CheckpointError(
        f"No checkpoint in {self.directory} can be restored: "
        + "; ".join(f"step {s}: {why}" for s, why in damaged)
        + f". Move {self.directory} aside to train from scratch, or restore a copy.")

  def verified_steps(self, template_for: Callable[[ml_collections.ConfigDict | None], PyTree],
                     exclude: tuple[int, ...] = ()) -> list[int]:
    """The steps whose checkpoints read and verify (each is read whole)."""
    good = []
    for step in self.all_steps():
      if step in exclude:
        continue
      try:
        self._restore_verified(step, template_for)
      except (_Damaged, CheckpointError):
        continue
      good.append(step)
    return good

  def saved_config(self, step: int) -> ml_collections.ConfigDict | None:
    """The config checkpoint `step` was trained with (None if it was saved without one)."""
    config, _ = self._read_config(step)
    return config

  def _read_config(self, step: int) -> tuple[ml_collections.ConfigDict | None, str | None]:
    """(the config, the SHA-256 of its JSON as saved), or (None, None) without one."""
    if not (self.directory / str(step) / "config").exists():
      return None, None
    restored = self._read(step, {"config": ocp.args.JsonRestore()}, "its config")
    return ml_collections.ConfigDict(restored.config), _config_digest(restored.config)

  def _read(self, step: int, args: dict[str, Any], what: str = "") -> Any:
    """Orbax's restore of `args`; a read error becomes _Damaged when it says the files are
    damaged (missing, truncated, unreadable), and a CheckpointError when it may pass."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as error:  # pylint: disable=broad-except
      description, damage = _describe_read_error(error)
      if what:
        description = f"{what} cannot be read ({description})"
      if damage:
        raise _Damaged(description) from None
      raise CheckpointError(
          f"Could not read checkpoint step {step} in {self.directory}: {description}. Nothing "
          "was taken for damaged or moved; run again once the storage answers.") from None

  def _restore_verified(self, step: int, template_for: Callable[..., PyTree]) -> Restored:
    config, config_digest = self._read_config(step)
    has_digests = (self.directory / str(step) / "digests").exists()
    if config is not None and not has_digests:
      raise _Damaged("its digests are missing")   # both are written by every save since configs
    digests = (self._read(step, {"digests": ocp.args.JsonRestore()}, "its digests").digests
               if has_digests else {})
    if config_digest is not None and digests.get("config") != config_digest:
      # Before the config is used: a flipped digit must not pass for another architecture.
      raise _Damaged("its config differs from the digest written when it was saved")
    template = template_for(config)
    target = jax.tree.map(np.asarray, flax.serialization.to_state_dict(template))
    self._check_shapes(step, target)
    restored = self._read(step, {"state": ocp.args.StandardRestore(target)})
    arrays = jax.tree.map(np.asarray, restored.state)
    if has_digests:
      expected = digests.get("arrays", {})
      actual = array_digests(arrays)
      bad = [name for name in actual if expected.get(name) != actual[name]]
      if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _Damaged(f"array {bad[0]}{more} differs from the digest written when it was saved")
    else:
      logging.warning("Checkpoint step %d in %s has no digests (saved by an older p2p_jax): "
                      "its arrays are restored unverified.", step, self.directory)
    state = flax.serialization.from_state_dict(template, arrays)
    return Restored(state, step, config, ())

  def _check_shapes(self, step: int, target: PyTree) -> None:
    """ConfigError if the checkpoint's arrays are not the template's (other names or shapes:
    a config that is not the run's), so that is never mistaken for damage."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
      metadata = getattr(metadata, "tree", metadata)   # Orbax wraps the tree of ArrayMetadata
      saved = flax.traverse_util.flatten_dict(metadata, sep="/")
    except Exception as error:  # pylint: disable=broad-except
      raise _Damaged(f"its metadata cannot be read ({_describe_read_error(error)[0]})") from None
    wanted = flax.traverse_util.flatten_dict(target, sep="/")
    where = f"Checkpoint step {step} in {self.directory}"
    fix = "the config is not the one it was trained with."
    if set(saved) != set(wanted):
      extra, missing = sorted(set(saved) - set(wanted)), sorted(set(wanted) - set(saved))
      name = (extra or missing)[0]
      raise validation.ConfigError(
          f"{where} {'holds' if extra else 'lacks'} {name}, which this config "
          f"{'does not make' if extra else 'makes'}: {fix}")
    for name, array in wanted.items():
      shape = getattr(saved[name], "shape", None)
      if shape is not None and tuple(shape) != array.shape:
        raise validation.ConfigError(
            f"{where} holds {name} of shape {tuple(shape)}, but this config makes "
            f"{array.shape}: {fix}")

  # ---------------------------------------------------------------- set aside

  def set_aside(self, steps: tuple[int, ...] = ()) -> None:
    """Moves damaged `steps` and every incomplete step folder to `damaged_checkpoints/`.

    For a training, whose next saves must not meet them. Process 0 decides and
    moves (the others' `steps` are ignored); every process then reloads the list
    of steps.
    """
    if self.read_only:
      return
    several = jax.process_count() > 1
    if several:                      # every process is done reading them
      multihost_utils.sync_global_devices("p2p_jax checkpoints read")
    if jax.process_index() == 0:
      aside = workdir_lib.path(self.workdir) / DAMAGED_DIR
      for name in [str(s) for s in steps] + self.incomplete_steps():
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / name
        suffix = 1
        while target.exists():
          target, suffix = aside / f"{name}.{suffix}", suffix + 1
        (self.directory / name).rename(target)
        logging.warning("Moved %s aside to %s (not a checkpoint that verifies); delete it "
                        "when you no longer need it.", self.directory / name, target)
    if several:
      multihost_utils.sync_global_devices("p2p_jax checkpoints set aside")
    self._manager.reload()
    self._complete.clear()


def _config_digest(config: dict[str, Any]) -> str:
  return hashlib.new(_DIGEST, json.dumps(config, sort_keys=True).encode()).hexdigest()


def _first_line(error: BaseException) -> str:
  return validation.first_line(str(error)) or type(error).__name__


_READ_ERROR = re.compile(r'^(?:[A-Z_]+: )?Error reading "([^"/]+)/[^"]*" in [^:]*: (.*)$')
_MISSING = re.compile(r'Metadata at "([^"/]+)/[^"]*" .*does not exist')
_STATUS = re.compile(r"^([A-Z_]{4,}): ")
# TensorStore's codes for files that are missing, short or unreadable: damage. Others
# (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED...) may pass on a second try.
_DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "DATA_LOSS",
                 "INVALID_ARGUMENT")


def _describe_read_error(error: BaseException) -> tuple[str, bool]:
  """(what TensorStore says went wrong, in one line naming the array where it says which;
  whether it says the files are damaged)."""
  text = _first_line(error)
  status = _STATUS.match(text)
  damage = (status.group(1) in _DAMAGE_CODES if status
            else isinstance(error, (FileNotFoundError, json.JSONDecodeError, EOFError)))
  if match := _READ_ERROR.match(text):
    return f"array {match.group(1).replace('.', '/')} cannot be read ({match.group(2)})", damage
  if match := _MISSING.search(str(error)):
    return f"array {match.group(1).replace('.', '/')} is missing", True
  return text, damage
