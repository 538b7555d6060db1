"""`DataError`: the one exception for bad input data, naming the file and what is wrong."""

from __future__ import annotations


class DataError(ValueError):
  """One bad input (an image file, a folder, a split): the path and what is wrong with it.

  Raised with a plain message instead of whatever the decoder threw, so that a
  user sees which file to fix or remove, e.g.
  `DataError: data/facades/train/12.jpg: corrupt or truncated image (...)`.
  """

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = reason

  def __reduce__(self):   # picklable, so it crosses process and thread boundaries intact
    return type(self), (self.path, self.reason)
