"""Checks shared by the config's consumers, each raising one message that names the field."""

from __future__ import annotations

import difflib
from typing import Any, Sequence


class ConfigError(ValueError):
  """A config value that cannot work, or that differs from the run it would continue.

  The message names the field, the value and the fix.
  """


class UsageError(ValueError):
  """A command-line value that cannot work, or a missing optional package.

  The message names the flag or the package and the fix.
  """


def did_you_mean(value: Any, choices: Sequence[str]) -> str:
  """' (did you mean 'batch'?)' for a near miss among `choices` (case aside), else ''."""
  folded = {choice.lower(): choice for choice in choices}
  close = difflib.get_close_matches(str(value).lower(), list(folded), n=1, cutoff=0.6)
  return f" (did you mean {folded[close[0]]!r}?)" if close else ""


def check_choice(field: str, value: Any, choices: Sequence[str], fix: str = "") -> None:
  """Raises ConfigError naming `field`, the valid `choices` and a near miss unless `value` is
  one of them; `fix` is appended (e.g. which flag to pass)."""
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}"
                      f"{did_you_mean(value, choices)}.{' ' + fix if fix else ''}")


def first_line(text: str, limit: int = 300) -> str:
  """The first non-empty line of an error's text (at most `limit` characters), or ''."""
  lines = str(text).strip().splitlines()
  return lines[0][:limit] if lines else ""
