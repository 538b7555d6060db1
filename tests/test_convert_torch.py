"""Official PyTorch pix2pix weights load into our networks and compute the same outputs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as torch_nn

from configs import default
from p2p_jax import convert_torch
from p2p_jax import evaluate
from p2p_jax import models
from p2p_jax import step as step_lib
from p2p_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Official-format weights and their PyTorch outputs (tests/data/fidelity/README.md).
FIDELITY = os.path.join(ROOT, "tests", "data", "fidelity")


def _fidelity(name):
  return os.path.join(FIDELITY, name)


def _g_pth():
  return _fidelity("unet256_ngf8_net_G.pth")


def _d_pth():
  return _fidelity("unet256_ngf8_net_D.pth")


TOLERANCE = 1e-5
_MOMENTUM = 0.1   # PyTorch's BatchNorm momentum, which ours follows


def _model_config(**overrides):
  config = default.get_config().model
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def vectors():
  return dict(np.load(_fidelity("unet256_ngf8_vectors.npz")))


@pytest.fixture(scope="module")
def state_dicts():
  """The ngf = ndf = 8 official state dicts as numpy arrays: (G, D)."""
  def read(path):
    return {key: value.numpy() for key, value in torch.load(path, weights_only=True).items()}
  return read(_g_pth()), read(_d_pth())


def _max_error(output, expected):
  return float(np.max(np.abs(np.asarray(output) - expected)))


def _stats_before_last_update(module, variables, *inputs, **kwargs):
  """Running statistics as they were before one PyTorch-style update on `inputs`.

  The saved state dicts hold the running statistics after the train-mode
  forward that produced the `*_train_*` vectors; the `*_eval*` vectors were
  taken before it. With momentum m, saved = (1 - m) * before + m * batch, and
  one train-mode step of ours gives updated = (1 - m) * saved + m * batch, so
  before = (saved - (updated - (1 - m) * saved)) / (1 - m). This also checks
  that our update is PyTorch's (momentum, unbiased variance).
  """
  _, updated = module.apply(variables, *inputs, use_running_average=False,
                            mutable=["batch_stats"], **kwargs)
  def rewind(saved, new):
    saved, new = np.float64(saved), np.float64(new)
    return np.float32((saved - (new - (1 - _MOMENTUM) * saved)) / (1 - _MOMENTUM))
  before = jax.tree.map(rewind, variables["batch_stats"], updated["batch_stats"])
  return {"params": variables["params"], "batch_stats": before}


def test_converted_networks_reproduce_the_official_outputs(vectors):
  config = _model_config(ngf=8, ndf=8)
  generator, gen_vars = convert_torch.load_generator(_g_pth(), config)
  discriminator, disc_vars = convert_torch.load_discriminator(_d_pth(), config)
  real_a, real_b = vectors["real_a"], vectors["real_b"]

  fake_b, _ = generator.apply(gen_vars, real_a, use_running_average=False, deterministic=True,
                              mutable=["batch_stats"])
  logits, _ = discriminator.apply(disc_vars, real_a, real_b, use_running_average=False,
                                  mutable=["batch_stats"])
  errors = {"g_train_nodropout": _max_error(fake_b, vectors["g_train_nodropout"]),
            "d_train_real": _max_error(logits, vectors["d_train_real"])}

  gen_eval_vars = _stats_before_last_update(generator, gen_vars, real_a, deterministic=True)
  disc_eval_vars = _stats_before_last_update(discriminator, disc_vars, real_a, real_b)
  fake_b = generator.apply(gen_eval_vars, real_a, use_running_average=True, deterministic=True)
  logits = discriminator.apply(disc_eval_vars, real_a, real_b, use_running_average=True)
  errors["g_eval"] = _max_error(fake_b, vectors["g_eval"])
  errors["d_eval_real"] = _max_error(logits, vectors["d_eval_real"])
  assert fake_b.shape == (2, 256, 256, 3) and logits.shape == (2, 30, 30, 1)
  assert all(error < TOLERANCE for error in errors.values()), errors


def test_full_size_official_keys_fill_every_variable():
  with open(_fidelity("official_keys_full.json")) as f:
    key_lists = json.load(f)
  config = _model_config()        # unet_256, basic D, ngf = ndf = 64, BatchNorm
  gen_module, disc_module = step_lib.create_model(config, axis_name=None)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  image = jnp.zeros((1, 256, 256, 3))
  expected_shapes = {
      "netG_unet_256": jax.eval_shape(lambda: gen_module.init(rngs, image)),
      "netD_basic": jax.eval_shape(lambda: disc_module.init(rngs, image, image))}
  loaders = {"netG_unet_256": (convert_torch.load_generator, 54_413_955),
             "netD_basic": (convert_torch.load_discriminator, 2_768_705)}
  for name, keys in key_lists.items():
    # Each tensor gets its own constant, so every variable shows which key filled it.
    state = {key: np.broadcast_to(np.float32(index + 1), shape)
             for index, (key, shape) in enumerate(keys)}
    counted = {index + 1 for index, (key, _) in enumerate(keys)
               if not key.endswith("num_batches_tracked")}
    load, param_count = loaders[name]
    _, variables = load(state, config)
    assert models.count_params(variables["params"]) == param_count
    assert (jax.tree.map(lambda x: x.shape, variables)
            == jax.tree.map(lambda x: x.shape, expected_shapes[name]))
    used = set()
    for leaf in jax.tree.leaves(variables):
      assert float(leaf.min()) == float(leaf.max()), "one variable mixes two official tensors"
      used.add(int(leaf.min()))
    assert used == counted, f"official tensors left out: {sorted(counted - used)}"


def test_data_parallel_prefix_and_torch_tensors_load_the_same(state_dicts):
  config = _model_config(ngf=8, ndf=8)
  gen_state, disc_state = state_dicts
  for load, state in ((convert_torch.load_generator, gen_state),
                      (convert_torch.load_discriminator, disc_state)):
    _, plain = load(state, config)
    wrapped = {f"module.{key}": torch.from_numpy(value) for key, value in state.items()}
    _, from_wrapped = load(wrapped, config)
    jax.tree.map(np.testing.assert_array_equal, from_wrapped, plain)


@pytest.mark.parametrize("network,overrides,key,fix", [
    ("G", {"ngf": 16}, "key model.model.0.weight has shape (8, 3, 4, 4)",
     "config.model.ngf=16 expects (16, 3, 4, 4): set --config.model.ngf=8"),
    ("G", {"input_nc": 1}, "key model.model.0.weight", "--config.model.input_nc=3"),
    ("G", {"num_downs": 7},
     "unexpected key model.model.1.model.3.model.3.model.3.model.3.model.3.model.2.weight",
     "config.model.num_downs=7: set --config.model.num_downs=8"),
    ("G", {"norm": "instance"}, "missing key model.model.0.bias", "--config.model.norm=batch"),
    ("D", {"n_layers_d": 2}, "unexpected key model.9.weight",
     "config.model.n_layers_d=2: set --config.model.n_layers_d=3"),
    ("D", {"ndf": 64}, "key model.0.weight has shape (8, 6, 4, 4)", "--config.model.ndf=8"),
    ("D", {"disc_type": "pixel"}, "missing key net.0.weight", "--config.model.disc_type=patch"),
    ("D", {"conditional_d": False}, "key model.0.weight",
     "--config.model.conditional_d=True"),
])
def test_wrong_architecture_names_the_key_and_the_flag(state_dicts, network, overrides, key, fix):
  config = _model_config(**{"ngf": 8, "ndf": 8, **overrides})
  if network == "G":
    load, state = convert_torch.load_generator, state_dicts[0]
  else:
    load, state = convert_torch.load_discriminator, state_dicts[1]
  with pytest.raises(ValueError) as error:
    load(state, config)
  assert key in str(error.value) and fix in str(error.value), str(error.value)


def test_extra_and_missing_keys_are_named(state_dicts):
  config = _model_config(ngf=8, ndf=8)
  gen_state, disc_state = state_dicts
  with pytest.raises(ValueError, match=r"unexpected key model\.model\.0\.extra"):
    convert_torch.load_generator({**gen_state, "model.model.0.extra": np.zeros(3)}, config)
  incomplete = {key: value for key, value in gen_state.items() if key != "model.model.3.bias"}
  with pytest.raises(ValueError, match=r"missing key model\.model\.3\.bias"):
    convert_torch.load_generator(incomplete, config)
  with pytest.raises(ValueError, match="no config.model setting explains it"):
    convert_torch.load_generator(disc_state, config)


def test_reading_a_pth_without_torch_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)    # `import torch` now fails
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0 \(CPU\)"):
    convert_torch.load_generator(_g_pth(), _model_config(ngf=8, ndf=8))


def test_download_pretrained_from_a_file_url_and_the_cache(tmp_path):
  source = tmp_path / "served.pth"
  source.write_bytes(b"weights" * 1000)
  cache = tmp_path / "cache"
  path = convert_torch.download_pretrained("facades_label2photo", str(cache),
                                           url=source.as_uri())
  assert path == str(cache / "facades_label2photo.pth")
  assert open(path, "rb").read() == source.read_bytes()
  assert os.listdir(cache) == ["facades_label2photo.pth"]     # no partial file left behind
  source.unlink()   # a cached file is used without fetching again
  assert convert_torch.download_pretrained("facades_label2photo", str(cache),
                                           url=source.as_uri()) == path


def test_download_failure_says_where_to_put_the_file(tmp_path):
  missing = (tmp_path / "nowhere.pth").as_uri()
  with pytest.raises(OSError, match="save it as .*sat2map.pth"):
    convert_torch.download_pretrained("sat2map", str(tmp_path / "cache"), url=missing)
  assert os.listdir(tmp_path / "cache") == []


def test_unknown_pretrained_name_lists_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="facades_label2photo .*BtoA") as error:
    convert_torch.download_pretrained("facades", str(tmp_path))
  assert all(name in str(error.value) for name in convert_torch.PRETRAINED)
  assert not os.listdir(tmp_path)


# The official architectures, rebuilt in PyTorch from their description, to check
# the key mapping on variants the shared vectors do not cover.

def _torch_norm(norm, channels):
  if norm == "batch":
    return torch_nn.BatchNorm2d(channels)
  if norm == "instance":
    return torch_nn.InstanceNorm2d(channels)
  return torch_nn.Identity()


class _TorchUnetBlock(torch_nn.Module):

  def __init__(self, outer, inner, norm, in_channels=None, sub=None, outermost=False):
    super().__init__()
    bias = norm == "instance"
    down = torch_nn.Conv2d(in_channels or outer, inner, 4, 2, 1, bias=bias)
    if outermost:
      layers = [down, sub, torch_nn.ReLU(), torch_nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1),
                torch_nn.Tanh()]
    elif sub is None:
      layers = [torch_nn.LeakyReLU(0.2), down, torch_nn.ReLU(),
                torch_nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias), _torch_norm(norm, outer)]
    else:
      layers = [torch_nn.LeakyReLU(0.2), down, _torch_norm(norm, inner), sub, torch_nn.ReLU(),
                torch_nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=bias),
                _torch_norm(norm, outer)]
    self.outermost = outermost
    self.model = torch_nn.Sequential(*layers)

  def forward(self, x):
    return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class _TorchNet(torch_nn.Module):

  def __init__(self, attribute, body):
    super().__init__()
    self.attribute = attribute
    setattr(self, attribute, body)

  def forward(self, x):
    return getattr(self, self.attribute)(x)


def _torch_unet(input_nc, output_nc, num_downs, ngf, norm):
  block = _TorchUnetBlock(8 * ngf, 8 * ngf, norm)
  for _ in range(num_downs - 5):
    block = _TorchUnetBlock(8 * ngf, 8 * ngf, norm, sub=block)
  for mult in (4, 2, 1):
    block = _TorchUnetBlock(mult * ngf, 2 * mult * ngf, norm, sub=block)
  block = _TorchUnetBlock(output_nc, ngf, norm, input_nc, block, outermost=True)
  return _TorchNet("model", block)


def _torch_discriminator(in_channels, ndf, n_layers, norm):
  bias = norm == "instance"
  if n_layers == 0:   # the PixelGAN
    return _TorchNet("net", torch_nn.Sequential(
        torch_nn.Conv2d(in_channels, ndf, 1), torch_nn.LeakyReLU(0.2),
        torch_nn.Conv2d(ndf, 2 * ndf, 1, bias=bias), _torch_norm(norm, 2 * ndf),
        torch_nn.LeakyReLU(0.2), torch_nn.Conv2d(2 * ndf, 1, 1, bias=bias)))
  layers = [torch_nn.Conv2d(in_channels, ndf, 4, 2, 1), torch_nn.LeakyReLU(0.2)]
  width = ndf
  for layer in range(1, n_layers + 1):
    new_width = ndf * min(2 ** layer, 8)
    layers += [torch_nn.Conv2d(width, new_width, 4, 2 if layer < n_layers else 1, 1, bias=bias),
               _torch_norm(norm, new_width), torch_nn.LeakyReLU(0.2)]
    width = new_width
  layers.append(torch_nn.Conv2d(width, 1, 4, 1, 1))
  return _TorchNet("model", torch_nn.Sequential(*layers))


def _randomised_eval_copy(net, seed):
  """Random BatchNorm affine parameters and statistics, so a wrong mapping shows."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch_nn.BatchNorm2d):
        for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                  (module.running_mean, -0.3, 0.3), (module.running_var, 0.5, 2)):
          tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))
  return net.eval()


