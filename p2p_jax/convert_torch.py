"""Official PyTorch pix2pix weights as p2p_jax variables.

Reads the state dicts that the authors' PyTorch code saves (`latest_net_G.pth`,
`latest_net_D.pth`; `unet_128`/`unet_256` generators, `basic`/`n_layers`/`pixel`
discriminators, batch/instance/no norm) into the exact modules that training
builds, so a converted network computes what the official one computes.

Layouts: PyTorch convolutions are OIHW, ours HWIO; ConvTranspose2d weights are
[C_in, C_out, 4, 4], our `UpConv` kernels [4, 4, C_in, C_out]. BatchNorm's
`weight`, `bias`, `running_mean`, `running_var` become our `scale`, `bias` and
batch statistics `mean`, `var`; `num_batches_tracked` carries nothing we use.

The authors' pretrained generators (only G is published) are unet_256, ngf=64,
BatchNorm, i.e. `configs/default.py` as it is; they differ in the data:

  name                 dataset     config.data.direction
  edges2shoes          edges2shoes AtoB
  sat2map              maps        AtoB  (aerial photo -> map)
  map2sat              maps        BtoA  (map -> aerial photo)
  facades_label2photo  facades     BtoA  (the facades files are photo|labels)
  day2night            night2day   BtoA

    path = download_pretrained("facades_label2photo", "~/.cache/p2p_jax")
    generator, variables = load_generator(path, config.model)

The official test script runs them in training mode (batch statistics, dropout
on), as the paper does; `use_running_average=deterministic=True` is `--eval`.
From the command line, into a run directory that eval, predict and training use:

  python -m p2p_jax.convert_torch --generator=latest_net_G.pth \
      [--discriminator=latest_net_D.pth] --config=configs/edges2shoes.py --workdir=runs/shoes_official
  python -m p2p_jax.convert_torch --pretrained=facades_label2photo \
      --config=configs/facades.py --workdir=runs/facades_official

Reading a `.pth` file needs PyTorch (`pip install torch==2.13.0`, the CPU build
is enough); a dict of numpy arrays needs nothing beyond this project.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import urllib.request
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
from ml_collections import config_flags

from p2p_jax import checkpoints
from p2p_jax import cli
from p2p_jax import devices
from p2p_jax import step as step_lib
from p2p_jax import workdir as workdir_lib

_PRETRAINED_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/models-pytorch/{}.pth"
# What each pretrained generator was trained on: (dataset, config.data.direction).
_PRETRAINED_DATA = {
    "edges2shoes": ("edges2shoes", "AtoB"),
    "sat2map": ("maps", "AtoB"),
    "map2sat": ("maps", "BtoA"),
    "facades_label2photo": ("facades", "BtoA"),
    "day2night": ("night2day", "BtoA"),
}
PRETRAINED: dict[str, str] = {name: _PRETRAINED_URL.format(name) for name in _PRETRAINED_DATA}

Variables = dict[str, Any]

# Axis permutation from the official layout to ours.
_TO_FLAX = {"conv": (2, 3, 1, 0), "conv_transpose": (2, 3, 0, 1), "vector": (0,)}


@dataclasses.dataclass(frozen=True)
class _Entry:
  key: str                    # official state-dict key
  target: tuple[str, ...]     # (collection, module, variable) in our variables
  layout: str                 # a key of _TO_FLAX


@dataclasses.dataclass
class _Mapping:
  """Where each official tensor goes, for one architecture."""
  entries: list[_Entry] = dataclasses.field(default_factory=list)
  # Our biases that the official layer does not have (norm="none": the official
  # code gives those convolutions no bias, ours a bias that stays zero).
  zero_filled: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
  # Keys that carry nothing: statistics that PyTorch < 0.4 saved for InstanceNorm.
  ignored: set[str] = dataclasses.field(default_factory=set)

  def conv(self, key: str, module: str, layout: str, bias: str, norm: str) -> None:
    """`bias`: "always", or "norm" for the official `use_bias` (True only with InstanceNorm)."""
    self.entries.append(_Entry(f"{key}.weight", ("params", module, "kernel"), layout))
    if bias == "always" or norm == "instance":
      self.entries.append(_Entry(f"{key}.bias", ("params", module, "bias"), "vector"))
    elif norm == "none":
      self.zero_filled.append(("params", module, "bias"))

  def norm(self, key: str, module: str, norm: str) -> None:
    if norm == "batch":
      for name, collection, variable in (("weight", "params", "scale"), ("bias", "params", "bias"),
                                         ("running_mean", "batch_stats", "mean"),
                                         ("running_var", "batch_stats", "var")):
        self.entries.append(_Entry(f"{key}.{name}", (collection, module, variable), "vector"))
    elif norm == "instance":
      self.ignored |= {f"{key}.running_mean", f"{key}.running_var"}


def _generator_mapping(num_downs: int, norm: str) -> _Mapping:
  """The official UnetGenerator: nested UnetSkipConnectionBlocks, each an nn.Sequential.

  Outermost block: [down conv, submodule, ReLU, up conv (bias), Tanh];
  middle blocks: [LReLU, down conv, norm, submodule, ReLU, up conv, norm (, Dropout)];
  innermost: [LReLU, down conv, ReLU, up conv, norm]. The submodule of the
  outermost block is its item 1, of a middle block its item 3.
  """
  mapping = _Mapping()
  block = "model."
  for level in range(num_downs):
    items = block + "model."
    if level == 0:
      mapping.conv(items + "0", "down_0", "conv", "norm", norm)
      mapping.conv(items + "3", "up_0", "conv_transpose", "always", norm)
      block = items + "1."
    elif level == num_downs - 1:
      mapping.conv(items + "1", f"down_{level}", "conv", "norm", norm)
      mapping.conv(items + "3", f"up_{level}", "conv_transpose", "norm", norm)
      mapping.norm(items + "4", f"up_norm_{level}", norm)
    else:
      mapping.conv(items + "1", f"down_{level}", "conv", "norm", norm)
      mapping.norm(items + "2", f"down_norm_{level}", norm)
      mapping.conv(items + "5", f"up_{level}", "conv_transpose", "norm", norm)
      mapping.norm(items + "6", f"up_norm_{level}", norm)
      block = items + "3."
  return mapping


def _discriminator_mapping(n_layers: int, pixel: bool, norm: str) -> _Mapping:
  """The official NLayerDiscriminator (`model.*`) or PixelDiscriminator (`net.*`)."""
  mapping = _Mapping()
  if pixel:   # [conv, LReLU, conv, norm, LReLU, conv]
    mapping.conv("net.0", "conv_0", "conv", "always", norm)
    mapping.conv("net.2", "conv_1", "conv", "norm", norm)
    mapping.norm("net.3", "norm_1", norm)
    mapping.conv("net.5", "conv_2", "conv", "norm", norm)
    return mapping
  # [conv, LReLU] + n_layers x [conv, norm, LReLU] + [conv]: layer l's conv and
  # norm are items 3l - 1 and 3l.
  mapping.conv("model.0", "conv_0", "conv", "always", norm)
  for layer in range(1, n_layers + 1):
    mapping.conv(f"model.{3 * layer - 1}", f"conv_{layer}", "conv", "norm", norm)
    mapping.norm(f"model.{3 * layer}", f"norm_{layer}", norm)
  mapping.conv(f"model.{3 * n_layers + 2}", f"conv_{n_layers + 1}", "conv", "always", norm)
  return mapping


def _infer_norm(shapes: Mapping[str, tuple], first_unbiased_conv: str) -> str:
  """BatchNorm leaves affine weights beside its running statistics; InstanceNorm
  (affine=False) leaves none but gives the convolutions a bias."""
  for key in shapes:
    if key.endswith(".running_var") and key[:-len("running_var")] + "weight" in shapes:
      return "batch"
  return "instance" if f"{first_unbiased_conv}.bias" in shapes else "none"


def _infer_generator_flags(shapes: Mapping[str, tuple]) -> dict[str, Any]:
  """The config.model fields that an official U-Net state dict implies ({} if not one)."""
  outer = shapes.get("model.model.0.weight", ())
  if len(outer) != 4:
    return {}
  flags = {"ngf": outer[0], "input_nc": outer[1], "skip_connections": True}
  if len(shapes.get("model.model.3.weight", ())) == 4:
    flags["output_nc"] = shapes["model.model.3.weight"][1]
  num_downs, block = 1, "model.model.1."
  while any(key.startswith(block + "model.") for key in shapes):
    num_downs, block = num_downs + 1, block + "model.3."
  flags["num_downs"] = num_downs
  flags["norm"] = _infer_norm(shapes, "model.model.0")
  return flags


def _infer_discriminator_flags(shapes: Mapping[str, tuple],
                               model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config.model fields that an official discriminator state dict implies."""
  if len(shapes.get("net.0.weight", ())) == 4:
    first, flags = shapes["net.0.weight"], {"disc_type": "pixel"}
    flags["norm"] = _infer_norm(shapes, "net.2")
  elif len(shapes.get("model.0.weight", ())) == 4:
    first, flags = shapes["model.0.weight"], {"disc_type": "patch"}
    convs = [key for key in shapes
             if re.fullmatch(r"model\.\d+\.weight", key) and len(shapes[key]) == 4]
    flags["n_layers_d"] = len(convs) - 2
    flags["norm"] = _infer_norm(shapes, "model.2")
  else:
    return {}
  flags["ndf"] = first[0]
  # D sees concat(real_a, image) (conditional) or the image alone.
  channels = first[1]
  input_nc, output_nc = model_config.input_nc, model_config.output_nc
  conditional = model_config.conditional_d
  if channels != (input_nc + output_nc if conditional else output_nc):
    if not conditional and channels == input_nc + output_nc:
      flags["conditional_d"] = True
    elif conditional and channels == output_nc:
      flags["conditional_d"] = False
    elif conditional and channels > output_nc:
      flags["input_nc"] = channels - output_nc
    else:
      flags["output_nc"] = channels
  return flags


