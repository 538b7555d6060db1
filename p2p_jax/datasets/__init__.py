"""Where paired images come from, before the input pipeline batches them.

  errors        DataError, raised for any bad input with the file it concerns
  sources       the three sources behind one interface (synthetic, folder, tfds)
  synthetic     the embedded synthetic tasks, rendered on the fly (numpy only)
  folder        image folders in the official A|B or the A/ B/ layout
  pix2pix_tfds  the `pix2pix` TensorFlow Datasets builder (importing it registers it)
  preprocess    the paper's jitter and resizing, on one example
"""

from p2p_jax.datasets.errors import DataError

__all__ = ["DataError"]
