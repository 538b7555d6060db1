"""Day -> night (paper: 17,823 images, 17 epochs, batch 4).

  python -m p2p_jax.main --config=configs/night2day.py --workdir=runs/night2day

Files are night|day, so the paper's day -> night is BtoA.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "night2day"
  config.data.direction = "BtoA"
  config.data.eval_split = "test"
  config.batch_size = 4
  config.optim.n_epochs = 17
  config.optim.n_epochs_decay = 0
  config.checkpoint_every_steps = 2000
  default.apply_variant(config, variant)
  return config
