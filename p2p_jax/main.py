"""Entry point: train or evaluate pix2pix.

  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=runs/shoes
  python -m p2p_jax.main --workdir=runs/shoes --mode=eval    # the checkpoint's own config

Kept short on purpose: it parses flags, sets up the (optional) multi-process
runtime, keeps TensorFlow (which only reads data) off the accelerators and hands
over to `train.train_and_evaluate` or `evaluate.evaluate`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from p2p_jax import cli
from p2p_jax import hardware

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the saved config.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming if possible) or evaluate.")
flags.DEFINE_bool("distributed", os.environ.get("P2P_JAX_DISTRIBUTED", "") == "1",
                  "Call jax.distributed.initialize() (multi-host). Also P2P_JAX_DISTRIBUTED=1.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
config_flags.DEFINE_config_file(
    "config", None, "Configuration file (training). Eval reads the checkpoint's own; a --config "
    "there may change what is evaluated (split, data, eval.*) and the dtype and forms it runs "
    "in (model.dtype, model.conv_impl, model.upconv_impl), not the architecture.",
    lock_config=True)
flags.mark_flags_as_required(["workdir"])
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
  devices.hide_accelerators_from_tensorflow()   # first: the imports below load TensorFlow
  from p2p_jax import evaluate  # pylint: disable=g-import-not-at-top
  from p2p_jax import monitoring  # pylint: disable=g-import-not-at-top
  from p2p_jax import train  # pylint: disable=g-import-not-at-top
  monitoring.quiet_library_logs(keep_tracebacks=cli.tracebacks_wanted())

  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info("Host memory: %s.", hardware.freed_memory_policy)
  if FLAGS.mode == "train":
    if FLAGS.config is None:
      raise app.UsageError("Training needs --config, e.g. --config=configs/demo.py.")
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    evaluate.evaluate(FLAGS.config, FLAGS.workdir)


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
  cli.run(main)
