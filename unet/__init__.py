"""U-Net (Ronneberger et al., 2015) for segmenting whole-slide images: model, loss, data, tiling.

The library is plain PyTorch/NumPy and imports no cluster framework; orchestration lives in
``pipelines/``. ``unet.UNet`` is imported on first use, so that importing a light submodule
(``unet.config``, ``unet.errors``) does not load PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unet.model import UNet

__all__ = ["UNet"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "UNet":
        from unet.model import UNet

        return UNet
    raise AttributeError(f"module 'unet' has no attribute {name!r}")
