"""Facades, labels -> photo (paper: 400 images, 200 epochs, batch 1).

  python -m p2p_jax.main --config=configs/facades.py --workdir=runs/facades

The official tarball is downloaded by the `pix2pix` TFDS builder (or put
facades.tar.gz in --config.data.tfds_manual_dir). Its files are photo|labels,
so labels -> photo is BtoA.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "facades"
  config.data.direction = "BtoA"
  config.data.eval_split = "test"
  config.batch_size = 1
  config.optim.n_epochs = 100
  config.optim.n_epochs_decay = 100
  default.apply_variant(config, variant)
  return config
