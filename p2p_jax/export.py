"""Export a trained generator for serving: StableHLO, a TensorFlow SavedModel, or ONNX.

  python -m p2p_jax.export --workdir=runs/facades --format=stablehlo --output=facades.jax
  python -m p2p_jax.export --workdir=runs/facades --format=savedmodel --output=serving/facades/1
  python -m p2p_jax.export --workdir=runs/facades --format=onnx --output=facades.onnx

Each artifact maps NHWC float32 images in [-1, 1] to the translated images,
NHWC float32 in [-1, 1]; the SavedModel has a second signature, `uint8`, from
uint8 [0, 255] to uint8. By default the batch is any size and so are height and
width, in multiples of 2**num_downs (`--batch`, `--size` fix them). The newest
checkpoint that verifies is exported (or `--step`), with the architecture it was
trained with.

Test mode. `--deterministic`: running BatchNorm statistics, no dropout (the
official `--eval`). Default, the paper's: every image is normalised with its own
BatchNorm statistics, as a batch of one, which is what gives pix2pix outputs
their look at test time; dropout, whose noise the paper found to change outputs
only slightly, is off, so that an artifact is a function of its input alone
(repeatable, cacheable, and the same in every runtime; ONNX has no random
numbers that would match JAX's). `predict --nodropout` gives the same images.

Beside the artifact, `<output>.json` records the format, the test mode, the
step, the input and output shapes, the signatures and the training config. An
export checks itself before it is kept: the artifact, loaded with its own
runtime, must translate a random batch as JAX does (its largest difference is in
the JSON). The artifact computes in float32 whatever the training dtype.

`savedmodel` needs TensorFlow (a training requirement); `onnx` needs jax2onnx and
onnxruntime (`pip install -r requirements-export.txt`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import os
import re
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging

from p2p_jax import cli
from p2p_jax import evaluate
from p2p_jax import images as images_lib
from p2p_jax import models
from p2p_jax import step as step_lib
from p2p_jax import workdir as workdir_lib
from p2p_jax.validation import UsageError

FORMATS = ("stablehlo", "savedmodel", "onnx")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
SIGNATURE_INPUT = "images"     # the SavedModel signatures' input and output name
VERIFY_TOLERANCE = 1e-4        # an artifact that differs from JAX by more is not kept
_EXPORT_REQUIREMENTS = "pip install -r requirements-export.txt"

# The forms of the generator's layers an artifact is built from: XLA's own
# convolutions, which every exporter lowers. jax2onnx (0.13) mistranslates the
# input-dilated convolution of the `dilated` transposed convolution, so ONNX gets
# the `subpixel` form (four 2x2 convolutions and a depth-to-space), which it
# converts exactly; the export checks the numerics either way.
_FORMS = {"stablehlo": ("xla", "dilated"), "savedmodel": ("xla", "dilated"),
          "onnx": ("xla", "subpixel")}


@dataclasses.dataclass(frozen=True)
class InputShape:
  """The artifact's input: `batch` and `size` (height, width) fixed, or None for any."""
  batch: int | None
  size: tuple[int, int] | None
  channels: int
  multiple: int            # height and width are multiples of this (2**num_downs)

  def symbolic(self) -> str:
    """The jax.export shape specification, e.g. 'b, 256*h, 256*w, 3'."""
    batch = "b" if self.batch is None else str(self.batch)
    if self.size is None:
      height, width = f"{self.multiple}*h", f"{self.multiple}*w"
    else:
      height, width = map(str, self.size)
    return f"{batch}, {height}, {width}, {self.channels}"

  def spec(self, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(self.symbolic()), dtype)

  def example(self, seed: int = 0) -> np.ndarray:
    """A random float32 batch of this shape (batch 2 and the smallest size where free)."""
    height, width = self.size or (self.multiple, 2 * self.multiple)
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (self.batch or 2, height, width, self.channels)).astype(np.float32)

  def describe(self) -> dict[str, Any]:
    return {"layout": "NHWC", "batch": "any" if self.batch is None else self.batch,
            "height": "any multiple of %d" % self.multiple if self.size is None else self.size[0],
            "width": "any multiple of %d" % self.multiple if self.size is None else self.size[1],
            "channels": self.channels}