def _run_torch(net, image):
  with torch.no_grad():
    return net(torch.from_numpy(image).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("num_downs,ngf,norm,input_nc,output_nc", [
    (7, 4, "batch", 3, 3), (6, 2, "instance", 1, 2), (5, 2, "none", 3, 1)])
def test_generator_variants_match_pytorch(num_downs, ngf, norm, input_nc, output_nc):
  torch.manual_seed(num_downs)
  net = _randomised_eval_copy(_torch_unet(input_nc, output_nc, num_downs, ngf, norm), num_downs)
  config = _model_config(num_downs=num_downs, ngf=ngf, norm=norm, input_nc=input_nc,
                         output_nc=output_nc)
  generator, variables = convert_torch.load_generator(net.state_dict(), config)
  side = 2 ** num_downs
  real_a = np.random.default_rng(0).uniform(-1, 1, (2, side, side, input_nc)).astype(np.float32)
  fake_b = generator.apply(variables, real_a, use_running_average=True, deterministic=True)
  assert _max_error(fake_b, _run_torch(net, real_a)) < TOLERANCE


@pytest.mark.parametrize("n_layers,norm,side", [
    (1, "batch", 32), (5, "instance", 128), (3, "none", 64), (0, "batch", 8), (0, "none", 8)])
def test_discriminator_variants_match_pytorch(n_layers, norm, side):
  torch.manual_seed(n_layers)
  net = _randomised_eval_copy(_torch_discriminator(6, 4, n_layers, norm), n_layers)
  pixel = n_layers == 0
  config = _model_config(ndf=4, norm=norm, disc_type="pixel" if pixel else "patch",
                         n_layers_d=n_layers if not pixel else 3)
  discriminator, variables = convert_torch.load_discriminator(net.state_dict(), config)
  real_a, real_b = np.random.default_rng(1).uniform(-1, 1, (2, 2, side, side, 3)).astype(np.float32)
  logits = discriminator.apply(variables, real_a, real_b, use_running_average=True)
  expected = _run_torch(net, np.concatenate([real_a, real_b], axis=-1))
  assert _max_error(logits, expected) < TOLERANCE


def test_command_line_conversion_gives_a_run_that_eval_and_predict_use(vectors, tmp_path):
  """--pretrained from a file:// URL, no D (initialised fresh), into a new workdir."""
  workdir = tmp_path / "official"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(
      [sys.executable, "-m", "p2p_jax.convert_torch", "--pretrained=facades_label2photo",
       f"--pretrained_url=file://{os.path.abspath(_g_pth())}", f"--cache_dir={tmp_path / 'cache'}",
       "--config=configs/facades.py", "--config.model.ngf=8", "--config.model.ndf=8",
       f"--workdir={workdir}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "D is initialised fresh" in result.stderr
  assert (tmp_path / "cache" / "facades_label2photo.pth").exists()

  restored = evaluate.restore_checkpoint(str(workdir))
  config, state = restored.config, restored.state
  assert config.model.ngf == 8 and config.data.direction == "BtoA"
  assert config.to_dict() == workdir_lib.load_config(str(workdir)).to_dict()
  assert int(state.step) == 0
  generator = state.settings.generator.clone(bn_axis_name=None)
  fake_b, _ = generator.apply(state.generator.variables(), vectors["real_a"],
                              deterministic=True, mutable=["batch_stats"])
  assert _max_error(fake_b, vectors["g_train_nodropout"]) < TOLERANCE

  again = subprocess.run(
      [sys.executable, "-m", "p2p_jax.convert_torch", f"--generator={_g_pth()}",
       "--config=configs/facades.py", "--config.model.ngf=8", "--config.model.ndf=8",
       f"--workdir={workdir}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "already holds checkpoints" in again.stderr
