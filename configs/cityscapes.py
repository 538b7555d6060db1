"""Cityscapes, labels -> photo (paper: 2,975 images, 200 epochs, batch 1).

  python -m p2p_jax.main --config=configs/cityscapes.py --workdir=runs/cityscapes

Files are photo|labels: labels -> photo is BtoA (pass --config.data.direction=AtoB
for photo -> labels). There is no test split: eval uses val.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "cityscapes"
  config.data.direction = "BtoA"
  config.data.eval_split = "val"
  config.batch_size = 1
  config.optim.n_epochs = 100
  config.optim.n_epochs_decay = 100
  default.apply_variant(config, variant)
  return config
