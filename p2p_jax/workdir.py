"""The run directory: its config and history, its lock, and what it says when it is not writable.

A workdir holds one training run:

  config.json, config.yaml   the config of its newest checkpoint (each checkpoint also
                             carries its own, see `checkpoints`)
  config_history.jsonl       one line per training that saved checkpoints here: the step
                             it started from and the settings it changed
  train.lock                 while a training runs: its host, pid and start time
  checkpoints/  eval/  events.out.tfevents.*

`config.json` is written only by a training that got as far as its first save
(or by `convert_torch`), so a run refused at validation or failed before its
first checkpoint leaves the workdir as it was.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from p2p_jax import validation

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "train.lock"

# A lock on a cloud workdir (no file locks there) whose holder has not refreshed it
# for this long is taken as left behind by a job that is gone.
REMOTE_LOCK_STALE_SECONDS = 600.0
_REMOTE_LOCK_REFRESH_SECONDS = 60.0


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked: in use by another job, not writable, full.

  The message is one line that names the directory and the fix.
  """


def path(workdir: str) -> epath.Path:
  """A local path (made absolute) or a cloud one such as gs://bucket/run."""
  return epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir))


def is_remote(workdir: str) -> bool:
  return "://" in str(workdir)


# ----------------------------------------------------------------------------- errors


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL_WORDS = ("no space left", "quota exceeded", "file too large")
_READ_ONLY_WORDS = ("read-only file system", "permission denied", "access denied", "forbidden")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")   # how TensorStore passes errno on


def describe_write_error(error: BaseException, where: str) -> str | None:
  """One line saying that `where` is full or not writable, with the fix; None for other errors.

  Looks through the exception's chain, and for errors that come through
  TensorStore's or a cloud client's threads, through their text.
  """
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  for item in seen:
    text = str(item)
    code = getattr(item, "errno", None)
    if code is None and (match := _OS_ERROR_CODE.search(text)):
      code = int(match.group(1))
    reason = os.strerror(code) if code else _first_line(item)
    if code in _FULL or any(word in text.lower() for word in _FULL_WORDS):
      return (f"{where} is full ({reason}): free space there, or pass a --workdir on a disk "
              "with room")
    if code in _READ_ONLY or any(word in text.lower() for word in _READ_ONLY_WORDS):
      return (f"{where} is not writable ({reason}): pass a --workdir you can write to, or fix "
              "its permissions")
  return None


def _first_line(error: BaseException) -> str:
  return validation.first_line(str(error), 200) or type(error).__name__


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and writes a probe there; WorkdirError if that fails."""
  root = path(workdir)
  probe = root / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe.write_text("p2p_jax")
    probe.unlink()
  except OSError as error:
    message = describe_write_error(error, str(workdir))
    raise WorkdirError(f"{message}." if message else
                       f"Cannot write to {workdir}: {_first_line(error)}.") from error


# ----------------------------------------------------------------------------- config files


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, old value, new value) for every leaf in which two config dicts differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for key in sorted(set(old) | set(new))
            for d in config_differences(old.get(key), new.get(key), f"{prefix}.{key}".lstrip("."))]
  return [] if old == new else [(prefix, old, new)]


def as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists), as it is saved."""
  return json.loads(config.to_json())