def _explain(model_config: ml_collections.ConfigDict, inferred: Mapping[str, Any]
             ) -> tuple[str, str]:
  """(the config fields at fault, the command-line fix) for a state dict that does not fit."""
  wrong = {field: value for field, value in inferred.items()
           if field in model_config and model_config[field] != value}
  if not wrong:
    return ("the config", "no config.model setting explains it; is this an official pix2pix "
            "state dict of the right network (generator vs discriminator)?")
  current = " and ".join(f"config.model.{field}={model_config[field]}" for field in wrong)
  fix = " ".join(f"--config.model.{field}={value}" for field, value in wrong.items())
  return current, f"set {fix}"


def _torch_load(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such state dict file: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f"Reading {path} needs PyTorch: pip install torch==2.13.0 (CPU) to read .pth files, or "
        "pass a dict of numpy arrays instead.") from error
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    reason = str(error).split(". ")[0][:200]   # torch's messages run on for paragraphs
    raise ValueError(f"Could not read {path} as a PyTorch state dict ({type(error).__name__}: "
                     f"{reason}). Is it a latest_net_G.pth / latest_net_D.pth file, and complete?"
                     ) from error


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]
                     ) -> tuple[dict[str, np.ndarray], str]:
  """(key -> float32 array without `module.` prefixes or counters, a name for messages)."""
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    source = os.fspath(path_or_state_dict)
    state = _torch_load(source)
  else:
    source, state = "the state dict", path_or_state_dict
  if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
    raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict (a dict of "
                     "tensors, as in latest_net_G.pth).")
  # DataParallel / DistributedDataParallel save the wrapped network under `module.`.
  if state and all(key.startswith("module.") for key in state):
    state = {key[len("module."):]: value for key, value in state.items()}
  arrays = {}
  for key, value in state.items():
    if key.rsplit(".", 1)[-1] == "num_batches_tracked":
      continue
    if hasattr(value, "detach"):   # a torch.Tensor (possibly half or bfloat16)
      value = value.detach().cpu().float().numpy()
    try:
      arrays[key] = np.asarray(value, np.float32)
    except (TypeError, ValueError) as error:
      raise ValueError(f"{source}: key {key} holds a {type(value).__name__}, not a tensor; pass "
                       "the network's state dict itself.") from error
  return arrays, source


