"""A tf.data service for the input pipeline: decoding spread over more CPUs than one host has.

  python -m p2p_jax.data_service --port=5050                          # dispatcher + worker
  python -m p2p_jax.data_service --dispatcher=HOST:5050 --port=5051   # one more worker

Training then reads through it with
`--config.data.service_address=grpc://HOST:5050`: the workers build each
step's batch (read, decode, fit to the wire size) and this host only puts the
batches back in step order and sends them to its devices, so a run gets the
batches it would have made itself. Workers read the files by the paths the
trainer sees, so they need the same file system (or paths TensorFlow reads
anywhere, such as gs://). Pairs decoded with numpy or PIL (the synthetic
source, and files TensorFlow has no decoder for) run Python inside the graph,
which only a worker in the trainer's own process can do; use the folder source
with JPEG, PNG or BMP files for remote workers. `launch/data_service.sh` starts
a dispatcher and workers for a pod.
"""

from __future__ import annotations

import socket
from typing import Any

from absl import app
from absl import flags
from absl import logging

from p2p_jax.datasets import sources


def start_dispatcher(port: int = 0) -> Any:
  """A dispatcher on `port` (0: any free port); its address is `.target` (grpc://...)."""
  tf = sources.tensorflow()
  return tf.data.experimental.service.DispatchServer(
      tf.data.experimental.service.DispatcherConfig(port=port))


def start_worker(dispatcher: str, port: int = 0, host: str | None = None) -> Any:
  """A worker serving `dispatcher` (HOST:PORT or grpc://HOST:PORT), reachable at host:port."""
  tf = sources.tensorflow()
  dispatcher = dispatcher.split("://")[-1]
  config = {"dispatcher_address": dispatcher, "port": port}
  if host:
    config["worker_address"] = f"{host}:%port%"
  return tf.data.experimental.service.WorkerServer(
      tf.data.experimental.service.WorkerConfig(**config))


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program, so that the module imports anywhere.
  flags.DEFINE_string("dispatcher", "", "HOST:PORT of a running dispatcher; empty: start one "
                      "here, on --port, with a worker beside it.")
  flags.DEFINE_integer("port", 5050, "Port of the dispatcher (or, with --dispatcher, the worker).")
  flags.DEFINE_integer("worker_port", 0, "Port of the worker started beside a new dispatcher "
                       "(0: any free one).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  host = socket.gethostname()
  if FLAGS.dispatcher:
    worker = start_worker(FLAGS.dispatcher, FLAGS.port, host)
    logging.info("tf.data worker for %s on %s:%d.", FLAGS.dispatcher, host, FLAGS.port)
  else:
    dispatcher = start_dispatcher(FLAGS.port)
    worker = start_worker(f"{host}:{FLAGS.port}", FLAGS.worker_port, host)
    logging.info("tf.data dispatcher on %s:%d, with a worker: train with "
                 "--config.data.service_address=grpc://%s:%d", host, FLAGS.port, host, FLAGS.port)
    worker.dispatcher = dispatcher   # held while the worker runs: a dropped server stops
  worker.join()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
