"""What the train loop watches: the losses of the logging window, and stop requests."""

from __future__ import annotations

import logging as pylogging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging


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


class _LibraryInfoFilter(pylogging.Filter):
  """Drops the INFO chatter of Orbax (a dozen lines per save) and JAX's backend probing."""
  _NOISY = (f"{os.sep}orbax{os.sep}", "xla_bridge.py", "signaling_client.py")

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def quiet_library_logs() -> None:
  """Keeps the console to this project's messages and every library's warnings."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())
