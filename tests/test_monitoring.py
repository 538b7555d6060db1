"""The lines a person reads: progress with a steadily falling estimate, and how a run opens
and closes."""

import jax
import pytest

from configs import default
from p2p_jax import hardware
from p2p_jax import monitoring
from p2p_jax import step as step_lib
from p2p_jax import train


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = scalars


def test_progress_leaves_out_the_compiling_step_and_its_estimate_falls_steadily():
  clock, writer = _Clock(), _Writer()
  progress = monitoring.Progress(0, 1000, batch_size=8, writer=writer, every_seconds=10,
                                 clock=clock)
  clock.now = 30.0                        # the first step compiles: 30 s
  assert progress(1) is None
  lines, lefts = [], []
  for step in range(2, 1001):
    clock.now += 0.5 if step % 2 else 0.1   # uneven steps, 0.3 s on average
    line = progress(step)
    if line:
      lines.append(line)
      lefts.append((1000 - step) / progress.rate(step))
  assert len(lines) > 20 and lines[-1].startswith("step 1,000/1,000 (100.0%): ")
  assert lines[0] == "step 35/1,000 (3.5%): 3.33 steps/s, 26.7 images/s, 4m50s left"
  assert all(later < earlier for earlier, later in zip(lefts, lefts[1:]))
  assert lines[-1].endswith(", 0s left")
  assert writer.scalars[1000]["steps_per_sec"] == pytest.approx(999 / (clock.now - 30.0))


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (12, "12s"), (308, "5m08s"),
                                            (7500, "2h05m"), (3 * 86400 + 4 * 3600, "3d04h")])
def test_durations_read_at_a_glance(seconds, text):
  assert monitoring.format_duration(seconds) == text


def test_a_run_opens_and_closes_with_what_a_person_needs():
  config = default.get_config("smoke")
  state = step_lib.create_train_state(jax.random.key(0), config, steps_per_epoch=10)
  opening = train.describe_run(config, state, "runs/x", num_steps=40, steps_per_epoch=10)
  assert opening.startswith("Training pix2pix: a U-Net generator (5 levels, ngf 8, ")
  assert "against a conditional 70x70 PatchGAN (ndf 8, " in opening
  assert "Data: synthetic edges2objects, 80 pairs per epoch, AtoB, 32x32 crops." in opening
  assert f"40 steps (4.0 epochs) of global batch 8 on {jax.device_count()} cpu" in opening
  assert opening.endswith("from scratch. Workdir: runs/x.")
  clock, writer = _Clock(), _Writer()
  progress = monitoring.Progress(0, 40, 8, writer, clock=clock)
  progress(1)
  clock.now = 13.0
  progress(40)
  closing = train.closing_line("runs/x", 40, 0, progress,
                               {"G_GAN": 0.71, "G_L1": 12.3456, "D_real": 0.5, "D_fake": 0.45})
  assert closing.startswith("Done: trained steps 1-40 at 3.00 steps/s; last losses G_GAN 0.71, "
                            "G_L1 12.3, D_real 0.5, D_fake 0.45. Checkpoint: runs/x/checkpoints/40")
  assert "tensorboard --logdir runs/x" in closing
  assert "`python -m p2p_jax.main --workdir=runs/x --mode=eval`" in closing
  assert "`python -m p2p_jax.predict --workdir=runs/x --input=IMAGES --output=OUT`" in closing


@pytest.mark.parametrize("dtype, units, why", [
    ("float32", True, ""),
    ("bfloat16", True, " This CPU has bfloat16 units, so by_shape runs every layer as dots "
                       "(and the innermost ones, whose kernels are most of what they read, in "
                       "float32)."),
    ("bfloat16", False, " This CPU has no bfloat16 units, so by_shape keeps float32's forms "
                        "(and float32 is faster here)."),
])
def test_the_layer_forms_line_says_what_the_cpu_decided(monkeypatch, dtype, units, why):
  monkeypatch.setattr(hardware, "cpu_bfloat16_units", lambda: units)
  config = default.get_config("smoke")
  config.model.dtype = dtype
  line = train.describe_layer_forms(config)
  assert line.startswith(f"Layer forms on cpu (conv_impl=auto, upconv_impl=auto, dtype={dtype}): ")
  assert line.endswith("GFLOP per step." + why)
  dots = units and dtype == "bfloat16"
  assert ("'s2'" in line) is not dots and ("'winograd'" in line) is not dots, line
  assert (" in float32'" in line) is dots, line     # the smoke U-Net's innermost levels