def _more(keys: list[str]) -> str:
  return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _convert(state: Mapping[str, np.ndarray], source: str, mapping: _Mapping,
             abstract: Variables, model_config: ml_collections.ConfigDict,
             inferred: Mapping[str, Any]) -> Variables:
  """Places every official tensor in our variables, or raises naming what does not fit."""
  expected = {entry.key: entry for entry in mapping.entries}
  missing = [key for key in expected if key not in state]
  unexpected = [key for key in state if key not in expected and key not in mapping.ignored]
  if missing or unexpected:
    problems = [f"unexpected key {_more(unexpected)}"] if unexpected else []
    problems += [f"missing key {_more(missing)}"] if missing else []
    current, fix = _explain(model_config, inferred)
    raise ValueError(f"{source}: {' and '.join(problems)} for {current}: {fix}")

  shapes = traverse_util.flatten_dict(abstract)
  flat = {}
  for key, value in state.items():   # in file order, so the first misfit is reported
    if key not in expected:
      continue
    entry = expected[key]
    perm = _TO_FLAX[entry.layout]
    ours = shapes[entry.target].shape
    want = tuple(ours[axis] for axis in np.argsort(perm))
    if value.shape != want:
      current, fix = _explain(model_config, inferred)
      raise ValueError(f"{source}: key {key} has shape {value.shape} but {current} expects "
                       f"{want}: {fix}")
    flat[entry.target] = jnp.asarray(np.transpose(value, perm))
  for target in mapping.zero_filled:
    flat[target] = jnp.zeros(shapes[target].shape, jnp.float32)
  unassigned = sorted("/".join(path) for path in set(shapes) - set(flat))
  if unassigned:
    raise AssertionError(f"The official layout leaves {unassigned} unassigned.")
  variables = traverse_util.unflatten_dict(flat)
  variables.setdefault("batch_stats", {})
  return variables


