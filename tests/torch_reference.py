"""A PyTorch pix2pix training iteration, written to match the authors' code numerically.

The tests run one step of this module and one step of `p2p_jax.step` from the same weights
and the same batch, and compare losses, gradients, updated weights and BatchNorm statistics.

What it reproduces (pytorch-CycleGAN-and-pix2pix, `--model pix2pix --netG unet_<N>
--netD basic --norm batch --gan_mode vanilla --lambda_L1 100`):

* Generator: a U-Net with `num_downs` 4x4 stride-2 convolutions. Down level 0 is a bare
  convolution of the input; each deeper level is LeakyReLU(0.2) -> conv -> BatchNorm, except
  the innermost, which has no norm. Going up, the innermost level's transposed convolution
  reads ReLU(innermost features); every other level's reads ReLU(cat([skip, upsampled])),
  where skip is that level's down output. Every transposed convolution is followed by
  BatchNorm, except the outermost, which has a bias and a tanh. The levels of width 8*ngf
  between the innermost one and the four outer ones add Dropout after their norm. No
  convolution followed by BatchNorm has a bias.
* Discriminator: the 70x70 PatchGAN (n_layers 3) on cat([A, B]) channels.
* Weights N(0, 0.02), biases 0, BatchNorm scales N(1, 0.02), offsets 0.
* One iteration: fake = G(A); D step on 0.5 * (BCE(D(A, fake.detach()), 0) + BCE(D(A, B), 1))
  as two forward passes (fake first); then, with D frozen, G step on
  BCE(D(A, fake), 1) + 100 * L1(fake, B). Both nets stay in train mode throughout, so D's
  running statistics move three times per iteration.
"""

import argparse
import math
import time

import torch
from torch import nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.2


def random_batch(batch: int, side: int, seed: int = 0):
  """A pair (real_a, real_b) of NCHW float32 tensors, uniform in [-1, 1]."""
  generator = torch.Generator().manual_seed(seed)
  shape = (batch, 3, side, side)
  real_a = torch.rand(shape, generator=generator) * 2 - 1
  real_b = torch.rand(shape, generator=generator) * 2 - 1
  return real_a, real_b


def _official_init(module: nn.Module):
  """The authors' `init_weights(net, 'normal', 0.02)` for one module."""
  if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
    nn.init.normal_(module.weight, 0.0, 0.02)
    if module.bias is not None:
      nn.init.zeros_(module.bias)
  elif isinstance(module, nn.BatchNorm2d):
    nn.init.normal_(module.weight, 1.0, 0.02)
    nn.init.zeros_(module.bias)


def _conv(cin, cout, stride=2, bias=False):
  return nn.Conv2d(cin, cout, kernel_size=4, stride=stride, padding=1, bias=bias)


def _conv_transpose(cin, cout, bias=False):
  return nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1, bias=bias)


class UNet(nn.Module):
  """The U-Net generator, as flat per-level module lists."""

  def __init__(self, num_downs: int, ngf: int = 64, dropout: float = 0.5):
    super().__init__()
    if num_downs < 2:
      raise ValueError(f"num_downs must be at least 2, got {num_downs}")
    self.num_downs = num_downs
    self.dropout = dropout
    widths = [ngf * min(2 ** level, 8) for level in range(num_downs)]
    innermost = num_downs - 1
    self.widths = widths

    up_levels = list(range(innermost, -1, -1))          # innermost first
    def up_conv(level):
      cin = widths[level] if level == innermost else 2 * widths[level]
      cout = 3 if level == 0 else widths[level - 1]
      return _conv_transpose(cin, cout, bias=(level == 0))
    self.down_convs = nn.ModuleList(
        _conv(3 if level == 0 else widths[level - 1], widths[level])
        for level in range(num_downs))
    self.down_norms = nn.ModuleList(
        nn.Identity() if level in (0, innermost) else nn.BatchNorm2d(widths[level])
        for level in range(num_downs))
    self.up_convs = nn.ModuleList(up_conv(level) for level in up_levels)
    self.up_norms = nn.ModuleList(
        nn.Identity() if level == 0 else nn.BatchNorm2d(widths[level - 1])
        for level in up_levels)
    # Dropout sits on the 8*ngf levels strictly between the innermost and the four outer ones.
    self._dropout_levels = frozenset(range(4, innermost))
    self._up_levels = up_levels

  def forward(self, x):
    skips = []
    for level, (conv, norm) in enumerate(zip(self.down_convs, self.down_norms)):
      if level > 0:
        x = F.leaky_relu(x, LEAKY_SLOPE)
      x = norm(conv(x))
      skips.append(x)
    y = skips[-1]
    for j, (level, conv, norm) in enumerate(zip(self._up_levels, self.up_convs, self.up_norms)):
      if j > 0:
        y = torch.cat([skips[level], y], dim=1)
      y = norm(conv(F.relu(y)))
      if level in self._dropout_levels and self.dropout > 0:
        y = F.dropout(y, p=self.dropout, training=self.training)
    return torch.tanh(y)


