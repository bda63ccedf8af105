"""The U-Net of Ronneberger et al. (2015), as in the seed (milesial/Pytorch-UNet).

The blocks (``DoubleConv``, ``Down``, ``Up``, ``OutConv``) and ``UNet(n_channels, n_classes,
bilinear=False)`` reproduce the seed layer for layer, so the default widths have the seed's
parameter count. Additions that leave the defaults unchanged:

- ``base_channels`` (64) and ``depth`` (4) scale the network.
- ``use_checkpointing()`` really recomputes activations in the backward pass (the seed's version
  called the ``torch.utils.checkpoint`` module on a module and raised).
- ``size_multiple`` and ``halo`` expose the tiling geometry used by overlap-tile inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unet.geometry import halo_for, receptive_field_reach

__all__ = ["DoubleConv", "Down", "OutConv", "UNet", "Up", "autocast_context"]


class DoubleConv(nn.Module):
    """(3x3 convolution => BatchNorm => ReLU) * 2, with 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool, then ``DoubleConv``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Up-sample ``x1``, pad it to the skip connection ``x2``, concatenate, then ``DoubleConv``.

    ``bilinear=False`` uses a learned 2x2 transposed convolution (the paper's "up-convolution");
    ``bilinear=True`` uses bilinear interpolation (``align_corners=True``, as in the seed) and lets
    the convolutions reduce the channels.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        # Odd input sizes leave the up-sampled map smaller than the skip connection: pad it.
        diff_y = x2.size(2) - x1.size(2)
        diff_x = x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to class logits."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """U-Net with ``depth`` down/up levels and ``base_channels`` features at full resolution.

    Args:
        n_channels: input image channels.
        n_classes: output logit channels.
        bilinear: bilinear up-sampling instead of transposed convolutions.
        base_channels: width of the first level; level ``i`` has ``base_channels * 2**i``.
        depth: number of 2x down-sampling steps.
        pixel_size_um: the pixel size (micrometres) of the images it was trained on: inference reads every slide
            at it (``unet.resample``). None: unknown (slides are then read as stored).
        object_area_um2: the size distribution of its training objects, ``{"count": n, "p1": ..., "p5": ...,
            "p25": ..., "p50": ..., "p75": ..., "p95": ..., "p99": ...}`` (areas in square micrometres); the
            default minimum object size of inference derives from it. None: unknown.

    Input height and width may be any size (the ``Up`` blocks pad), but only multiples of
    ``size_multiple`` avoid that padding, which is what tiled inference relies on.
    """

    def __init__(
        self,
        n_channels: int,
        n_classes: int,
        bilinear: bool = False,
        *,
        base_channels: int = 64,
        depth: int = 4,
        pixel_size_um: float | None = None,
        object_area_um2: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.base_channels = base_channels
        self.depth = depth
        self.pixel_size_um = pixel_size_um
        self.object_area_um2 = object_area_um2
        self._checkpointing = False

        widths = [base_channels * 2**i for i in range(depth + 1)]
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, widths[0])
        # The seed halves the bottom width (and each decoder output but the last) with bilinear
        # up-sampling, because interpolation cannot reduce channels itself.
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1] // (factor if i == depth - 1 else 1)) for i in range(depth)
        )
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i] // (factor if i > 0 else 1), bilinear) for i in reversed(range(depth))
        )
        self.outc = OutConv(widths[0], n_classes)

    # -- tiling geometry -------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Input sizes that are multiples of this need no padding inside the network (2**depth)."""
        return 2**self.depth

    @property
    def receptive_field_reach(self) -> int:
        """Upper bound, in input pixels, on how far an output pixel looks to each side."""
        return receptive_field_reach(self.depth, self.bilinear)

    @property
    def halo(self) -> int:
        """Margin (input pixels) a grid-aligned tile needs on each side so that its centre equals
        whole-image inference; see ``unet.geometry``."""
        return halo_for(self.depth, self.bilinear)

    # -- activation checkpointing ----------------------------------------------------------------
    def use_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        self._checkpointing = enabled
        return self

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    def _block(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if not (self._checkpointing and self.training and torch.is_grad_enabled()):
            return block(*inputs)
        calls = 0

        def run(*args: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return block(*args)
            # The backward pass re-runs the block; BatchNorm must not count that batch twice.
            with _batchnorm_stats_frozen(block):
                return block(*args)

        return checkpoint(run, *inputs, use_reentrant=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self._block(self.inc, x)]
        for down in self.downs:
            skips.append(self._block(down, skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = self._block(up, x, skips.pop())
        return self._block(self.outc, x)

    # -- convenience -----------------------------------------------------------------------------
    def architecture(self) -> dict[str, Any]:
        """Constructor arguments: with the weights, everything needed to rebuild this model (its pixel size and
        training objects only where known, so models saved before they were recorded read the same)."""
        known = {"pixel_size_um": self.pixel_size_um, "object_area_um2": self.object_area_um2}
        return {
            "n_channels": self.n_channels,
            "n_classes": self.n_classes,
            "bilinear": self.bilinear,
            "base_channels": self.base_channels,
            "depth": self.depth,
            **{key: value for key, value in known.items() if value is not None},
        }

    @staticmethod
    def seed_key_to_port(key: str) -> str:
        """Map a seed state-dict key (``down1.…``, ``up4.…``) to this port's (``downs.0.…``, ``ups.3.…``)."""
        for prefix, target in (("down", "downs"), ("up", "ups")):
            head, _, rest = key.partition(".")
            if head.startswith(prefix) and head[len(prefix) :].isdigit():
                return f"{target}.{int(head[len(prefix) :]) - 1}.{rest}"
        return key

    def load_seed_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights saved by the seed (milesial/Pytorch-UNet), whose blocks are named down1..upN."""
        self.load_state_dict({self.seed_key_to_port(k): v for k, v in state_dict.items()})

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm running statistic in ``module`` on exit."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


def autocast_context(device_type: str, precision: str) -> contextlib.AbstractContextManager[None]:
    """Autocast for ``precision`` in {"fp32", "bf16", "fp16"}; fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device_type, dtype=dtype)