def parse_size(text: str, num_downs: int) -> tuple[int, int] | None:
  """`any`, `256` or `256x512` (height x width) -> None or (height, width), checked."""
  text = text.strip().lower()
  if text in ("", "any"):
    return None
  match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
  if not match:
    raise UsageError(f"--size={text!r} is not 'any', N or HxW (e.g. 256 or 256x512).")
  size = (int(match.group(1)), int(match.group(2) or match.group(1)))
  try:
    models.check_image_size(size, num_downs)
  except ValueError as error:
    raise UsageError(f"--size={text}: {error}".replace(
        "(config.data.crop_size), or lower config.model.num_downs", "(--size)")) from None
  return size


def serving_state(state: step_lib.TrainState, fmt: str) -> step_lib.TrainState:
  """`state` with a float32 generator built from the layer forms `fmt`'s exporter takes."""
  conv_impl, upconv_impl = _FORMS[fmt]
  generator = state.settings.generator.clone(conv_impl=conv_impl, upconv_impl=upconv_impl,
                                             dtype=jnp.float32)
  return state.replace(settings=dataclasses.replace(state.settings, generator=generator))


def translate_function(state: step_lib.TrainState, *, deterministic: bool
                       ) -> Callable[[jax.Array], jax.Array]:
  """float32 images [B, H, W, C_in] in [-1, 1] -> [B, H, W, C_out] in [-1, 1], dropout off."""
  return functools.partial(step_lib.eval_step, state, rng=None, deterministic=deterministic,
                           dropout=False)


def uint8_function(translate: Callable[[jax.Array], jax.Array]
                   ) -> Callable[[jax.Array], jax.Array]:
  """`translate` from uint8 [0, 255] to uint8, converting as `predict` does."""
  return lambda images: images_lib.unit_to_uint8(translate(images_lib.uint8_to_unit(images)))


def _require(module: str, fmt: str) -> Any:
  """Imports `module`, or says which optional requirements `--format=fmt` needs."""
  try:
    return __import__(module, fromlist=["_"])
  except ImportError as error:
    raise UsageError(f"--format={fmt} needs {module.split('.')[0]}, which is not installed "
                     f"({error}): {_EXPORT_REQUIREMENTS}") from None


@contextlib.contextmanager
def _logging_kept(*quiet: str):
  """Leaves the process's logging as it was: the loggers named in `quiet` (a converter's
  notices about plugins it skips) say only errors meanwhile, and the level TensorFlow's
  SavedModel code sets on absl's logger (WARNING, which would hide the caller's INFO lines)
  is undone."""
  names = ("", "absl", *quiet)
  levels = {name: std_logging.getLogger(name).level for name in names}
  for name in quiet:
    std_logging.getLogger(name).setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    for name, level in levels.items():
      std_logging.getLogger(name).setLevel(level)


# ---- One writer and one loader per format. A loader returns a function of a numpy batch.

def write_stablehlo(translate: Callable, shape: InputShape, path: str,
                    platforms: Sequence[str]) -> None:
  exported = jax.export.export(jax.jit(translate), platforms=tuple(platforms))(shape.spec())
  with open(path, "wb") as f:
    f.write(exported.serialize())


def load_stablehlo(path: str) -> Callable[[np.ndarray], np.ndarray]:
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return lambda images: np.asarray(exported.call(images))


def write_savedmodel(translate: Callable, shape: InputShape, path: str,
                     platforms: Sequence[str]) -> None:
  tf = _require("tensorflow", "savedmodel")
  jax2tf = _require("jax.experimental.jax2tf", "savedmodel")

  def signature(function, dtype):
    converted = jax2tf.convert(function, polymorphic_shapes=[shape.symbolic()],
                               native_serialization_platforms=tuple(platforms),
                               with_gradient=False)

    def serve(images):
      # A clear message for a size the U-Net cannot take, before the module is run.
      checks = [tf.debugging.assert_equal(
          tf.shape(images)[axis] % shape.multiple, 0,
          message=f"p2p_jax: image {side} must be a multiple of {shape.multiple}")
          for axis, side in ((1, "height"), (2, "width"))]
      with tf.control_dependencies(checks):
        return {SIGNATURE_INPUT: converted(tf.identity(images))}

    spec = tf.TensorSpec([shape.batch, *(shape.size or (None, None)), shape.channels], dtype,
                         name=SIGNATURE_INPUT)
    return tf.function(serve, input_signature=[spec], autograph=False)

  module = tf.Module()
  module.translate = signature(translate, tf.float32)
  module.translate_uint8 = signature(uint8_function(translate), tf.uint8)
  with _logging_kept():
    tf.saved_model.save(module, path, signatures={"serving_default": module.translate,
                                                  "uint8": module.translate_uint8})


