"""The paper's ablations (Tables 1-3) as edits of a config.

`apply(config, "loss=l1,disc=16")` changes only the fields that make each
row what it is; everything else stays as the config has it. Config files
offer them as `:variant` arguments (`configs/default.py`) and
`p2p_jax.ablate` builds its rows from them.

  loss=NAME        Table 1's objectives: l1 (lambda_gan = 0), gan (D sees the
                   output alone, no L1), cgan (no L1), l1+gan (D sees the
                   output alone), l1+cgan (the paper's, the default). Terms
                   kept keep their configured weights.
  generator=NAME   Table 2: unet, or encoder_decoder (the same net without skips).
  disc=SIZE        Table 3, D's receptive field in pixels: 1 (PixelGAN), 16,
                   70 (the default PatchGAN) or 286 (ImageGAN; its output is
                   2x2 at 128x128 and nothing below 96x96).
"""

from __future__ import annotations

import ml_collections

_LOSSES = {   # name: (keeps the L1 term, keeps the adversarial term, D sees the input too)
    "l1": (True, False, True),
    "gan": (False, True, False),
    "cgan": (False, True, True),
    "l1+gan": (True, True, False),
    "l1+cgan": (True, True, True),
}
_GENERATORS = {"unet": True, "encoder_decoder": False}   # name: skip connections
_DISCRIMINATORS = {"1": ("pixel", None), "16": ("patch", 1), "70": ("patch", 3),
                   "286": ("patch", 5)}   # receptive field: (disc_type, n_layers_d)
_CHOICES = {"loss": _LOSSES, "generator": _GENERATORS, "disc": _DISCRIMINATORS}
KNOWN = ", ".join(f"{key}={{{'|'.join(values)}}}" for key, values in _CHOICES.items())


def is_ablation(item: str) -> bool:
  """Whether `item` ("key=value") is one of the ablation variants above."""
  key, _, value = item.strip().partition("=")
  return value in _CHOICES.get(key, ())


def apply(config: ml_collections.ConfigDict, variant: str) -> None:
  """Applies comma-separated ablation variants to `config`, in order."""
  for item in filter(None, (part.strip() for part in variant.split(","))):
    if not is_ablation(item):
      raise ValueError(f"Unknown ablation variant {item!r}; known: {KNOWN}.")
    key, _, value = item.partition("=")
    if key == "loss":
      keep_l1, keep_gan, conditional = _LOSSES[value]
      if not keep_l1:
        config.loss.lambda_l1 = 0.0
      if not keep_gan:
        config.loss.lambda_gan = 0.0
      config.model.conditional_d = conditional
    elif key == "generator":
      config.model.skip_connections = _GENERATORS[value]
    else:
      config.model.disc_type, n_layers = _DISCRIMINATORS[value]
      if n_layers is not None:
        config.model.n_layers_d = n_layers
