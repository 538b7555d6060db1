"""Edges -> shoes (paper: ~50k images, 15 epochs, batch 4).

  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=runs/edges2shoes
  python -m p2p_jax.main --config=configs/edges2shoes.py:smoke --workdir=/tmp/smoke

The paper gives 15 epochs; they are run at the constant learning rate here
(n_epochs=15, n_epochs_decay=0). The 2.2 GB tarball is downloaded by the
`pix2pix` TFDS builder, or read from --config.data.tfds_manual_dir.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "edges2shoes"
  config.data.direction = "AtoB"
  config.data.eval_split = "val"
  config.batch_size = 4
  config.optim.n_epochs = 15
  config.optim.n_epochs_decay = 0
  config.checkpoint_every_steps = 5000
  default.apply_variant(config, variant)
  return config