def load_generator(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                   model_config: ml_collections.ConfigDict) -> tuple[nn.Module, Variables]:
  """An official U-Net generator's weights in the generator that training builds.

  Args:
    path_or_state_dict: a `.pth` file (e.g. `latest_net_G.pth`) or its state
      dict (tensors or numpy arrays); a `module.` prefix on every key is fine.
    model_config: `config.model`; num_downs, ngf, norm, input_nc and output_nc
      must describe the saved network.
  Returns:
    (generator, {"params", "batch_stats"}) for
    `generator.apply(variables, real_a, use_running_average=..., deterministic=...)`
    on [N, H, W, input_nc] images in [-1, 1]; BatchNorm statistics are per
    device (no cross-replica axis).
  Raises:
    ValueError naming the first key or shape that does not fit and the
    `--config.model.*` flag that makes it fit.
  """
  if model_config.get("generator", "unet") != "unet":
    raise ValueError(f"config.model.generator={model_config.generator}: official weights "
                     "convert only into the U-Net; set --config.model.generator=unet.")
  generator, _ = step_lib.create_model(model_config, axis_name=None)
  state, source = _read_state_dict(path_or_state_dict)
  side = 2 ** model_config.num_downs
  real_a = jax.ShapeDtypeStruct((1, side, side, model_config.input_nc), jnp.float32)
  abstract = jax.eval_shape(
      lambda x: generator.init(jax.random.key(0), x, deterministic=True), real_a)
  mapping = _generator_mapping(model_config.num_downs, model_config.norm)
  inferred = _infer_generator_flags({key: value.shape for key, value in state.items()})
  return generator, _convert(state, source, mapping, abstract, model_config, inferred)


def load_discriminator(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                       model_config: ml_collections.ConfigDict) -> tuple[nn.Module, Variables]:
  """An official PatchGAN / PixelGAN discriminator's weights in ours.

  Args:
    path_or_state_dict: a `.pth` file (e.g. `latest_net_D.pth`) or its state dict.
    model_config: `config.model`; disc_type, n_layers_d, ndf, norm and the
      channel fields (input_nc + output_nc when conditional_d) must fit.
  Returns:
    (discriminator, {"params", "batch_stats"}) for
    `discriminator.apply(variables, real_a, image, use_running_average=...)`,
    which gives logits [N, H', W', 1].
  Raises:
    ValueError naming the first key or shape that does not fit and the fix.
  """
  _, discriminator = step_lib.create_model(model_config, axis_name=None)
  state, source = _read_state_dict(path_or_state_dict)
  pixel = model_config.disc_type == "pixel"
  side = 2 ** max(6, model_config.n_layers_d + 3)   # big enough for every stride-2 layer
  real_a = jax.ShapeDtypeStruct((1, side, side, model_config.input_nc), jnp.float32)
  image = jax.ShapeDtypeStruct((1, side, side, model_config.output_nc), jnp.float32)
  abstract = jax.eval_shape(
      lambda a, b: discriminator.init(jax.random.key(0), a, b), real_a, image)
  mapping = _discriminator_mapping(model_config.n_layers_d, pixel, model_config.norm)
  inferred = _infer_discriminator_flags({key: value.shape for key, value in state.items()},
                                        model_config)
  return discriminator, _convert(state, source, mapping, abstract, model_config, inferred)


def _describe_pretrained() -> str:
  return ", ".join(f"{name} ({dataset}, --config.data.direction={direction})"
                   for name, (dataset, direction) in _PRETRAINED_DATA.items())


