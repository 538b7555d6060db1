"""The demo: labels -> facade photos on the embedded synthetic data, under 10 minutes on a 2-core CPU.

  python -m p2p_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m p2p_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval

The paper's model and losses at 64x64 (a 6-level U-Net, ngf = ndf = 32) on the
synthetic labels2facades task, the embedded counterpart of the paper's facades:
no download, and after 3,000 steps (about 15 steps/s on an idle 2-core CPU) the
outputs show walls, windows, balconies, doors and roofs where the labels put
them. `--config.data.name=edges2objects` trains the edges -> objects task.

It evaluates in the deterministic test mode (BatchNorm's running statistics):
trained at batch 8, the generator's normalisation layers have seen batch
statistics of 8 images, which the running statistics follow and a single
image's own statistics (the paper's test mode, which matches its batch-1
training) do not; with them the walls come out in patches of two or three
colours. `--config.eval.deterministic=False` shows the paper's mode.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.data.source = "synthetic"
  config.data.name = "labels2facades"
  config.data.load_size = 72
  config.data.crop_size = 64
  config.data.num_train_examples = 4000
  config.data.num_eval_examples = 64
  config.data.cache = "memory"   # 98 MB: after the first epoch no pair is drawn again
  config.batch_size = 8
  config.model.num_downs = 6
  config.model.ngf = 32
  config.model.ndf = 32
  config.num_train_steps = 3000
  config.log_every_steps = 100
  config.image_every_steps = 500
  config.checkpoint_every_steps = 500
  config.eval.save_images = 16
  config.eval.deterministic = True   # matches batch-8 training; see the docstring
  default.apply_variant(config, variant)
  return config
