"""The launch scripts: they parse, print under DRY_RUN=1 the exact commands they would run,
refuse bad input with status 2, and local.sh runs, waits for and stops its processes."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "gpu_slurm.sbatch")
LOCAL = os.path.join(LAUNCH, "local.sh")


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH entry whose gcloud, srun and nvidia-smi only record their arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "srun", "nvidia-smi"):
    path = bin_dir / tool
    path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls.log"\n')
    path.chmod(0o755)
  return bin_dir


def _run(script, *args, path=None, **env):
  full_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "TPU_", "DRY_RUN", "WORKDIR", "SPOT", "RESERVED"))}
  if path:
    full_env["PATH"] = f"{path}{os.pathsep}{full_env['PATH']}"
  full_env.update(env)
  return subprocess.run(["bash", script, *args], env=full_env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def _commands(result):
  """The printed commands, each split into its argv like a shell would."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _flag(argv, name):
  values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_every_script_parses_and_is_executable():
  scripts = sorted(os.listdir(LAUNCH))
  assert {"tpu_pod.sh", "gpu_slurm.sbatch", "local.sh", "README.md"} <= set(scripts)
  for name in scripts:
    if name.endswith((".sh", ".sbatch")):
      path = os.path.join(LAUNCH, name)
      check = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
      assert check.returncode == 0, (name, check.stderr)
      assert os.access(path, os.X_OK), f"{name} is not executable"


def test_tpu_create_queues_the_slice_with_the_configured_capacity(fake_bin, tmp_path):
  env = dict(DRY_RUN="1", TPU_NAME="pod-a", ZONE="europe-west4-a", PROJECT="my-proj")
  (create,) = _commands(_run(TPU_POD, "create", path=fake_bin, SPOT="1", **env))
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-a"]
  assert _flag(create, "--node-id") == "pod-a"
  assert _flag(create, "--accelerator-type") == "v4-32"
  assert _flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
  assert _flag(create, "--zone") == "europe-west4-a"
  assert _flag(create, "--project") == "my-proj"
  assert "--spot" in create and "--reserved" not in create

  (create,) = _commands(_run(TPU_POD, "create", path=fake_bin, RESERVED="1",
                             ACCELERATOR_TYPE="v5litepod-64", **env))
  assert _flag(create, "--accelerator-type") == "v5litepod-64"
  assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--reserved" in create and "--spot" not in create
  (create,) = _commands(_run(TPU_POD, "create", path=fake_bin, RUNTIME_VERSION="custom", **env))
  assert _flag(create, "--runtime-version") == "custom"
  assert "--spot" not in create and "--reserved" not in create   # on-demand

  both = _run(TPU_POD, "create", path=fake_bin, SPOT="1", RESERVED="1", **env)
  assert both.returncode == 2 and "exclude each other" in both.stderr
  assert not (tmp_path / "calls.log").exists(), "DRY_RUN=1 ran gcloud"


