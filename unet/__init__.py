"""U-Net (Ronneberger et al., 2015) for segmenting whole-slide images: model, loss, data, tiling.

The library is plain PyTorch/NumPy and imports no cluster framework; orchestration lives in
``pipelines/``.
"""

from unet.model import UNet

__all__ = ["UNet"]
__version__ = "0.1.0"
