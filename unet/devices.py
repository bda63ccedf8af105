"""Which device a job runs on, checked before any work starts: one line instead of a hang or a traceback.

``check_device(setting, device, precision)`` raises ``DeviceError`` when ``device`` is ``cuda`` but PyTorch
is a CPU-only build or sees no GPU, or when ``precision`` is one the device cannot compute in;
``compute_precision(precision, device)`` turns ``auto`` into the precision the device computes fastest in;
``visible_gpus()`` lists the GPUs a job may use, as ``CUDA_VISIBLE_DEVICES`` names them.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

from unet.errors import UserError

__all__ = ["DeviceError", "check_device", "compute_precision", "cpu_computes_bf16", "cpu_model", "cuda_build",
           "device_name", "pass_budget_mb", "visible_gpus"]  # fmt: skip

# The largest forward pass on a CPU: measured fastest below it (docs/benchmarks.md, "Choosing the chunk size").
CPU_PASS_MEMORY_MB = 2048
# On CUDA, the share of the GPU's free memory one pass may take: the rest holds cuDNN's workspaces, the chunks
# being copied in (infer.tasks_per_worker of them) and the allocator's slack.
GPU_PASS_SHARE = 0.75


class DeviceError(UserError):
    """A device or precision that this machine cannot provide."""


def cuda_build() -> str | None:
    """The CUDA version PyTorch was built for, or None for a CPU-only build."""
    return torch.version.cuda


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by the names ``CUDA_VISIBLE_DEVICES`` would give them (indices or UUIDs)."""
    count = torch.cuda.device_count() if cuda_build() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [name.strip() for name in listed.split(",") if name.strip()][:count]


def check_device(setting: str, device: str, precision: str = "fp32") -> None:
    """Raise ``DeviceError`` naming ``setting`` (the config key) unless ``device`` can run ``precision``."""
    if device != "cuda":
        return
    if cuda_build() is None:
        raise DeviceError(
            f"{setting} is cuda but PyTorch {torch.__version__} is a CPU-only build; install a CUDA build "
            "(README, 'Installing') or set it to cpu"
        )
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{setting} is cuda but PyTorch (built for CUDA {cuda_build()}) sees no GPU: check the driver "
            f"(nvidia-smi; CUDA {cuda_build()} needs a recent one) and CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name()} cannot compute in bf16 ({setting}); use fp16 or fp32")


def compute_precision(precision: str, device: torch.device | str) -> str:
    """The autocast precision a pass on ``device`` runs in: ``precision`` as set, or for ``auto`` bf16 where the
    device computes it in hardware (a CUDA GPU that supports it: Ampere and later; a CPU with bf16 instructions,
    ``cpu_computes_bf16``) and fp32 elsewhere, where bf16 is emulated: 2.6x slower than fp32 on an AVX-512 Xeon
    without them (README, "Inference defaults")."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_computes_bf16() else "fp32"


def cpu_computes_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has bf16 instructions (``flags``: its feature flags, by default ``/proc/cpuinfo``'s, x86-64's
    "flags" or Arm's "Features"): AVX512-BF16 or AMX on x86-64, the bf16 extension on Arm. Where the flags cannot be
    read (macOS): False."""
    if flags is None:
        flags = frozenset((_cpuinfo("flags", "Features") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``'s where there is one)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def _cpuinfo(*keys: str) -> str | None:
    """The first processor's value of the first of ``keys`` that ``/proc/cpuinfo`` lists; None without one."""
    try:
        with open("/proc/cpuinfo") as info:
            fields = (line.partition(":") for line in info)
            return next(value.strip() for key, _, value in fields if key.strip() in keys)
    except (OSError, StopIteration):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a Slurm job's, ``taskset``'s, a container's cpuset), not
    every core of the machine as ``os.cpu_count()`` says; more threads than these only wait for one another."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


@functools.cache
def device_name(device: str, precision: str | None = None) -> str:
    """What computes on ``device`` in this process, as a person names it: the GPU's model for ``cuda`` (the current
    one), else the CPU's model and its core count; then, where ``precision`` is given, the one it computes in
    (``compute_precision``), e.g. "AMD EPYC 7B13 (2 cores), bf16"."""
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        name = f"{cpu_model()} ({usable_cores()} cores)"
    return f"{name}, {compute_precision(precision, device)}" if precision else name


def pass_budget_mb(device: torch.device | str) -> int:
    """The default largest memory (MB) of one forward pass on ``device`` (``infer.pass_memory_mb: null``): on CUDA
    ``GPU_PASS_SHARE`` of its free memory now (an H100 with 80 GB free: 60 GB, a 2048-px chunk of the paper's
    base-64 model in one pass), on a CPU ``CPU_PASS_MEMORY_MB``."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_PASS_MEMORY_MB
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * GPU_PASS_SHARE / 1e6))
