"""Entry point: train or evaluate pix2pix.

  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=runs/shoes
  python -m p2p_jax.main --config=configs/edges2shoes.py --workdir=runs/shoes --mode=eval

Kept short on purpose: it parses flags, sets up the (optional) multi-process
runtime and hands over to `train.train_and_evaluate` or `evaluate.evaluate`.
"""

import os

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
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from p2p_jax import evaluate  # pylint: disable=g-import-not-at-top
  from p2p_jax import monitoring  # pylint: disable=g-import-not-at-top
  from p2p_jax import train  # pylint: disable=g-import-not-at-top
  monitoring.quiet_library_logs()

  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    evaluate.evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