class PatchGAN(nn.Module):
  """The 70x70 PatchGAN discriminator (`netD basic`, n_layers 3)."""

  def __init__(self, ndf: int = 64, in_channels: int = 6):
    super().__init__()
    self.c1 = _conv(in_channels, ndf, bias=True)
    self.c2 = _conv(ndf, 2 * ndf)
    self.n2 = nn.BatchNorm2d(2 * ndf)
    self.c3 = _conv(2 * ndf, 4 * ndf)
    self.n3 = nn.BatchNorm2d(4 * ndf)
    self.c4 = _conv(4 * ndf, 8 * ndf, stride=1)
    self.n4 = nn.BatchNorm2d(8 * ndf)
    self.c5 = _conv(8 * ndf, 1, stride=1, bias=True)

  def forward(self, x):
    x = F.leaky_relu(self.c1(x), LEAKY_SLOPE)
    x = F.leaky_relu(self.n2(self.c2(x)), LEAKY_SLOPE)
    x = F.leaky_relu(self.n3(self.c3(x)), LEAKY_SLOPE)
    x = F.leaky_relu(self.n4(self.c4(x)), LEAKY_SLOPE)
    return self.c5(x)


def _gan_loss(logits, is_real: bool):
  target = torch.ones_like(logits) if is_real else torch.zeros_like(logits)
  return F.binary_cross_entropy_with_logits(logits, target)


def _set_requires_grad(net: nn.Module, flag: bool):
  for parameter in net.parameters():
    parameter.requires_grad_(flag)


class Pix2PixStep:
  """G, D, their Adam optimisers and one official training iteration."""

  def __init__(self, image_size: int, num_downs: int | None = None, seed: int = 0,
               ngf: int = 64, ndf: int = 64, dropout: float = 0.5, lambda_l1: float = 100.0,
               lr: float = 2e-4, beta1: float = 0.5):
    if num_downs is None:
      num_downs = int(round(math.log2(image_size)))
    if image_size % (2 ** num_downs):
      raise ValueError(f"image_size {image_size} is not divisible by 2**{num_downs}")
    self.image_size, self.num_downs, self.lambda_l1 = image_size, num_downs, lambda_l1
    # Like the authors' define_G / define_D, each net is initialised right after it is
    # built, G first; `apply` visits the layers in their registration order.
    torch.manual_seed(seed)
    self.G = UNet(num_downs, ngf=ngf, dropout=dropout)
    self.G.apply(_official_init)
    self.D = PatchGAN(ndf=ndf)
    self.D.apply(_official_init)
    self.G.train()
    self.D.train()
    adam = dict(lr=lr, betas=(beta1, 0.999), eps=1e-8)
    self.opt_G = torch.optim.Adam(self.G.parameters(), **adam)
    self.opt_D = torch.optim.Adam(self.D.parameters(), **adam)
    self.losses = {}

  def step(self, real_a, real_b):
    fake_b = self.G(real_a)

    # D: fake pass, then real pass, each with its own batch statistics.
    _set_requires_grad(self.D, True)
    self.opt_D.zero_grad()
    loss_d_fake = _gan_loss(self.D(torch.cat([real_a, fake_b.detach()], dim=1)), False)
    loss_d_real = _gan_loss(self.D(torch.cat([real_a, real_b], dim=1)), True)
    loss_d = 0.5 * (loss_d_fake + loss_d_real)
    loss_d.backward()
    self.opt_D.step()

    # G: against the updated, frozen D (a third D pass, still in train mode).
    _set_requires_grad(self.D, False)
    self.opt_G.zero_grad()
    loss_g_gan = _gan_loss(self.D(torch.cat([real_a, fake_b], dim=1)), True)
    loss_g_l1 = self.lambda_l1 * F.l1_loss(fake_b, real_b)
    (loss_g_gan + loss_g_l1).backward()
    self.opt_G.step()

    self.losses = {"D": loss_d.item(), "D_fake": loss_d_fake.item(),
                   "D_real": loss_d_real.item(), "G_GAN": loss_g_gan.item(),
                   "G_L1": loss_g_l1.item()}
    return self.losses


def main():
  parser = argparse.ArgumentParser(description="Time the PyTorch pix2pix iteration on CPU.")
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--num-downs", type=int, default=None)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  step = Pix2PixStep(args.image_size, args.num_downs, seed=args.seed)
  real_a, real_b = random_batch(args.batch_size, args.image_size, seed=args.seed)
  step.step(real_a, real_b)                                   # warm-up
  start = time.perf_counter()
  for _ in range(args.steps):
    step.step(real_a, real_b)
  seconds = (time.perf_counter() - start) / args.steps
  print(f"{seconds * 1e3:.1f} ms/step, {args.batch_size / seconds:.2f} images/s, "
        f"losses {step.losses}")


if __name__ == "__main__":
  main()
