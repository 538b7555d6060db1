"""The paper's ablations (Tables 1-3) as grids of ordinary p2p_jax runs, scored like the paper.

  python -m p2p_jax.ablate --table=1 --workdir=runs/ablation
  python -m p2p_jax.ablate --table=2 --workdir=runs/ablation
  python -m p2p_jax.ablate --table=3 --workdir=runs/ablation --steps=2000
  python -m p2p_jax.ablate --table=1 --workdir=runs/ablation_edges --config=configs/demo.py
  python -m p2p_jax.ablate --table=1 --workdir=/tmp/abl --config=configs/facades.py:smoke

Table 1 compares objectives (L1, GAN, cGAN, L1+GAN, L1+cGAN), Table 2
generators (encoder-decoder and U-Net, each with L1 and L1+cGAN), Table 3
discriminator receptive fields (1x1, 16x16, 70x70, 286x286, with L1+cGAN).
A row is the base config with one of the paper's variants (`p2p_jax.variants`,
such as `loss=l1`), trained in WORKDIR/<row>/ with the same seed and number of steps as
every other row by `train.train_and_evaluate`, then evaluated by
`evaluate.evaluate`: an ordinary run, which `p2p_jax.main` can evaluate again
or resume. A row whose final eval exists is skipped and a row cut short
resumes from its checkpoint, so after an interruption run the same command
again. Table 2's U-Net rows are Table 1's L1 and L1+cGAN rows: with one
workdir for both tables they are trained once.

The command writes WORKDIR/table<N>.md (each row's scores beside the paper's,
and the budget) and WORKDIR/table<N>.png (a few test inputs, each row's
outputs for them, and the targets).

Scores: the paper scores labels -> photo translations with the FCN-score
(`segmentation`), which needs class maps. The default base config is the
synthetic labels2facades task; its scorer is trained once in
WORKDIR/fcn_scorer and also scores the real test photos (the "ground truth"
row). Every table also shows L1 / PSNR / SSIM and the colour statistics of
the paper's Figure 7 (`color_stats`; for edges -> objects, --config=configs/demo.py,
the ones that show L1's desaturation).

Budget of the default base config (`configs/default.py:ablation=TABLE`,
read from the working directory when --config is not given), built for a
2-core CPU: synthetic
labels2facades at 64x64 (400 train and 100 test images, as facades), a
6-level U-Net with ngf = ndf = 32, batch 8, 3,000 steps (60 epochs), the
paper's losses, optimiser and schedule otherwise. Table 3 runs at 128x128
(a 7-level U-Net) and 2,000 steps: the 286x286 discriminator has no output
at 64x64 (2x2 at 128x128), and at 64x64 the 70x70 one already sees the whole image. On
a 2-core CPU shared with other jobs a step took 0.25-0.5 s at 64x64 (13-25
minutes a row) and about 1 s at 128x128 (16 minutes a row at --steps=1000);
the scorer trains once, in about 3 minutes. The paper trains at 256x256 with
batch 1 (Table 2: batch 10) for 200 epochs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from PIL import Image, ImageDraw

from p2p_jax import checkpoints
from p2p_jax import cli
from p2p_jax import evaluate
from p2p_jax import input_pipeline
from p2p_jax import segmentation
from p2p_jax import train
from p2p_jax import variants
from p2p_jax import workdir as workdir_lib

_SAMPLES = 5             # test inputs shown in the figure
_TIMING_FILE = "ablate_timing.json"
# Config fields that do not change what a row learns: a resumed row may differ in them.
_FREE_FIELDS = ("eval.", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "image_every_steps", "eval_every_steps", "data.prefetch_to_device")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table: a variant of the base config."""
  name: str                                      # its directory under the workdir
  label: str                                     # as the paper's table names it
  variant: str                                   # `p2p_jax.variants`, as in `configs/default.py:`
  paper: tuple[float, float, float] | None = None   # per-pixel acc, per-class acc, class IoU


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  rows: tuple[Row, ...]
  paper_ground_truth: tuple[float, float, float] | None
  paper_setting: str


