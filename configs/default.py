"""Every setting of p2p_jax with its default: the paper's pix2pix.

Dataset configs import this and change only what differs. Any field can be
overridden on the command line, e.g. `--config.batch_size=4`; an unknown field
is an error that names it.

  python -m p2p_jax.main --config=configs/default.py --workdir=runs/default
  python -m p2p_jax.main --config=configs/default.py:smoke --workdir=/tmp/smoke
  python -m p2p_jax.main --config=configs/default.py:ablation=1,loss=l1 --workdir=runs/l1
"""

import ml_collections

from p2p_jax import variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                        # PRNG seed for init, dropout and data order
  config.batch_size = 1                  # global batch, split evenly over all devices
  config.num_train_steps = -1            # > 0: train this many steps instead of the epochs
  config.log_every_steps = 100           # train losses are averaged over this window
  config.checkpoint_every_steps = 1000   # Orbax checkpoint interval (the last step is always saved)
  config.keep_checkpoints = 3            # how many checkpoints to keep
  config.image_every_steps = 500         # input | output | target image summaries (0: never)
  config.eval_every_steps = 0            # validation (L1, PSNR, SSIM) during training (0: never)
  config.max_loss = 1e4                  # stop (before a save) when a loss exceeds this (0: never)

  config.data = data = ml_collections.ConfigDict()
  data.source = "synthetic"              # synthetic | folder | tfds
  data.name = "edges2objects"            # synthetic task, or tfds config (facades, maps, ...)
  data.dir = ""                          # folder source: root of {train,val,test}/ or {train,test}/{A,B}/
  data.tfds_data_dir = ""                # tfds source: TFDS data_dir ("" = TFDS default)
  data.tfds_manual_dir = ""              # tfds source: folder holding NAME.tar.gz (no download then)
  data.direction = "AtoB"                # AtoB | BtoA: which half is the input
  data.preprocess = "resize_and_crop"    # resize_and_crop | crop | scale_width | scale_width_and_crop | none
  data.load_size = 286                   # resize to this before cropping (jitter)
  data.crop_size = 256                   # training crop, and the eval resize
  data.no_flip = False                   # True: no random horizontal flip
  data.train_split = "train"
  data.eval_split = "test"               # split for eval mode and validation
  data.shuffle_buffer = 1024             # tfds source only (synthetic/folder shuffle whole epochs)
  data.skip_bad_images = False           # True: skip unreadable images and report them
  data.num_train_examples = 2000         # synthetic source: examples in the train split
  data.num_eval_examples = 100           # synthetic source: examples in val/test
  data.prefetch_to_device = 2            # batches kept ready on the devices
  data.cache = ""                        # "memory" or a file: keep the decoded train pairs after epoch 1
  data.service_address = ""              # grpc://HOST:PORT of a tf.data service dispatcher ("" = decode here)

  config.model = model = ml_collections.ConfigDict()
  model.input_nc = 3                     # channels of the input image (1 or 3)
  model.output_nc = 3                    # channels of the generated image (1 or 3)
  model.generator = "unet"               # U-Net; see skip_connections for the encoder-decoder
  model.num_downs = 8                    # U-Net levels: 8 = unet_256, 7 = unet_128
  model.ngf = 64                         # generator width at the outermost level
  model.skip_connections = True          # False: the paper's encoder-decoder ablation
  model.dropout_rate = 0.5               # the paper's noise z; 0 turns it off
  model.dropout_placement = "pytorch"    # pytorch (4/8/16 px) | paper (2/4/8 px, as the Lua code)
  model.disc_type = "patch"              # patch | pixel (1x1 PixelGAN)
  model.n_layers_d = 3                   # PatchGAN depth: 1 -> 16x16, 3 -> 70x70, 5 -> 286x286
  model.ndf = 64                         # discriminator width of the first layer
  model.conditional_d = True             # False: D sees only the image (the "GAN" ablation)
  model.norm = "batch"                   # batch | instance | none
  model.sync_batch_norm = True           # average BatchNorm statistics over all devices
  # Forms of the same layers (same parameters and results), chosen for speed; auto is
  # by_shape (per-layer forms tuned on XLA:CPU) on the CPU and XLA's own on GPU/TPU:
  model.upconv_impl = "auto"             # ConvTranspose: auto | by_shape | subpixel | dilated (XLA's)
  model.conv_impl = "auto"               # Conv 4x4: auto | by_shape | xla
  model.dtype = "float32"                # compute dtype: float32 | bfloat16 (params stay float32)

  config.loss = loss = ml_collections.ConfigDict()
  loss.gan_mode = "vanilla"              # vanilla (sigmoid cross-entropy) | lsgan
  loss.lambda_l1 = 100.0                 # weight of the L1 term (0: no L1)
  loss.lambda_gan = 1.0                  # weight of the adversarial term (0: "L1 only")

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4             # Adam, for both G and D
  optim.beta1 = 0.5
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.n_epochs = 100                   # epochs at the initial learning rate
  optim.n_epochs_decay = 100             # epochs of linear decay to zero

  config.eval = ev = ml_collections.ConfigDict()
  ev.step = -1                           # checkpoint step to evaluate (-1: the latest)
  ev.deterministic = False               # True: running BN statistics, no dropout (official --eval)
  ev.batch_size = 8                      # images per eval batch (each still normalised alone)
  ev.num_images = -1                     # images of the split to evaluate (-1: all)
  ev.save_images = 50                    # images written to eval/step_N/images (-1: all)
  ev.lpips = "alexnet"                   # LPIPS net: alexnet | vgg16 | "" (off); requirements-eval.txt
  ev.color_stats = True                  # RGB outputs: Lab colour histograms and chroma vs the targets (paper Fig. 7)
  ev.fcn_score = False                   # data with class maps (synthetic labels2facades): FCN-score of the outputs
  ev.fcn_scorer_dir = ""                 # where the FCN scorer is trained once and cached ("" = WORKDIR/fcn_scorer)
  ev.fcn_scorer_steps = 500              # FCN scorer training steps (16 x 64 x 64 pixels each)

  if variant:
    apply_variant(config, variant)
  return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Applies `:variant` arguments: comma-separated, in order, freely combined.

  smoke            the same code path at tiny sizes (32x32 images, a 5-level
                   U-Net with ngf = ndf = 8, 4 steps), seconds on a CPU. A config
                   whose data must be downloaded (tfds) reads the synthetic
                   stand-in of the same kind instead, so `:smoke` never needs the
                   network.
  ablation=TABLE   the CPU-budget base of `python -m p2p_jax.ablate --table=TABLE`:
                   synthetic labels2facades (400 train, 100 test images), a U-Net
                   with ngf = ndf = 32, batch 8; tables 1 and 2 at 64x64 (6 levels,
                   3,000 steps), table 3 at 128x128 (7 levels, 2,000 steps), where
                   the 286x286 discriminator has an output.
  bf16             mixed precision: activations and matmul/convolution operands in
                   bfloat16; parameters, optimiser state, BatchNorm statistics,
                   sums and losses in float32 (model.dtype=bfloat16).
  loss=NAME, generator=NAME, disc=SIZE
                   the paper's ablations (Tables 1-3), see `p2p_jax.variants`.

  E.g. `--config=configs/default.py:smoke,loss=l1,disc=16`.
  """
  for item in filter(None, (part.strip() for part in variant.split(","))):
    key, _, value = item.partition("=")
    if item == "smoke":
      _apply_smoke(config)
    elif item == "bf16":
      config.model.dtype = "bfloat16"
    elif key == "ablation" and value in ("1", "2", "3"):
      _apply_ablation_base(config, int(value))
    elif variants.is_ablation(item):
      variants.apply(config, item)
    else:
      raise ValueError(f"Unknown config variant {item!r}; known: smoke, bf16, "
                       f"ablation={{1|2|3}}, {variants.KNOWN}.")


def _apply_ablation_base(config: ml_collections.ConfigDict, table: int) -> None:
  config.data.source = "synthetic"
  config.data.name = "labels2facades"
  config.data.num_train_examples = 400
  config.data.num_eval_examples = 100
  config.batch_size = 8
  config.model.ngf = 32
  config.model.ndf = 32
  if table == 3:
    config.data.crop_size, config.data.load_size, config.model.num_downs = 128, 144, 7
    config.num_train_steps = 2000
  else:
    config.data.crop_size, config.data.load_size, config.model.num_downs = 64, 72, 6
    config.num_train_steps = 3000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.image_every_steps = 1000
  config.eval.save_images = 8


def _apply_smoke(config: ml_collections.ConfigDict) -> None:
  config.batch_size = 8
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.image_every_steps = 2
  if config.data.source == "tfds":
    labels_task = config.data.name in ("facades", "cityscapes")
    config.data.source = "synthetic"
    config.data.name = "labels2facades" if labels_task else "edges2objects"
    config.data.direction = "AtoB"
  config.data.preprocess = "resize_and_crop"
  config.data.load_size = 36
  config.data.crop_size = 32
  config.data.num_train_examples = 32
  config.data.num_eval_examples = 8
  config.data.shuffle_buffer = 32
  config.model.num_downs = 5
  config.model.ngf = 8
  config.model.ndf = 8
  config.eval.batch_size = 8
  config.eval.save_images = 4
  config.eval.fcn_scorer_steps = 20   # seconds, not minutes: scores mean little at this size
