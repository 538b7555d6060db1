"""What the train loop watches: the losses of the logging window, and stop requests."""

from __future__ import annotations

import logging as pylogging
import os
import signal
import threading
import time
import traceback
from typing import Any

import jax
import numpy as np
from absl import logging

from p2p_jax import validation


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or Inf; training stopped before saving the bad state."""


class DivergedLossError(FloatingPointError):
  """A loss grew past config.max_loss; training stopped before saving the state."""


_LOSSES = ("G_GAN", "G_L1", "D_real", "D_fake")    # the metrics `max_loss` bounds


class MetricWindow:
  """Per-step metrics kept on the device until they are needed.

  Fetching them only when logging or before a checkpoint keeps the host from
  waiting on every step; checking them before each save means a NaN step is
  never written over the last good checkpoint.
  """

  def __init__(self):
    self._pending: list[tuple[int, Any]] = []

  def add(self, step: int, metrics: Any) -> None:
    self._pending.append((step, metrics))

  def check_finite(self, last_good_step: int | None, max_loss: float = 0.0) -> None:
    """Raises NonFiniteLossError naming the first bad step and loss, or DivergedLossError
    for the first loss above `max_loss` (> 0; 0 checks only for NaN and Inf)."""
    kept = ("no checkpoint was written yet" if last_good_step is None
            else f"the last good checkpoint (step {last_good_step}) is kept")
    for step, metrics in self._fetch():
      bad = {name: value for name, value in metrics.items() if not np.isfinite(value)}
      if bad:
        losses = ", ".join(f"{name}={value}" for name, value in sorted(bad.items()))
        raise NonFiniteLossError(
            f"Non-finite loss at step {step}: {losses}. Training stopped; {kept}. Lower "
            f"config.optim.learning_rate, or check the data for broken images.")
      large = {name: value for name, value in metrics.items()
               if max_loss > 0 and name in _LOSSES and value > max_loss}
      if large:
        losses = ", ".join(f"{name}={value:.4g}" for name, value in sorted(large.items()))
        raise DivergedLossError(
            f"Loss above config.max_loss={max_loss:g} at step {step}: {losses}; the run is "
            f"diverging. Training stopped; {kept}. Lower config.optim.learning_rate, or raise "
            "--config.max_loss (0 turns the bound off) if such losses are expected.")

  def average(self) -> dict[str, float]:
    """Mean of each metric over the window, which then starts afresh."""
    fetched = self._fetch()
    self._pending = []
    if not fetched:
      return {}
    names = fetched[0][1].keys()
    return {name: float(np.mean([m[name] for _, m in fetched])) for name in names}

  def _fetch(self) -> list[tuple[int, dict[str, float]]]:
    host = jax.device_get([metrics for _, metrics in self._pending])
    # Metrics come from pmap, already averaged over replicas: take the first copy.
    self._pending = [(step, {k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()})
                     for (step, _), m in zip(self._pending, host)]
    return self._pending


def format_duration(seconds: float) -> str:
  """'12s', '5m08s', '2h05m', '3d04h': two units at most, for logs a person reads."""
  seconds = max(0, int(round(seconds)))
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f"{days}d{hours:02d}h"
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
  """A progress line every `every_seconds`: step, steps/s, images/s and the time left.

  The rate is that of every step since the first one this run made (which
  compiles, and is not counted), so the estimate settles and then falls
  steadily instead of jumping with each window's noise. The rate also goes to
  the writer as `steps_per_sec`.
  """

  def __init__(self, first_step: int, num_steps: int, batch_size: int, writer: Any,
               every_seconds: float = 60.0, clock=time.monotonic):
    self._num_steps, self._batch_size = num_steps, batch_size
    self._writer, self._every, self._clock = writer, every_seconds, clock
    self._start_step, self._start_time = first_step, None
    self._last_report = None

  def __call__(self, step: int) -> str | None:
    """Call after each step; returns the line when one was logged."""
    now = self._clock()
    if self._start_time is None:           # the first step: compiled, timed from here
      self._start_step, self._start_time, self._last_report = step, now, now
      return None
    if now - self._last_report < self._every and step != self._num_steps:
      return None
    self._last_report = now
    rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
    left = (self._num_steps - step) / rate if rate > 0 else float("inf")
    line = (f"step {step:,}/{self._num_steps:,} ({100 * step / self._num_steps:.1f}%): "
            f"{rate:.2f} steps/s, {rate * self._batch_size:.1f} images/s, "
            f"{format_duration(left)} left")
    logging.info("%s", line)
    self._writer.write_scalars(step, {"steps_per_sec": rate})
    return line

  def rate(self, step: int) -> float | None:
    """Steps per second since the first step, or None before a second one."""
    if self._start_time is None or step <= self._start_step:
      return None
    return (step - self._start_step) / max(self._clock() - self._start_time, 1e-9)


class StopRequest:
  """Turns SIGTERM (a scheduler's or a preemption notice) into a flag the loop checks,
  so the loop can write a checkpoint and exit cleanly instead of dying mid-step."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.requested = False
    self._previous = {}
    if jax.process_count() > 1:
      # JAX's preemption service takes SIGTERM there and makes every process stop
      # at the same step (Checkpointer.reached_preemption); a handler of our own
      # would let processes stop at different steps and hang in a collective.
      signals = ()
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


# Orbax warns of what a reader asked for: eval and predict open checkpoints read-only.
_ORBAX_NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


class _LibraryInfoFilter(pylogging.Filter):
  """Drops the INFO chatter of Orbax (a dozen lines per save) and JAX's backend probing, and
  (unless asked to keep them) the tracebacks Orbax's threads log for an error they pass on."""
  _NOISY = (f"{os.sep}orbax{os.sep}", "xla_bridge.py", "signaling_client.py")
  _ORBAX = f"{os.sep}orbax{os.sep}"

  def __init__(self, keep_tracebacks: bool = False):
    super().__init__()
    self.keep_tracebacks = keep_tracebacks

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.exc_info and not self.keep_tracebacks and self._from_orbax(record):
      # The error also reaches the caller, which says it in one line: keep the first
      # line of Orbax's message, without the traceback of its thread.
      record.msg, record.args = validation.first_line(record.getMessage()), None
      record.exc_info = record.exc_text = None
    if self._ORBAX in record.pathname and record.getMessage().startswith(_ORBAX_NOTICES):
      return False
    return record.levelno >= pylogging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


  def _from_orbax(self, record: pylogging.LogRecord) -> bool:
    # Also asyncio's "Task exception was never retrieved" for a write Orbax abandoned.
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info[2] else []
    return self._ORBAX in record.pathname or any(self._ORBAX in f.filename for f in frames)


def quiet_library_logs(keep_tracebacks: bool = False) -> None:
  """Keeps the console to this project's messages and every library's warnings.

  Errors that Orbax's background threads log with a traceback and then hand to
  the caller (a failed save) are left to the caller, unless `keep_tracebacks`.
  """
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, _LibraryInfoFilter)]:
    handler.removeFilter(old)
  handler.addFilter(_LibraryInfoFilter(keep_tracebacks))