_PAPER_SETTING = "Cityscapes labels -> photo at 256x256, batch 1, 200 epochs"
TABLES = {
    1: Table("Table 1: objectives (U-Net generator, 70x70 PatchGAN)", (
        Row("l1", "L1", "loss=l1", (0.42, 0.15, 0.11)),
        Row("gan", "GAN", "loss=gan", (0.22, 0.05, 0.01)),
        Row("cgan", "cGAN", "loss=cgan", (0.57, 0.22, 0.16)),
        Row("l1+gan", "L1+GAN", "loss=l1+gan", (0.64, 0.20, 0.15)),
        Row("l1+cgan", "L1+cGAN", "loss=l1+cgan", (0.66, 0.23, 0.17)),
    ), (0.80, 0.26, 0.21), _PAPER_SETTING),
    2: Table("Table 2: generator architectures (70x70 PatchGAN)", (
        Row("encdec-l1", "Encoder-decoder (L1)", "generator=encoder_decoder,loss=l1",
            (0.35, 0.12, 0.08)),
        Row("encdec-l1+cgan", "Encoder-decoder (L1+cGAN)",
            "generator=encoder_decoder,loss=l1+cgan", (0.29, 0.09, 0.05)),
        Row("l1", "U-Net (L1)", "loss=l1", (0.48, 0.18, 0.13)),
        Row("l1+cgan", "U-Net (L1+cGAN)", "loss=l1+cgan", (0.55, 0.20, 0.14)),
    ), None, "Cityscapes labels -> photo at 256x256, batch 10 (not 1 as Tables 1 and 3)"),
    3: Table("Table 3: discriminator receptive fields (L1+cGAN, U-Net)", (
        Row("d1", "1x1 (PixelGAN)", "disc=1", (0.39, 0.15, 0.10)),
        Row("d16", "16x16", "disc=16", (0.65, 0.21, 0.17)),
        Row("d70", "70x70", "disc=70", (0.66, 0.23, 0.17)),
        Row("d286", "286x286 (ImageGAN)", "disc=286", (0.42, 0.16, 0.11)),
    ), None, _PAPER_SETTING),
}

# (metrics.json key, column header, +1: higher is better, -1: lower is better, 0: neither)
_FCN_COLUMNS = (("fcn_per_pixel_acc", "per-pixel acc", 1),
                ("fcn_per_class_acc", "per-class acc", 1), ("fcn_class_iou", "class IoU", 1))
_OTHER_COLUMNS = (("l1", "L1", -1), ("psnr", "PSNR", 1), ("ssim", "SSIM", 1),
                  ("lpips", "LPIPS", -1),
                  ("ab_hist_distance", "ab hist dist", -1), ("hist_intersection_a", "a hist ∩", 1),
                  ("hist_intersection_b", "b hist ∩", 1), ("mean_chroma_fake", "chroma", 0))


def row_config(base: ml_collections.ConfigDict, row: Row, workdir: str,
               steps: int = -1) -> ml_collections.ConfigDict:
  """`base` with `row`'s variant, `steps` (if > 0) and the scores the data allows."""
  config = ml_collections.ConfigDict(base.to_dict())   # unlocked: new eval fields may be set
  variants.apply(config, row.variant)
  if steps > 0:
    config.num_train_steps = steps
  config.eval.fcn_score = segmentation.has_class_maps(config)
  config.eval.fcn_scorer_dir = os.path.join(os.path.abspath(workdir), "fcn_scorer")
  _check_discriminator_fits(config, row)
  return config


