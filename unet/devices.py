"""Which device a job runs on, checked before any work starts: one line instead of a hang or a traceback.

``check_device(setting, device, precision)`` raises ``DeviceError`` when ``device`` is ``cuda`` but PyTorch
is a CPU-only build or sees no GPU, or when ``precision`` is one the device cannot compute in;
``visible_gpus()`` lists the GPUs a job may use, as ``CUDA_VISIBLE_DEVICES`` names them.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

from unet.errors import UserError

__all__ = ["DeviceError", "check_device", "cpu_model", "cuda_build", "device_name", "visible_gpus"]


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


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``'s where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@functools.cache
def device_name(device: str) -> str:
    """What computes on ``device`` in this process, as a person names it: the GPU's model for ``cuda`` (the current
    one), else the CPU's model and its core count."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{cpu_model()} ({os.cpu_count()} cores)"
