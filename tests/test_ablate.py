"""The ablation grid: config variants for every row of Tables 1-3, and a resumable smoke run."""

import json
import os

import pytest
from PIL import Image

from configs import default
from configs import facades
from p2p_jax import ablate
from p2p_jax import checkpoints
from p2p_jax import evaluate
from p2p_jax import input_pipeline
from p2p_jax import train


@pytest.mark.parametrize("variant, expected", [
    ("loss=l1", dict(lambda_l1=100.0, lambda_gan=0.0, conditional_d=True)),
    ("loss=gan", dict(lambda_l1=0.0, lambda_gan=1.0, conditional_d=False)),
    ("loss=cgan", dict(lambda_l1=0.0, lambda_gan=1.0, conditional_d=True)),
    ("loss=l1+gan", dict(lambda_l1=100.0, lambda_gan=1.0, conditional_d=False)),
    ("loss=l1+cgan", dict(lambda_l1=100.0, lambda_gan=1.0, conditional_d=True)),
    ("generator=encoder_decoder", dict(skip_connections=False)),
    ("generator=unet", dict(skip_connections=True)),
    ("disc=1", dict(disc_type="pixel")),
    ("disc=16", dict(disc_type="patch", n_layers_d=1)),
    ("disc=70", dict(disc_type="patch", n_layers_d=3)),
    ("disc=286", dict(disc_type="patch", n_layers_d=5)),
])
def test_each_variant_sets_its_fields(variant, expected):
  config = default.get_config(variant)
  fields = {**config.loss.to_dict(), **config.model.to_dict()}
  assert {key: fields[key] for key in expected} == expected


def test_variants_combine_with_smoke_and_dataset_configs():
  combined = default.get_config("smoke,loss=gan,disc=16")
  smoke = default.get_config("smoke")
  assert combined.data.crop_size == smoke.data.crop_size == 32
  assert combined.model.ngf == 8 and combined.num_train_steps == 4
  assert combined.loss.lambda_l1 == 0 and not combined.model.conditional_d
  assert combined.model.n_layers_d == 1
  config = facades.get_config("smoke,generator=encoder_decoder")
  assert config.data.name == "labels2facades" and not config.model.skip_connections
  with pytest.raises(ValueError, match=r"Unknown config variant 'loss=l2'.*loss=\{l1\|gan"):
    default.get_config("smoke,loss=l2")


def test_every_table_row_is_a_known_variant():
  for table in ablate.TABLES.values():
    for row in table.rows:
      default.get_config(row.variant)
      assert len(row.paper) == 3


def test_a_discriminator_with_no_output_is_refused_up_front(tmp_path):
  base = default.get_config("ablation=1")       # 64x64: too small for the 286x286 ImageGAN
  row = ablate.TABLES[3].rows[-1]
  with pytest.raises(ValueError, match=r"'d286'.*no output for 64x64.*at least 96x96"):
    ablate.row_config(base, row, str(tmp_path))
  config = ablate.row_config(default.get_config("ablation=3"), row, str(tmp_path))
  assert config.data.crop_size == 128 and config.model.n_layers_d == 5
  assert config.eval.fcn_score


def _smoke_base():
  config = default.get_config("smoke")
  config.data.name = "labels2facades"
  config.image_every_steps = 0
  config.eval.fcn_scorer_steps = 3
  return config


def _forbid(monkeypatch, module, name):
  def fail(*args, **kwargs):
    raise AssertionError(f"{name} should not run: the rows are done")
  monkeypatch.setattr(module, name, fail)


def test_two_rows_stop_resume_write_the_table_and_skip_when_done(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  rows = ["l1", "l1+cgan"]

  # A stop request (SIGTERM, preemption) during the first row: checkpoint, then stop the grid.
  monkeypatch.setattr(checkpoints.Checkpointer, "reached_preemption", lambda self, step: step == 2)
  assert ablate.run_table(1, workdir, _smoke_base(), steps=4, rows=rows) is None
  assert checkpoints.Checkpointer(os.path.join(workdir, "l1"), read_only=True).all_steps() == [2]
  assert not os.path.exists(os.path.join(workdir, "l1+cgan"))
  monkeypatch.undo()

  # Run again: the first row resumes at step 2, the second starts afresh.
  starts, real_iterator = [], input_pipeline.create_train_iterator
  def recording_iterator(config, *, start_step=0, **kwargs):
    starts.append(start_step)
    return real_iterator(config, start_step=start_step, **kwargs)
  monkeypatch.setattr(input_pipeline, "create_train_iterator", recording_iterator)
  md_path = ablate.run_table(1, workdir, _smoke_base(), steps=4, rows=rows)
  assert starts == [2, 0]
  monkeypatch.undo()

  with open(md_path) as f:
    table = f.read()
  assert "| L1 | `loss=l1` |" in table and "| L1+cGAN | `loss=l1+cgan` |" in table
  assert "0.420 | 0.150 | 0.110 |" in table                        # the paper's L1 row
  assert "ground truth (real test photos)" in table and "0.800 | 0.260 | 0.210 |" in table
  assert "4 steps at batch 8" in table
  figure = Image.open(os.path.join(workdir, "table1.png"))
  assert figure.height > 4 * 128 and figure.width > 4 * 128       # input, 2 rows, target; 4 images
  with open(os.path.join(workdir, "l1", "eval", "step_4", "test_paper", "metrics.json")) as f:
    metrics = json.load(f)
  for key in ("fcn_per_pixel_acc", "fcn_class_iou", "fcn_real_per_pixel_acc",
              "ab_hist_distance", "mean_chroma_fake", "l1"):
    assert key in metrics
  assert 0 <= metrics["fcn_per_pixel_acc"] <= 1
  assert len(os.listdir(os.path.join(workdir, "fcn_scorer"))) == 2   # one scorer for all rows
  with open(os.path.join(workdir, "l1", "config.json")) as f:
    assert json.load(f)["loss"]["lambda_gan"] == 0

  # Done rows: a third invocation neither trains nor evaluates, and rewrites the table.
  os.remove(md_path)
  _forbid(monkeypatch, train, "train_and_evaluate")
  _forbid(monkeypatch, evaluate, "evaluate")
  assert ablate.run_table(1, workdir, _smoke_base(), steps=4, rows=rows) == md_path
  assert os.path.exists(md_path)

  # Another budget in the same workdir is refused, not mixed in.
  with pytest.raises(ValueError, match=r"num_train_steps=4, but this config says 6.*another --steps"):
    ablate.run_table(1, workdir, _smoke_base(), steps=6, rows=rows)