def run_table(table: int, workdir: str, base: ml_collections.ConfigDict, *, steps: int = -1,
              rows: Sequence[str] | None = None) -> str | None:
  """Trains and evaluates the rows of `table` that are not done; writes table<N>.md and .png.

  `rows` picks rows by name (default: all). Returns the path of the markdown
  table, or None if a stop request (SIGTERM) ended training early.
  """
  if table not in TABLES:
    raise ValueError(f"There is no table {table}; the paper's ablations are tables 1, 2 and 3.")
  spec = TABLES[table]
  chosen = [row for row in spec.rows if rows is None or row.name in rows]
  unknown = sorted(set(rows or ()) - {row.name for row in spec.rows})
  if unknown or not chosen:
    raise ValueError(f"Unknown row(s) {unknown} for table {table}; its rows are "
                     f"{', '.join(row.name for row in spec.rows)}.")
  configs = [row_config(base, row, workdir, steps) for row in chosen]
  results = {}
  for row, config in zip(chosen, configs):
    results[row.name] = _run_row(config, os.path.join(workdir, row.name), row)
    if results[row.name] is None:
      logging.warning("Stopped during row %s (its checkpoint is saved); run the same command "
                      "again to resume.", row.name)
      return None
  md_path = os.path.join(workdir, f"table{table}.md")
  png_path = os.path.join(workdir, f"table{table}.png")
  if jax.process_index() == 0:
    _write_figure(png_path, spec, chosen, configs[0], workdir)
    with open(md_path, "w") as f:
      f.write(_markdown(spec, chosen, configs[0], results, workdir, os.path.basename(png_path)))
    logging.info("Wrote %s and %s.", md_path, png_path)
  return md_path


# ----------------------------------------------------------------------------- one row

def _expected_keys(config: ml_collections.ConfigDict) -> list[str]:
  return [key for key, _, _ in _FCN_COLUMNS] if config.eval.fcn_score else ["l1"]


def _run_row(config: ml_collections.ConfigDict, row_dir: str, row: Row
             ) -> dict[str, Any] | None:
  """The row's eval metrics: read if done, else trained (or resumed) and evaluated.

  None if training stopped before the last step (a stop request).
  """
  final = train.num_train_steps(config)
  metrics_path = os.path.join(evaluate.result_dir(row_dir, final, config.data.eval_split,
                                                  config.eval.deterministic), "metrics.json")
  saved = workdir_lib.load_config(row_dir).to_dict() if workdir_lib.has_config(row_dir) else None
  workdir_lib.check_same_run(
      config, saved, row_dir, fields=(), ignore=_FREE_FIELDS,
      hint="(another --steps or --config?) Use another --workdir, or the same settings.")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      result = json.load(f)
    if all(key in result for key in _expected_keys(config)):
      logging.info("Row %s is done (%s); skipped.", row.name, metrics_path)
      return result

  # Through training even when the last step looks saved: restoring verifies it, and a
  # damaged checkpoint is moved aside and its steps trained again.
  start = _latest_step(row_dir)
  logging.info("Row %s (%s): training steps %d to %d in %s.", row.name, row.variant,
               start + 1, final, row_dir)
  began = time.perf_counter()
  reached = int(train.train_and_evaluate(config, row_dir).step)
  if reached > start:
    _add_timing(row_dir, reached - start, time.perf_counter() - began)
  if reached < final:
    return None
  config.eval.step = final
  return evaluate.evaluate(config, row_dir)


def _latest_step(row_dir: str) -> int:
  if not os.path.isdir(os.path.join(row_dir, "checkpoints")):
    return 0
  checkpointer = checkpoints.Checkpointer(row_dir, read_only=True)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def _add_timing(row_dir: str, steps: int, seconds: float) -> None:
  path = os.path.join(row_dir, _TIMING_FILE)
  timing = {"steps": 0, "seconds": 0.0}
  if os.path.exists(path):
    with open(path) as f:
      timing = json.load(f)
  timing = {"steps": timing["steps"] + steps, "seconds": timing["seconds"] + seconds}
  with open(path, "w") as f:
    json.dump(timing, f)


