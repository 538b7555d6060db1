"""Maps, aerial photo -> map (paper: 1,096 images, 200 epochs, batch 1).

  python -m p2p_jax.main --config=configs/maps.py --workdir=runs/maps

Files are aerial|map at 600x600 per half, resized to 286 and cropped to 256 as
in the paper. --config.data.direction=BtoA trains map -> aerial.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "maps"
  config.data.direction = "AtoB"
  config.data.eval_split = "val"
  config.batch_size = 1
  config.optim.n_epochs = 100
  config.optim.n_epochs_decay = 100
  default.apply_variant(config, variant)
  return config
