"""Entry point: train or evaluate pix2pix.

  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=runs/shoes
  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=runs/shoes --mode=eval

Kept short on purpose: it parses flags, sets up the (optional) multi-process
runtime, keeps TensorFlow (which only reads data) off the accelerators and hands
over to `train.train_and_evaluate` or `evaluate.evaluate`.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the saved config.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming if possible) or evaluate.")
flags.DEFINE_bool("distributed", os.environ.get("P2P_JAX_DISTRIBUTED", "") == "1",
                  "Call jax.distributed.initialize() (multi-host). Also P2P_JAX_DISTRIBUTED=1.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    _initialize_distributed()
  elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                         "--distributed (or P2P_JAX_DISTRIBUTED=1).")
  from p2p_jax import devices  # pylint: disable=g-import-not-at-top
  from p2p_jax import evaluate  # pylint: disable=g-import-not-at-top
  from p2p_jax import monitoring  # pylint: disable=g-import-not-at-top
  from p2p_jax import train  # pylint: disable=g-import-not-at-top
  devices.hide_accelerators_from_tensorflow()
  monitoring.quiet_library_logs()

  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    # The other processes wait on this one in a collective, and JAX's exit handler
    # would wait on them: report and leave now, so the launcher sees the failure.
    logging.exception("Process %d failed; exiting.", jax.process_index())
    logging.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def _initialize_distributed() -> None:
  """Joins the other processes. Flags left unset are detected from the cluster: TPU pods,
  SLURM and Open MPI need none. On CPU, collectives between processes go over gloo."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  except ValueError as error:   # nothing to detect: not on a pod or a cluster
    raise app.UsageError(
        f"--distributed: {error} Outside a TPU pod, SLURM or Open MPI job, pass "
        "--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process "
        "(launch/local.sh does so on one machine).") from error


if __name__ == "__main__":
  app.run(main)
