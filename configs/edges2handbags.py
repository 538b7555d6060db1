"""Edges -> handbags (paper: ~137k images, 15 epochs, batch 4).

  python -m p2p_jax.main --config=configs/edges2handbags.py --workdir=runs/edges2handbags

As edges2shoes: 15 epochs at the constant learning rate.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "edges2handbags"
  config.data.direction = "AtoB"
  config.data.eval_split = "val"
  config.batch_size = 4
  config.optim.n_epochs = 15
  config.optim.n_epochs_decay = 0
  config.checkpoint_every_steps = 5000
  default.apply_variant(config, variant)
  return config