def test_tpu_setup_copies_or_clones_the_code_and_installs_jax_tpu(fake_bin):
  copy = _commands(_run(TPU_POD, "setup", path=fake_bin, DRY_RUN="1"))
  assert copy[0][0] == "tar" and "--exclude=.git" in copy[0]
  archive = copy[0][copy[0].index("-czf") + 1]
  scp = copy[1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and archive in scp
  assert "--worker=all" in scp and "p2p-jax:p2p_jax.tar.gz" in scp
  for ssh in copy[2:]:
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p2p-jax"]
    assert "--worker=all" in ssh
  install = _flag(copy[-1], "--command")
  assert "requirements.txt" in install and "'jax[tpu]==0.10.2'" in install

  clone = _commands(_run(TPU_POD, "setup", path=fake_bin, DRY_RUN="1",
                         REPO_URL="https://example.com/p2p_jax.git", REPO_REF="v1"))
  assert len(clone) == 2
  assert "git clone --branch v1 https://example.com/p2p_jax.git" in _flag(clone[0], "--command")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tpu_train_and_eval_run_main_on_every_worker(fake_bin, mode):
  (ssh,) = _commands(_run(TPU_POD, mode, "--config.batch_size=64", "--config.data.dir=a b",
                          path=fake_bin, DRY_RUN="1", WORKDIR="gs://bucket/runs/shoes",
                          CONFIG="configs/facades.py"))
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p2p-jax"]
  assert "--worker=all" in ssh
  remote = shlex.split(_flag(ssh, "--command"))
  main = remote[remote.index("-m") - 1:]
  assert main[0].endswith("p2p_jax_venv/bin/python") and main[2] == "p2p_jax.main"
  assert "--workdir=gs://bucket/runs/shoes" in main and "--config=configs/facades.py" in main
  assert f"--mode={mode}" in main and "--distributed" in main
  assert "--config.batch_size=64" in main and "--config.data.dir=a b" in main   # passed through
  assert f"~/p2p_jax_{mode}.log" in remote


def test_tpu_train_needs_a_gs_workdir(fake_bin):
  missing = _run(TPU_POD, "train", path=fake_bin, DRY_RUN="1")
  assert missing.returncode == 2 and "WORKDIR=gs://" in missing.stderr
  local = _run(TPU_POD, "train", path=fake_bin, DRY_RUN="1", WORKDIR="/tmp/run")
  assert local.returncode == 2 and "not a gs:// path" in local.stderr


def test_tpu_logs_ssh_stop_and_delete(fake_bin):
  (logs,) = _commands(_run(TPU_POD, "logs", path=fake_bin, DRY_RUN="1", WORKER="2"))
  assert "--worker=2" in logs and "tail" in _flag(logs, "--command")
  assert "p2p_jax_eval.log" in _flag(_commands(_run(TPU_POD, "logs", "eval", path=fake_bin,
                                                    DRY_RUN="1"))[0], "--command")
  assert _run(TPU_POD, "logs", "nope", path=fake_bin, DRY_RUN="1").returncode == 2
  (ssh,) = _commands(_run(TPU_POD, "ssh", "--command=uptime", path=fake_bin, DRY_RUN="1"))
  assert ssh[4:6] == ["ssh", "p2p-jax"] and "--worker=0" in ssh and "--command=uptime" in ssh
  (stop,) = _commands(_run(TPU_POD, "stop", path=fake_bin, DRY_RUN="1"))
  assert "--worker=all" in stop and "kill -TERM" in _flag(stop, "--command")
  (delete,) = _commands(_run(TPU_POD, "delete", path=fake_bin, DRY_RUN="1", TPU_NAME="pod-b"))
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod-b"]
  assert "--force" in delete and _flag(delete, "--zone") == "us-central2-b"


def test_tpu_runs_the_printed_commands_without_dry_run(fake_bin, tmp_path):
  env = dict(TPU_NAME="pod-c", SPOT="1")
  printed = _run(TPU_POD, "create", path=fake_bin, DRY_RUN="1", **env).stdout
  assert _run(TPU_POD, "create", path=fake_bin, **env).returncode == 0
  assert (tmp_path / "calls.log").read_text().split() == printed.split()


def test_tpu_unknown_or_missing_subcommand_exits_2_with_usage(fake_bin):
  for args in (["frobnicate"], []):
    result = _run(TPU_POD, *args, path=fake_bin)
    assert result.returncode == 2
    assert "launch/tpu_pod.sh create" in result.stderr and "DRY_RUN=1" in result.stderr
  assert "unknown subcommand 'frobnicate'" in _run(TPU_POD, "frobnicate").stderr
  assert _run(TPU_POD, "help").returncode == 0


def test_slurm_one_process_per_node_gets_all_its_gpus(fake_bin, tmp_path):
  slurm = dict(SLURM_SUBMIT_DIR=ROOT, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4",
               WORKDIR="/shared/runs/x", VENV=str(tmp_path / "venv"))
  commands = _commands(_run(SLURM, "--config.batch_size=32", path=fake_bin, DRY_RUN="1",
                            **slurm))
  venv, pip, export, srun = commands
  assert venv[1:] == ["-m", "venv", str(tmp_path / "venv")]
  assert pip[0].endswith("venv/bin/pip") and "jax[cuda12]==0.10.2" in pip
  assert export == ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[3:5] == ["-m", "p2p_jax.main"]
  assert srun[2] == str(tmp_path / "venv" / "bin" / "python")
  for flag in ("--distributed", "--workdir=/shared/runs/x", "--config=configs/edges2shoes.py",
               "--mode=train", "--config.batch_size=32"):
    assert flag in srun
  assert not (tmp_path / "calls.log").exists(), "DRY_RUN=1 ran a command"


def test_slurm_one_process_per_gpu_and_existing_venv(fake_bin, tmp_path):
  python = tmp_path / "venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text("#!/bin/sh\n")
  python.chmod(0o755)
  (srun,) = _commands(_run(SLURM, path=fake_bin, DRY_RUN="1", SLURM_NTASKS_PER_NODE="8",
                           WORKDIR="/shared/y", VENV=str(tmp_path / "venv"), MODE="eval"))
  assert srun[0] == "srun" and "--mode=eval" in srun   # JAX picks each task's GPU itself
  missing = _run(SLURM, path=fake_bin, DRY_RUN="1")
  assert missing.returncode == 2 and "WORKDIR" in missing.stderr


def test_slurm_directives():
  with open(SLURM) as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  for expected in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@300"):
    assert expected in directives


def test_local_dry_run_prints_one_command_per_process():
  result = _run(LOCAL, "3", "--config=configs/default.py:smoke", "--workdir=/tmp/a b",
                DRY_RUN="1", DEVICES_PER_PROCESS="4", PORT="12345", PYTHON="python3",
                XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_other=1")
  lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
  assert len(lines) == 3
  for process_id, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[0] == "JAX_PLATFORMS=cpu"
    assert argv[1].split() == ["XLA_FLAGS=--xla_other=1",
                               "--xla_force_host_platform_device_count=4"]
    assert argv[2:5] == ["python3", "-m", "p2p_jax.main"]
    assert argv[5:7] == ["--config=configs/default.py:smoke", "--workdir=/tmp/a b"]
    assert argv[7:] == ["--distributed", "--coordinator_address=localhost:12345",
                        "--num_processes=3", f"--process_id={process_id}"]


@pytest.mark.parametrize("args,env", [([], {}), (["0"], {}), (["two"], {}),
                                      (["2"], {"DEVICES_PER_PROCESS": "x"})])
def test_local_bad_arguments_exit_2(args, env):
  result = _run(LOCAL, *args, DRY_RUN="1", **env)
  assert result.returncode == 2 and result.stdout == ""
  assert "local.sh N" in result.stderr or "DEVICES_PER_PROCESS" in result.stderr


# Stands in for p2p_jax.main: records its flags and environment; the process named by
# FAIL exits with status 3 at once; with WAIT set, the others wait until sent SIGTERM.
_FAKE_MAIN = '''
import os, signal, sys, time
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if "=" in arg)
out = os.path.join(os.environ["OUT"], flags["process_id"])
if flags["process_id"] == os.environ.get("FAIL"):
  sys.exit(3)
if os.environ.get("WAIT"):
  def stopped(signum, frame):
    open(out + ".stopped", "w").close()
    sys.exit(0)
  signal.signal(signal.SIGTERM, stopped)
with open(out, "w") as f:
  f.write(" ".join([os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"]] + sys.argv[1:]))
if os.environ.get("WAIT"):
  time.sleep(100)
'''


@pytest.fixture
def fake_main(tmp_path):
  path = tmp_path / "fake_main.py"
  path.write_text(_FAKE_MAIN)
  (tmp_path / "out").mkdir()
  return dict(PYTHON=sys.executable, ENTRY_POINT=str(path), DEVICES_PER_PROCESS="3",
              OUT=str(tmp_path / "out"))


def test_local_runs_and_waits_for_every_process(fake_main, tmp_path):
  result = _run(LOCAL, "2", "--workdir=/tmp/w", **fake_main)
  assert result.returncode == 0, result.stderr
  for process_id in range(2):
    seen = (tmp_path / "out" / str(process_id)).read_text().split()
    assert seen[:2] == ["cpu", "--xla_force_host_platform_device_count=3"]
    assert seen[2:4] == ["--workdir=/tmp/w", "--distributed"]
    assert seen[4].startswith("--coordinator_address=localhost:")
    assert seen[5:] == ["--num_processes=2", f"--process_id={process_id}"]


def test_local_stops_the_others_when_one_fails(fake_main, tmp_path):
  result = _run(LOCAL, "3", FAIL="1", WAIT="1", **fake_main)
  assert result.returncode == 3
  assert "process 1 exited with status 3" in result.stderr
  assert sorted(os.listdir(tmp_path / "out")) == ["0", "0.stopped", "2", "2.stopped"]


def test_local_passes_sigterm_on_to_every_process(fake_main, tmp_path):
  env = dict(os.environ, WAIT="1", **fake_main)
  process = subprocess.Popen(["bash", LOCAL, "2"], env=env, cwd=ROOT, stderr=subprocess.PIPE)
  out = tmp_path / "out"
  while len(os.listdir(out)) < 2 and process.poll() is None:   # both have started
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == 130
  assert sorted(os.listdir(out)) == ["0", "0.stopped", "1", "1.stopped"]


DATA_SERVICE = os.path.join(LAUNCH, "data_service.sh")


def test_data_service_starts_workers_for_the_dispatcher_and_prints_the_flag():
  result = _run(DATA_SERVICE, "workers", "cpu-1", "cpu-2", DRY_RUN="1", DISPATCHER="tpu-0:6000")
  commands = _commands(result)
  assert [argv[:2] for argv in commands] == [["ssh", "cpu-1"], ["ssh", "cpu-2"]]
  remote = shlex.split(commands[0][2])
  assert remote[:3] == ["cd", "p2p_jax", "&&"] and "p2p_jax.data_service" in remote
  assert "--dispatcher=tpu-0:6000" in remote and "--port=5051" in remote
  (dispatcher,) = _commands(_run(DATA_SERVICE, "dispatcher", DRY_RUN="1", PORT="6000"))
  assert dispatcher == ["python3", "-m", "p2p_jax.data_service", "--port=6000"]
  (flag,) = _commands(_run(DATA_SERVICE, "flag", DISPATCHER="tpu-0:6000"))
  assert flag == ["--config.data.service_address=grpc://tpu-0:6000"]
  for args in ((), ("workers",), ("launch",)):
    bad = _run(DATA_SERVICE, *args)
    assert bad.returncode == 2 and "Environment" in bad.stderr