def load_savedmodel(path: str, signature: str = "serving_default"
                    ) -> Callable[[np.ndarray], np.ndarray]:
  tf = _require("tensorflow", "savedmodel")
  with _logging_kept():
    function = tf.saved_model.load(path).signatures[signature]
  return lambda images: function(**{SIGNATURE_INPUT: tf.constant(images)})[
      SIGNATURE_INPUT].numpy()


def write_onnx(translate: Callable, shape: InputShape, path: str, opset: int) -> None:
  jax2onnx = _require("jax2onnx", "onnx")
  _require("onnxruntime", "onnx")
  with _logging_kept("jax2onnx", "onnx_ir"):
    model = jax2onnx.to_onnx(lambda images: translate(images), [shape.spec()],
                             model_name="p2p_jax_generator", opset=opset)
  with open(path, "wb") as f:
    f.write(model.SerializeToString())


def load_onnx(path: str) -> Callable[[np.ndarray], np.ndarray]:
  ort = _require("onnxruntime", "onnx")
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda images: session.run(None, {name: images})[0]


LOADERS = {"stablehlo": load_stablehlo, "savedmodel": load_savedmodel, "onnx": load_onnx}


def metadata_path(output: str) -> str:
  return os.path.normpath(output) + ".json"


def export(workdir: str, fmt: str, output: str, *, step: int | None = None,
           deterministic: bool = False, batch: int | None = None, size: str = "any",
           platforms: Sequence[str] = ("cpu", "cuda", "tpu"), opset: int = 18,
           overwrite: bool = False) -> dict[str, Any]:
  """Writes the generator of `workdir`'s checkpoint `step` (default: the newest that verifies)
  as `fmt` to `output`, checks it against JAX, and writes `<output>.json`; returns that record.

  Nothing is left at `output` unless the artifact was written whole and verified.
  """
  if fmt not in FORMATS:
    raise UsageError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}.")
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown:
    raise UsageError(f"--platforms: {', '.join(unknown)} not among {', '.join(PLATFORMS)}.")
  if batch is not None and batch < 1:
    raise UsageError(f"--batch={batch}: use a positive batch size, or 0 for any.")
  if os.path.exists(output) and not overwrite:
    raise UsageError(f"{output} exists: pass --overwrite to replace it, or another --output.")
  # Before the restore, so that a missing package costs nothing.
  if fmt == "savedmodel":
    _require("jax.experimental.jax2tf", fmt)
  elif fmt == "onnx":
    _require("jax2onnx", fmt)
    _require("onnxruntime", fmt)

  restored = evaluate.restore_checkpoint(workdir, step)
  config = restored.config
  shape = InputShape(batch=batch, size=parse_size(size, config.model.num_downs),
                     channels=config.model.input_nc, multiple=2 ** config.model.num_downs)
  state = serving_state(restored.state, fmt)
  translate = translate_function(state, deterministic=deterministic)
  logging.info("Exporting step %d of %s as %s (input %s, %s test mode).", restored.step,
               workdir, fmt, shape.symbolic(), evaluate.mode_name(deterministic))

  output = os.path.normpath(output)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  partial = output + ".partial"
  _remove(partial)
  try:
    if fmt == "stablehlo":
      write_stablehlo(translate, shape, partial, platforms)
    elif fmt == "savedmodel":
      write_savedmodel(translate, shape, partial, platforms)
    else:
      write_onnx(translate, shape, partial, opset)
    difference = verify(partial, fmt, shape, restored.state, deterministic)
    record = _record(fmt, output, restored.step, workdir, deterministic, shape, difference,
                     platforms if fmt != "onnx" else None, opset if fmt == "onnx" else None,
                     config)
    _remove(output)
    os.replace(partial, output)
  finally:
    _remove(partial)
  with open(metadata_path(output) + ".partial", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(metadata_path(output) + ".partial", metadata_path(output))
  logging.info("Wrote %s and %s (largest difference from JAX %.1e).", output,
               metadata_path(output), difference)
  return record


def verify(path: str, fmt: str, shape: InputShape, state: step_lib.TrainState,
           deterministic: bool) -> float:
  """Largest difference between the artifact at `path` and `predict`'s JAX on a random batch;
  raises if it is more than VERIFY_TOLERANCE."""
  images = shape.example()
  expected = np.asarray(evaluate.translate_images(state, images, None,
                                                  deterministic=deterministic, dropout=False))
  got = LOADERS[fmt](path)(images)
  difference = float(np.max(np.abs(got - expected)))
  if not difference <= VERIFY_TOLERANCE:
    raise RuntimeError(f"The {fmt} artifact differs from JAX by {difference:.3g} (more than "
                       f"{VERIFY_TOLERANCE}) on a random batch {images.shape}; nothing was "
                       "kept. Please report it with the converter's version.")
  return difference


def _record(fmt, output, step, workdir, deterministic, shape, difference, platforms, opset,
            config) -> dict[str, Any]:
  record = {
      "format": fmt,
      "artifact": os.path.basename(output),
      "step": int(step),
      "workdir": os.path.abspath(workdir),
      "test_mode": evaluate.mode_name(deterministic),
      "batch_norm": "running statistics" if deterministic else "each image's own statistics",
      "dropout": False,
      "input": {**shape.describe(), "dtype": "float32", "range": [-1, 1]},
      "output": {**shape.describe(), "channels": config.model.output_nc, "dtype": "float32",
                 "range": [-1, 1]},
      "image_size": "any" if shape.size is None else list(shape.size),
      "compute_dtype": "float32",
      "verified_max_difference": difference,
      "jax_version": jax.__version__,
      "config": workdir_lib.as_dict(config),
  }
  if fmt == "savedmodel":
    record["signatures"] = {
        "serving_default": f"{SIGNATURE_INPUT}: float32 in [-1, 1] -> {SIGNATURE_INPUT}",
        "uint8": f"{SIGNATURE_INPUT}: uint8 in [0, 255] -> {SIGNATURE_INPUT}"}
  if platforms is not None:
    record["platforms"] = list(platforms)
  if opset is not None:
    record["onnx_opset"] = opset
  return record


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


FLAGS = flags.FLAGS   # the flags themselves are defined by `_define_flags`, run as a program


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A run directory (config.json and checkpoints/).")
  flags.DEFINE_enum("format", None, list(FORMATS), "What to write.")
  flags.DEFINE_string("output", None, "The artifact: a file (stablehlo, onnx) or a directory "
                      "(savedmodel); <output>.json is written beside it.")
  flags.DEFINE_integer("step", -1, "Checkpoint step to export (-1: the newest that verifies).")
  flags.DEFINE_bool("deterministic", False,
                    "Running BatchNorm statistics (default: each image's own, the paper's).")
  flags.DEFINE_integer("batch", 0, "A fixed batch size (0: any).")
  flags.DEFINE_string("size", "any", "Image size: any (multiples of 2**num_downs), N or HxW.")
  flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"],
                    f"Where a stablehlo or savedmodel artifact may run ({', '.join(PLATFORMS)}).")
  flags.DEFINE_integer("opset", 18, "ONNX opset (18 or newer: jax2onnx writes ReduceMean with its axes as an input).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
  flags.mark_flags_as_required(["workdir", "format", "output"])


def main(argv):
  del argv
  from p2p_jax import monitoring  # pylint: disable=g-import-not-at-top
  monitoring.quiet_library_logs(keep_tracebacks=cli.tracebacks_wanted())
  record = export(FLAGS.workdir, FLAGS.format, FLAGS.output,
                  step=None if FLAGS.step < 0 else FLAGS.step,
                  deterministic=FLAGS.deterministic, batch=FLAGS.batch or None,
                  size=FLAGS.size, platforms=FLAGS.platforms, opset=FLAGS.opset,
                  overwrite=FLAGS.overwrite)
  inputs = record["input"]
  print(f"Wrote {FLAGS.output} ({record['format']}, step {record['step']}, "
        f"{record['test_mode']} test mode; batch {inputs['batch']}, height {inputs['height']}, "
        f"width {inputs['width']}) and {metadata_path(FLAGS.output)}.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