def _check_discriminator_fits(config: ml_collections.ConfigDict, row: Row) -> None:
  """A PatchGAN of n layers gives (size / 2**n - 2)^2 logits; none is an error, not a NaN."""
  if config.model.disc_type != "patch":
    return
  size, n_layers = config.data.crop_size, config.model.n_layers_d
  if size // 2 ** n_layers - 2 < 1:
    needed = 3 * 2 ** n_layers
    multiple = 2 ** config.model.num_downs
    fits = -(-needed // multiple) * multiple    # also a size the U-Net takes
    raise ValueError(
        f"Row {row.name!r} ({row.label}): a PatchGAN with n_layers_d={n_layers} has no output "
        f"for {size}x{size} images; it needs at least {needed}x{needed}. Use e.g. "
        f"--config.data.crop_size={fits} --config.data.load_size={fits + fits // 8}, or leave "
        "this row out with --rows.")


# ----------------------------------------------------------------------------- reports

def _fmt(value: Any) -> str:
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return ""
  return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _markdown(spec: Table, rows: Sequence[Row], config: ml_collections.ConfigDict,
              results: dict[str, dict[str, Any]], workdir: str, figure: str) -> str:
  first = results[rows[0].name]
  columns = [c for c in _FCN_COLUMNS + _OTHER_COLUMNS if c[0] in first]
  has_fcn = "fcn_per_pixel_acc" in first
  header = ["row", "variant"] + [title for _, title, _ in columns]
  if has_fcn:
    header += ["paper per-pixel", "paper per-class", "paper IoU"]
  lines = [f"# {spec.title}", "", _budget(config, rows, workdir), "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  best = {}
  for key, _, better in columns:
    values = [results[row.name].get(key) for row in rows]
    values = [v for v in values if v is not None and np.isfinite(v)]
    if better and values:
      best[key] = max(values) if better > 0 else min(values)
  for row in rows:
    result = results[row.name]
    cells = [row.label, f"`{row.variant}`"]
    for key, _, _ in columns:
      text = _fmt(result.get(key))
      cells.append(f"**{text}**" if text and result.get(key) == best.get(key) else text)
    if has_fcn:
      cells += [_fmt(v) for v in row.paper or (None,) * 3]
    lines.append("| " + " | ".join(cells) + " |")
  # The targets scored as if generated: the FCN-score's ceiling, and the real chroma.
  reference = {key: first.get(key.replace("fcn_", "fcn_real_").replace("_fake", "_real"))
               for key, _, _ in columns if key.startswith("fcn_") or key == "mean_chroma_fake"}
  truth = ["ground truth (real test photos)", ""] + [_fmt(reference.get(key))
                                                     for key, _, _ in columns]
  if has_fcn:
    truth += [_fmt(v) for v in spec.paper_ground_truth or (None,) * 3]
  lines.append("| " + " | ".join(truth) + " |")
  lines += ["", _notes(has_fcn, spec), "", f"![sample outputs]({figure})", ""]
  return "\n".join(lines)


def _budget(config: ml_collections.ConfigDict, rows: Sequence[Row], workdir: str) -> str:
  data, model = config.data, config.model
  steps = train.num_train_steps(config)
  train_images = input_pipeline.num_examples(config, data.train_split)
  epochs = steps * config.batch_size / train_images
  timing = []
  for row in rows:
    path = os.path.join(workdir, row.name, _TIMING_FILE)
    if os.path.exists(path):
      with open(path) as f:
        timing.append(json.load(f))
  measured = ""
  if timing:
    seconds = sum(t["seconds"] for t in timing) / sum(t["steps"] for t in timing)
    measured = (f" Measured here: {seconds:.2f} s per step including start-up, "
                f"{_duration(seconds * steps)} of training per row.")
  return (f"Budget, the same for every row: {steps} steps at batch {config.batch_size} "
          f"({epochs:.1f} epochs of {train_images} images), seed {config.seed}, "
          f"{data.source} {data.name} at {data.crop_size}x{data.crop_size}, U-Net "
          f"num_downs={model.num_downs} ngf={model.ngf}, PatchGAN ndf={model.ndf}, "
          f"lambda_l1={config.loss.lambda_l1:g} where L1 is used. Scored on the "
          f"{data.eval_split} split in the paper's test mode (each image with its own "
          f"BatchNorm statistics, dropout on).{measured}")


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _notes(has_fcn: bool, spec: Table) -> str:
  fcn = ("FCN-score: a small U-Net segmentation net trained on real training photos "
         "(p2p_jax/segmentation.py) labels the generated test photos; per-pixel accuracy, "
         "mean per-class accuracy and mean class IoU against the input label maps. "
         if has_fcn else
         "This data has no class maps, so there is no FCN-score; the paper's FCN-scores "
         "are not comparable and are left out. ")
  return (fcn + "Colour statistics as the paper's Figure 7 (p2p_jax/color_stats.py): "
          "total variation distance between the Lab (a, b) histograms of outputs and "
          "targets, intersection of the a and b histograms, mean chroma of the outputs "
          "(ground truth row: of the targets). Best value per column in bold. "
          f"Paper: {spec.paper_setting}.")


def _write_figure(path: str, spec: Table, rows: Sequence[Row], config: ml_collections.ConfigDict,
                  workdir: str) -> None:
  """Columns: test inputs; rows: the input, each ablation row's output, the target."""
  step = train.num_train_steps(config)
  image_dirs = [os.path.join(evaluate.result_dir(os.path.join(workdir, row.name), step,
                                                 config.data.eval_split,
                                                 config.eval.deterministic), "images")
                for row in rows]
  names = sorted(name[:-len("_real_a.png")] for name in os.listdir(image_dirs[0])
                 if name.endswith("_real_a.png"))[:_SAMPLES]
  size = config.data.crop_size
  scale = max(1, 128 // size)
  cell, label_width, title_height = size * scale, 170, 24
  lines = ([("input", image_dirs[0], "real_a")]
           + [(row.label, d, "fake_b") for row, d in zip(rows, image_dirs)]
           + [("target", image_dirs[0], "real_b")])
  canvas = Image.new("RGB", (label_width + cell * len(names), title_height + cell * len(lines)),
                     "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 6), f"{spec.title}: {step} steps", fill="black")
  for r, (label, directory, kind) in enumerate(lines):
    top = title_height + r * cell
    draw.text((4, top + cell // 2 - 6), label, fill="black")
    for c, name in enumerate(names):
      file = os.path.join(directory, f"{name}_{kind}.png")
      if os.path.exists(file):
        image = Image.open(file).convert("RGB").resize((cell, cell), Image.NEAREST)
        canvas.paste(image, (label_width + c * cell, top))
  canvas.save(path)


# ----------------------------------------------------------------------------- command line

def _define_flags() -> None:
  # Defined only when run as a command, so that importing this module next to
  # p2p_jax.main (which defines --config and --workdir too) stays possible.
  flags.DEFINE_enum("table", None, ["1", "2", "3"], "Which of the paper's ablation tables to run.")
  flags.DEFINE_string("workdir", None, "Directory for the rows' runs, the scorer and the tables.")
  flags.DEFINE_integer("steps", -1, "Training steps per row (default: the base config's).")
  flags.DEFINE_list("rows", None, "Only these rows (by name, e.g. l1,l1+cgan); default: all.")
  config_flags.DEFINE_config_file(
      "config", None, "Base config file (default: configs/default.py:ablation=TABLE, the "
      "CPU-budget labels2facades base).", lock_config=True)
  flags.mark_flags_as_required(["table", "workdir"])


def _default_base(table: int) -> ml_collections.ConfigDict:
  """configs/default.py:ablation=TABLE, read from the working directory (the checkout)."""
  path = os.path.join("configs", "default.py")
  if not os.path.exists(path):
    raise app.UsageError(f"No {path} here: run from the p2p_jax checkout, or pass "
                         f"--config=PATH/TO/configs/default.py:ablation={table}.")
  spec = importlib.util.spec_from_file_location("p2p_jax_ablation_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"ablation={table}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from p2p_jax import devices  # pylint: disable=g-import-not-at-top
  from p2p_jax import monitoring  # pylint: disable=g-import-not-at-top
  devices.hide_accelerators_from_tensorflow()
  monitoring.quiet_library_logs(keep_tracebacks=cli.tracebacks_wanted())
  values = flags.FLAGS
  table = int(values.table)
  base = values.config if values.config is not None else _default_base(table)
  path = run_table(table, values.workdir, base, steps=values.steps, rows=values.rows)
  print(f"Wrote {path}" if path else "Stopped early: run the same command again to resume.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
