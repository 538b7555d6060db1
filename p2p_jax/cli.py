"""What every program of p2p_jax does the same way: a mistake a user can fix is one line.

`run(main)` is `absl.app.run(main)` with two differences. A flag that cannot be
parsed (an unknown config field, a value of the wrong type) is one line naming
the flag, with a "did you mean"; and an error a user causes and can fix (a
config value, the data, the workdir, a checkpoint, a diverging run) ends the
program with one `Error: ...` line and status 1 instead of a traceback.
`--traceback` (or P2P_JAX_TRACEBACK=1) brings the traceback back.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

_TRACEBACK_FLAG = "traceback"


def define_traceback_flag() -> None:
  if _TRACEBACK_FLAG not in flags.FLAGS:
    flags.DEFINE_bool(_TRACEBACK_FLAG, os.environ.get("P2P_JAX_TRACEBACK", "") == "1",
                      "Show the whole traceback of an error a user can fix (a bad config, "
                      "data, workdir or checkpoint), which is otherwise one line. Also "
                      "P2P_JAX_TRACEBACK=1.")


def tracebacks_wanted() -> bool:
  return bool(flags.FLAGS[_TRACEBACK_FLAG].value) if _TRACEBACK_FLAG in flags.FLAGS else False


def user_errors() -> tuple[type[BaseException], ...]:
  """What a user causes and fixes, said in one line, the fix included."""
  from p2p_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from p2p_jax import monitoring  # pylint: disable=g-import-not-at-top
  from p2p_jax import validation  # pylint: disable=g-import-not-at-top
  from p2p_jax import workdir  # pylint: disable=g-import-not-at-top
  from p2p_jax.datasets import errors  # pylint: disable=g-import-not-at-top
  return (validation.ConfigError, validation.UsageError, errors.DataError, workdir.WorkdirError,
          checkpoints.CheckpointError, monitoring.NonFiniteLossError,
          monitoring.DivergedLossError, FileNotFoundError)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)`, with the one-line errors described above."""
  define_traceback_flag()

  def guarded(argv):
    try:
      return main(argv)
    except user_errors() as error:
      if tracebacks_wanted():
        raise
      exit_with(f"Error: {error}")
    except Exception:  # pylint: disable=broad-except
      import jax  # pylint: disable=g-import-not-at-top
      if jax.process_count() == 1:
        raise
      logging.exception("Process %d failed; exiting.", jax.process_index())
      exit_with("")

  app.run(guarded, flags_parser=_parse_flags)


def exit_with(message: str) -> None:
  """Prints `message` and ends the process at once with status 1.

  The programs' `finally` blocks have closed the checkpoints and flushed the logs.
  Leaving without the exit handlers keeps the end clean: with several processes,
  JAX's would wait on the others (which wait on this one in a collective), and
  collecting what a failed save left behind would print its errors again.
  """
  if message:
    print(message, file=sys.stderr)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    message = str(error)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    if "--traceback" in argv or os.environ.get("P2P_JAX_TRACEBACK", "") == "1":
      raise
    message = describe_override_error(error, argv)
  print(f"Error: {message} (--helpfull lists the flags; configs/default.py every config "
        "field.)", file=sys.stderr)
  sys.exit(2)


def describe_override_error(error: BaseException, argv: list[str]) -> str:
  """One line for what ml_collections raises on `--config.a.b=v`: which flag, and the near miss."""
  text = str(error).encode().decode("unicode_escape").replace("\\'", "'")
  name = re.search(r"'(\w+)'", text)
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  overrides = [arg for arg in argv if arg.startswith("--config.")]
  flag = next((arg for arg in overrides if name and re.search(
      rf"[.]{re.escape(name.group(1))}(?:[.=]|$)", arg.split("=")[0] + "=")), None)
  if flag and name:
    parts = flag.split("=")[0][2:].split(".")
    parent = ".".join(parts[:parts.index(name.group(1))])
    near = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
    return f"{flag}: {parent} has no field {name.group(1)!r}{near}"
  return f"{' '.join(overrides) or 'the flags'}: {text.strip().splitlines()[0]}"
