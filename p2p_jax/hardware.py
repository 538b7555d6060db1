"""What a device can do: its vendor's peak FLOP rate per dtype, and its memory in use;
whether this CPU multiplies bfloat16 in hardware; how glibc's malloc is set for CPU steps.

Model FLOP utilisation (MFU) divides the model's FLOPs per second (counted from
the layer shapes, `step.model_flops`) by the device's peak for the compute
dtype. On accelerators the peaks are the vendors' dense figures (no structured
sparsity) for one chip; on a CPU, where no vendor figure fits the machine at
hand, the benchmark uses the dense matmul rate it measures in the same run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import os
import platform
import sys
from typing import Any


@dataclasses.dataclass(frozen=True)
class Peak:
  name: str
  bfloat16_tflops: float
  float32_tflops: float
  source: str


# Matched against `device.device_kind` (case-insensitive substrings, first match wins).
# float32: NVIDIA's TF32 tensor-core rate, since XLA's default matmul and convolution
# precision runs float32 in TF32 on these GPUs; TPUs state no float32 rate and XLA's
# default precision runs float32 matmuls as bfloat16 passes, so the bfloat16 peak is used.
PEAKS = (
    (("h200",), Peak("NVIDIA H200", 989.4, 494.7,
                     "NVIDIA H200 Tensor Core GPU datasheet (SXM): 1,979 BF16 / 989 TF32 "
                     "TFLOPS with sparsity, halved for dense")),
    (("h100 pcie",), Peak("NVIDIA H100 PCIe", 756.0, 378.0,
                            "NVIDIA H100 Tensor Core GPU datasheet (PCIe): 1,513 BF16 / 756 "
                            "TF32 TFLOPS with sparsity, halved for dense")),
    (("h100",), Peak("NVIDIA H100 SXM", 989.4, 494.7,
                     "NVIDIA H100 Tensor Core GPU datasheet (SXM): 1,979 BF16 / 989 TF32 "
                     "TFLOPS with sparsity, halved for dense")),
    (("a100",), Peak("NVIDIA A100", 312.0, 156.0,
                     "NVIDIA A100 Tensor Core GPU datasheet: 312 BF16 / 156 TF32 TFLOPS dense")),
    (("tpu v4",), Peak("TPU v4", 275.0, 275.0,
                       "Google Cloud TPU v4 documentation: 275 BF16 TFLOPS per chip")),
    (("tpu v5 lite", "tpu v5e"), Peak("TPU v5e", 197.0, 197.0,
                                      "Google Cloud TPU v5e documentation: 197 BF16 TFLOPS "
                                      "per chip")),
    (("tpu v5p", "tpu v5"), Peak("TPU v5p", 459.0, 459.0,
                                 "Google Cloud TPU v5p documentation: 459 BF16 TFLOPS per chip")),
    (("tpu v6", "trillium"), Peak("TPU v6e", 918.0, 918.0,
                                  "Google Cloud TPU v6e (Trillium) documentation: 918 BF16 "
                                  "TFLOPS per chip")),
)


def vendor_peak(device_kind: str) -> Peak | None:
  """The vendor peak for a `device.device_kind`, or None where the table has none (CPUs)."""
  kind = device_kind.lower()
  for patterns, peak in PEAKS:
    if any(pattern in kind for pattern in patterns):
      return peak
  return None


def peak_flops(peak: Peak, dtype: str) -> float:
  """FLOP/s of one chip for the compute `dtype` ("float32" or "bfloat16")."""
  return 1e12 * (peak.bfloat16_tflops if dtype == "bfloat16" else peak.float32_tflops)


def memory_mb(devices: list[Any]) -> dict[str, float | None]:
  """{'in_use', 'peak'}: MiB summed over `devices`, where the backend reports it (else None)."""
  totals = {"in_use": 0.0, "peak": 0.0}
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  # CPU: not implemented
      stats = None
    if not stats or "bytes_in_use" not in stats:
      return {"in_use": None, "peak": None}
    totals["in_use"] += stats["bytes_in_use"] / 2 ** 20
    totals["peak"] += stats.get("peak_bytes_in_use", stats["bytes_in_use"]) / 2 ** 20
  return totals


def num_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    return os.cpu_count() or 1


# /proc/cpuinfo flags of CPUs that multiply bfloat16 in hardware: Intel's AMX tiles
# (Sapphire Rapids and later) and the AVX-512 BF16 dot products (Intel Cooper Lake and
# later, AMD Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


# Set to 1 or 0, it overrides what /proc/cpuinfo says: for a VM or container that hides
# the flags, or to run (and measure the memory and numerics of) the bfloat16 dot forms
# on any CPU.
BF16_UNITS_ENV = "P2P_JAX_CPU_BFLOAT16_UNITS"


@functools.cache
def cpu_bfloat16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this machine's CPU multiplies bfloat16 in hardware (`BF16_CPU_FLAGS`), read once.

  There XLA:CPU's bfloat16 dots run at 2x (AVX-512 BF16) to 5x (AMX) its float32
  rate, while its bfloat16 convolutions run no faster than float32 ones. False where
  the flags cannot be read (not Linux). `P2P_JAX_CPU_BFLOAT16_UNITS=1` (or 0) overrides
  the flags.
  """
  override = os.environ.get(BF16_UNITS_ENV, "").strip()
  if override:
    if override not in ("0", "1"):
      raise ValueError(f"{BF16_UNITS_ENV}={override!r}: set it to 1 (the CPU has bfloat16 "
                       "units), 0 (it has none), or unset it to read /proc/cpuinfo.")
    return override == "1"
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return bool(set(line.split(":", 1)[1].split()) & set(BF16_CPU_FLAGS))
  except OSError:
    pass
  return False


