"""Checks shared by the config's consumers, each raising one message that names the field."""

from __future__ import annotations

from typing import Sequence


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
  """Raises ValueError naming `field` and the valid `choices` unless `value` is one of them."""
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}.")
