"""The U-Net as inference runs it: the same function, fewer passes over memory.

A large forward pass on a CPU is bound by memory traffic more than by arithmetic: in a base-16
U-Net on a 1216 x 1216 input, the bf16 ReLUs alone took 24% of the time and the BatchNorms, as
separate passes, more (docs/benchmarks.md). ``inference_model`` therefore returns a copy of the
model in which

- every BatchNorm is folded into the convolution before it (exact up to float rounding), and
- on CPU, every convolution + ReLU pair runs as one oneDNN call with the ReLU fused
  (``torch.ops.mkldnn._convolution_pointwise``, the kernel PyTorch's own compiler emits for it);
  where that kernel is missing, or on other devices, it runs as convolution then ReLU.

Autocast is honoured: under bf16/fp16 autocast the fused call computes in that type, as the
plain convolution would.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from unet.model import UNet

__all__ = ["ConvReLU", "inference_model"]


def _has_fused_kernel() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvReLU(nn.Module):
    """``relu(conv(x))`` for inference, one oneDNN call on CPU."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self._weights: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not _FUSED or torch.is_grad_enabled():
            return torch.relu_(self.conv(x))
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.conv.weight.dtype
        weight, bias = self._cast(dtype, x.device)
        conv = self.conv
        with torch.autocast("cpu", enabled=False):
            return torch.ops.mkldnn._convolution_pointwise(
                x.to(dtype), weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "relu", [], ""
            )

    def _cast(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights in ``dtype`` (cast once, not at every call as autocast does)."""
        key = (dtype, device)
        if key not in self._weights:
            weight = self.conv.weight.detach().to(device, dtype).contiguous(memory_format=torch.channels_last)
            bias = None if self.conv.bias is None else self.conv.bias.detach().to(device, dtype)
            self._weights[key] = (weight, bias)
        return self._weights[key]


_FUSED = _has_fused_kernel()


def _fuse(sequence: nn.Sequential) -> None:
    """In place: (Conv2d, BatchNorm2d) -> folded Conv2d; (Conv2d, ReLU) -> ConvReLU."""
    layers, index = [], 0
    while index < len(sequence):
        layer = sequence[index]
        following = sequence[index + 1] if index + 1 < len(sequence) else None
        if isinstance(layer, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
            layer = fuse_conv_bn_eval(layer, following)
            index += 1
            following = sequence[index + 1] if index + 1 < len(sequence) else None
        if isinstance(layer, nn.Conv2d) and isinstance(following, nn.ReLU):
            layer = ConvReLU(layer)
            index += 1
        layers.append(layer)
        index += 1
    for position in range(len(sequence) - 1, -1, -1):
        del sequence[position]
    for layer in layers:
        sequence.append(layer)


def inference_model(model: UNet, channels_last: bool = True) -> UNet:
    """An eval-mode copy of ``model`` for prediction: BatchNorm folded, ReLU fused (see above). ``model`` is
    unchanged; the copy computes the same function (to float rounding) and is meant for no-grad use."""
    fast = copy.deepcopy(model).eval()
    for module in list(fast.modules()):
        if isinstance(module, nn.Sequential):
            _fuse(module)
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last) if channels_last else fast