# glibc's mallopt parameters (malloc.h), and the environment variables through which a
# user sets the same ones: an explicit setting of theirs wins.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_GLIBC_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                     "GLIBC_TUNABLES")
# JAX's accelerator plugins: where one is installed, the step's memory is the device's.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")
# Set to 0, glibc keeps its defaults; set to 1, the policy applies even beside an
# accelerator plugin (a CPU run on a GPU host).
KEEP_MEMORY_ENV = "P2P_JAX_KEEP_FREED_MEMORY"
# What `keep_freed_memory` did in this process: None until it runs.
freed_memory_policy: str | None = None


def keep_freed_memory() -> str:
  """Has glibc keep freed memory for reuse, on a CPU-only Linux host; says what it did.

  XLA:CPU allocates every compiled step's scratch memory (hundreds of MB for
  unet_256 at batch 4) afresh on each call, from a thread's own malloc arena,
  which can hold no block over 64 MB and so maps each from the kernel and unmaps
  it again when the step ends: every page of it faults in again on every step
  (176,000 faults; the bfloat16 step at 4x256 took 0.85 s with them on a 2-core
  VM, 0.67 s without). One arena, no mmap and a 2 GiB trim threshold keep the
  blocks in the heap, and a step reuses the last one's pages. The cost: the
  process holds its peak heap (up to 1.5 GB more resident memory at 4x256), and
  one arena serialises large allocations across threads, so it applies only
  where no accelerator plugin is installed. It must run before a second thread
  allocates: glibc fixes its arena count then. p2p_jax's programs
  (`python -m p2p_jax.<program>`) call it from the package's import, before NumPy,
  TensorFlow or XLA start threads.
  """
  global freed_memory_policy
  setting = os.environ.get(KEEP_MEMORY_ENV, "").strip()
  if setting not in ("", "0", "1"):
    reason = f"{KEEP_MEMORY_ENV}={setting!r} is not 0 or 1; glibc's defaults kept"
  elif setting == "0":
    reason = f"glibc's defaults ({KEEP_MEMORY_ENV}=0)"
  elif not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    reason = "not glibc: its defaults kept"
  elif any(name in os.environ for name in _GLIBC_MALLOC_ENV):
    reason = "glibc's malloc as the environment sets it"
  elif setting != "1" and any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
    reason = "glibc's defaults (an accelerator plugin is installed)"
  else:
    libc = ctypes.CDLL(None)
    done = all(libc.mallopt(option, value) == 1 for option, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    reason = ("glibc keeps freed memory for reuse (one arena, no mmap, trim above 2 GiB)"
              if done else "glibc refused mallopt: its defaults kept")
  freed_memory_policy = reason
  return reason