def has_config(workdir: str) -> bool:
  return (path(workdir) / CONFIG_FILE).exists()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the newest checkpoint a training saved in `workdir`."""
  config_path = path(workdir) / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(
        f"{config_path} does not exist: {workdir} holds no p2p_jax run. Train into it first "
        f"(python -m p2p_jax.main --config=... --workdir={workdir}) or convert weights into it "
        f"(python -m p2p_jax.convert_torch ... --workdir={workdir}).")
  return ml_collections.ConfigDict(json.loads(config_path.read_text()))


def save_config(config: ml_collections.ConfigDict, workdir: str, *, start_step: int = 0) -> None:
  """Writes `config` as the workdir's config (JSON, read back by `load_config`, and YAML).

  A line goes to config_history.jsonl: when, from which step, and the fields that
  differ from the config.json it replaces (all of them for the first).
  """
  root = path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  new = as_dict(config)
  old = json.loads((root / CONFIG_FILE).read_text()) if has_config(workdir) else None
  if old is not None and old == new:
    return
  entry = {"time": _now(), "host": socket.gethostname(), "start_step": start_step}
  if old is None:
    entry["config"] = new
  else:
    entry["changed"] = {field: [before, after]
                        for field, before, after in config_differences(old, new)}
  for name, text in ((CONFIG_FILE, json.dumps(new, indent=2, sort_keys=True)),
                     ("config.yaml", config.to_yaml())):
    tmp = root / (name + ".tmp")
    tmp.write_text(text)
    tmp.replace(root / name)
  history = root / HISTORY_FILE
  previous = history.read_text() if history.exists() else ""
  tmp = root / (HISTORY_FILE + ".tmp")
  tmp.write_text(previous + json.dumps(entry, sort_keys=True) + "\n")
  tmp.replace(history)


def history(workdir: str) -> list[dict[str, Any]]:
  """The entries of config_history.jsonl, oldest first."""
  history_path = path(workdir) / HISTORY_FILE
  if not history_path.exists():
    return []
  return [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]


MODEL_FIELDS = ("model.", "data.crop_size")   # what a checkpoint's arrays depend on
# ... but for these, which choose how a step computes, not what a checkpoint holds (float32
# parameters, statistics and optimiser state in every dtype; one set of parameters for every
# form): a run may resume, and a checkpoint be evaluated, under other values.
COMPUTE_FIELDS = ("model.dtype", "model.conv_impl", "model.upconv_impl")


def check_same_run(config: ml_collections.ConfigDict, saved: dict[str, Any] | None,
                   workdir: str, *, fields: tuple[str, ...] = MODEL_FIELDS,
                   ignore: tuple[str, ...] = COMPUTE_FIELDS, hint: str = "") -> None:
  """Refuses to go on with a run in `workdir` saved under other settings than `config`'s.

  Compares `saved` (a saved config as a dict; None: nothing to compare) with
  `config` in the fields that start with one of `fields` (empty: every field)
  and with none of `ignore` (default: `COMPUTE_FIELDS`; an `ignore` given
  replaces them); raises a ConfigError naming the first that differs, both
  values, and `hint` (default: pass the saved value or use a new workdir).
  """
  if saved is None:
    return
  for field, old, new in config_differences(saved, as_dict(config)):
    if (fields and not field.startswith(fields)) or (ignore and field.startswith(ignore)):
      continue
    fix = hint or f"Use a new --workdir, or pass --config.{field}={old!r}."
    raise validation.ConfigError(f"{workdir} holds a run with config.{field}={old!r}, but this "
                                 f"config says {new!r}. {fix}")


def compute_changes(config: ml_collections.ConfigDict, saved: dict[str, Any] | None
                    ) -> list[tuple[str, Any, Any]]:
  """(field, saved value, config's value) for each of `COMPUTE_FIELDS` in which `config`
  differs from `saved` (a saved config as a dict; None: none)."""
  if saved is None:
    return []
  return [difference for difference in config_differences(saved, as_dict(config))
          if difference[0].startswith(COMPUTE_FIELDS)]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
  """'model.dtype bfloat16 -> float32, ...' for `compute_changes`' list."""
  return ", ".join(f"{field} {old} -> {new}" for field, old, new in changes)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the lock


class TrainLock:
  """One training job per workdir, held from before the first write until the job ends.

  On a local or network file system the lock is `fcntl.flock` on `train.lock`,
  which the kernel releases when the holder's process ends however it ends, so a
  lock left by a killed job is taken over at once (with a warning naming it).
  The file holds the holder's host, pid and start time, for the refusal message.

  Cloud storage (gs://), and a file system without flock (Lustre mounted without
  it, say), have no file locks: there the file itself is the lock and its holder
  rewrites it every minute. A lock rewritten in the last two minutes is a live
  job's: refused. One older than that is waited for until it is
  `REMOTE_LOCK_STALE_SECONDS` old and then taken over, unless it is rewritten
  meanwhile; so a job restarted after a preemption waits at most that long. Two
  jobs that start within the same few seconds can both pass the check.
  """

  def __init__(self, workdir: str, *, stale_seconds: float = REMOTE_LOCK_STALE_SECONDS,
               refresh_seconds: float = _REMOTE_LOCK_REFRESH_SECONDS):
    self.workdir = workdir
    self.file = path(workdir) / LOCK_FILE
    self._stale_seconds, self._refresh_seconds = stale_seconds, refresh_seconds
    self._fd: int | None = None
    self._stop = threading.Event()
    self._refresher: threading.Thread | None = None
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                    "token": uuid.uuid4().hex}

  def __enter__(self) -> "TrainLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirError naming the job that holds it (or saying why the
    lock cannot be taken)."""
    check_writable(self.workdir)
    try:
      previous = None if is_remote(self.workdir) else self._acquire_local()
      if previous is None:        # no file locks here
        previous = self._acquire_by_file()
    except OSError as error:
      message = describe_write_error(error, str(self.file))
      raise WorkdirError(f"{message}." if message else
                         f"Cannot take the lock {self.file}: {_first_line(error)}.") from error
    if previous:
      logging.warning("Took over %s from a job that is gone (%s).", self.file,
                      _describe_holder(previous))

  def release(self) -> None:
    if self._refresher is not None:
      self._stop.set()
      self._refresher.join()
      self._refresher = None
      try:
        if _read_json(self.file.read_text()).get("token") == self._holder["token"]:
          self.file.unlink()
      except OSError:
        pass
    if self._fd is not None:
      try:
        self.file.unlink()        # while still holding it: the next job makes a new file
      except OSError:
        pass
      os.close(self._fd)
      self._fd = None

  def _refuse(self, holder: dict[str, Any]) -> None:
    raise WorkdirError(
        f"{self.workdir} is in use by another training job ({_describe_holder(holder)}). "
        "Wait for it to end or stop it; to train beside it, pass another --workdir. "
        f"If no such job runs, delete {self.file}.")

  def _acquire_local(self) -> dict[str, Any] | None:
    """flock; the previous holder's record ({} if none). None where flock is not supported."""
    while True:
      fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_json(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        os.close(fd)
        self._refuse(holder or {"host": "?", "pid": "?", "started": "?"})
      except OSError as error:
        os.close(fd)
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          logging.warning("%s: no file locks here (%s); locking by the file's contents.",
                          self.file, os.strerror(error.errno))
          return None
        raise
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.file).st_ino
      except FileNotFoundError:    # its holder removed it as it ended: open the next one
        same_file = False
      if same_file:
        break
      os.close(fd)
    previous = _read_json(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._holder).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return previous

  def _acquire_by_file(self) -> dict[str, Any]:
    previous = self._read_holder()
    while previous and previous.get("token") != self._holder["token"]:
      age = time.time() - previous.get("refreshed", 0.0)
      if age >= self._stale_seconds:
        break
      if age < 2 * self._refresh_seconds:
        self._refuse(previous)
      wait = self._stale_seconds - age
      logging.warning("%s was last rewritten %s ago by %s; if that job is gone it goes stale "
                      "in %s: waiting.", self.file, _seconds(age), _describe_holder(previous),
                      _seconds(wait))
      time.sleep(min(wait, self._refresh_seconds))
      previous = self._read_holder()
    self._write_remote()
    self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                       name="p2p_jax-lock-refresh")
    self._refresher.start()
    return previous

  def _read_holder(self) -> dict[str, Any]:
    return _read_json(self.file.read_text()) if self.file.exists() else {}

  def _write_remote(self) -> None:
    self._holder["refreshed"] = time.time()
    self.file.write_text(json.dumps(self._holder))

  def _refresh(self) -> None:
    while not self._stop.wait(self._refresh_seconds):
      try:
        self._write_remote()
      except Exception as error:  # pylint: disable=broad-except  # a blip: try next time
        logging.warning("Could not refresh %s: %s", self.file, error)


def _seconds(seconds: float) -> str:
  return f"{seconds:.0f} s"


def _read_json(text: str) -> dict[str, Any]:
  try:
    value = json.loads(text)
  except ValueError:
    return {}
  return value if isinstance(value, dict) else {}


def _describe_holder(holder: dict[str, Any]) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")