def download_pretrained(name: str, cache_dir: str, *, url: str | None = None) -> str:
  """Path to the authors' pretrained generator `name`, downloaded once into `cache_dir`.

  Args:
    name: one of PRETRAINED (see the module docstring for the data and
      direction each expects).
    cache_dir: where `{name}.pth` is kept; a file already there is used as is.
    url: where to fetch it instead of PRETRAINED[name] (a mirror, or file://).
  Returns:
    The path of `{cache_dir}/{name}.pth`.
  """
  if name not in PRETRAINED:
    raise ValueError(f"Unknown pretrained pix2pix model {name!r}; known: {_describe_pretrained()}.")
  url = url or PRETRAINED[name]
  cache_dir = os.path.expanduser(cache_dir)
  path = os.path.join(cache_dir, f"{name}.pth")
  if os.path.isfile(path) and os.path.getsize(path) > 0:
    return path
  os.makedirs(cache_dir, exist_ok=True)
  logging.info("Downloading %s to %s", url, path)
  # Written beside the target and renamed into place, so an interrupted download
  # never leaves a truncated file that a later call would take as cached.
  fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      length = response.headers.get("Content-Length")
      shutil.copyfileobj(response, out, 1 << 20)
      size = out.tell()
    if size == 0 or (length is not None and int(length) != size):
      raise OSError(f"received {size} of {length or 'an unknown number of'} bytes")
    os.replace(partial, path)
  except (OSError, ValueError) as error:   # URLError and timeouts are OSErrors
    if os.path.exists(partial):
      os.remove(partial)
    raise OSError(f"Could not download the pretrained {name!r} generator from {url} ({error}). "
                  f"Download it by hand and save it as {path}; it is then used from there."
                  ) from error
  return path


def convert_to_workdir(config: ml_collections.ConfigDict, workdir: str, generator_weights: Any,
                       discriminator_weights: Any | None = None) -> step_lib.TrainState:
  """Writes converted official weights into `workdir` as a step-0 checkpoint and its config.

  Eval, predict and training (as fine-tuning) then run on `workdir` as on any
  p2p_jax run. Without discriminator weights, D is initialised fresh.
  """
  checkpointer = checkpoints.Checkpointer(workdir, keep=None)
  try:
    if checkpointer.latest_step() is not None:
      raise FileExistsError(f"{workdir} already holds checkpoints ({checkpointer.all_steps()}); "
                            "convert into a new --workdir.")
    state = step_lib.create_train_state(jax.random.key(config.seed), config, steps_per_epoch=1)
    _, gen_vars = load_generator(generator_weights, config.model)
    state = state.replace(generator=state.generator.replace(
        params=gen_vars["params"], batch_stats=gen_vars["batch_stats"],
        opt_state=state.settings.gen_tx.init(gen_vars["params"])))
    if discriminator_weights is None:
      logging.warning("No discriminator weights given: D is initialised fresh (N(0, 0.02)).")
    else:
      _, disc_vars = load_discriminator(discriminator_weights, config.model)
      state = state.replace(discriminator=state.discriminator.replace(
          params=disc_vars["params"], batch_stats=disc_vars["batch_stats"],
          opt_state=state.settings.disc_tx.init(disc_vars["params"])))
    if jax.process_index() == 0:
      workdir_lib.save_config(config, workdir)
    checkpointer.save(0, devices.replicate(state), config)
  finally:
    checkpointer.close()
  return state


def main(argv):
  del argv
  config = _FLAGS.config
  if bool(_FLAGS.generator) == bool(_FLAGS.pretrained):
    raise app.UsageError("Give exactly one of --generator=G.pth and --pretrained=NAME.")
  generator_path = _FLAGS.generator
  if _FLAGS.pretrained:
    generator_path = download_pretrained(_FLAGS.pretrained, _FLAGS.cache_dir,
                                         url=_FLAGS.pretrained_url)
    dataset, direction = _PRETRAINED_DATA[_FLAGS.pretrained]
    if config.data.direction != direction:
      logging.warning("%s was trained on %s with direction %s, but the config says %s.",
                      _FLAGS.pretrained, dataset, direction, config.data.direction)
  state = convert_to_workdir(config, _FLAGS.workdir, generator_path, _FLAGS.discriminator)
  print(f"Wrote step {int(state.step)} to {_FLAGS.workdir}: "
        f"python -m p2p_jax.predict --workdir={_FLAGS.workdir} --input=... --output=...")


if __name__ == "__main__":
  flags.DEFINE_string("generator", None, "Official generator state dict (latest_net_G.pth).")
  flags.DEFINE_string("discriminator", None, "Official discriminator state dict (optional).")
  flags.DEFINE_string("pretrained", None, f"An official pretrained generator: {', '.join(PRETRAINED)}.")
  flags.DEFINE_string("pretrained_url", None, "Fetch --pretrained from here instead (mirror, file://).")
  flags.DEFINE_string("cache_dir", "~/.cache/p2p_jax", "Where --pretrained downloads are kept.")
  flags.DEFINE_string("workdir", None, "New run directory to write the checkpoint and config into.")
  config_flags.DEFINE_config_file("config", None, "Config the weights fit (model.*, data.*).",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])
  _FLAGS = flags.FLAGS
  cli.run(main)
