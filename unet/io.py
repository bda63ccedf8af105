"""Reading and writing images: TIFF (and Aperio SVS), PNG/JPEG, NumPy and Zarr arrays."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from unet import storage
from unet.errors import UserError

TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SUPPORTED = sorted(TIFF_SUFFIXES | PIL_SUFFIXES | {".npy", ".zarr"})


class ImageReadError(UserError):
    """An image file is missing, of an unsupported type, or unreadable."""


def image_suffix(path: Path) -> str:
    """Lower-case suffix, keeping the double suffix of ``.ome.tif(f)``."""
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def read_image(path: str | Path) -> np.ndarray:
    """Read a whole image into memory as it is stored (YX or YXC for 2-D images).

    For slides larger than memory, use ``pipelines.convert`` and read the Zarr lazily instead.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image not found: {path}")
    suffix = image_suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            return tifffile.imread(path, level=0) if suffix == ".svs" else tifffile.imread(path)
        if suffix in PIL_SUFFIXES:
            with Image.open(path) as img:
                return np.asarray(img)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".zarr":
            import zarr

            return np.asarray(zarr.open_array(path, mode="r"))
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None
    raise ImageReadError(f"unsupported image type {suffix!r} for {path}; supported: {', '.join(SUPPORTED)}")


def write_png(location: str | Path, rgb: np.ndarray) -> str:
    """Write an HxWx3 (or HxW) uint8 array as PNG to a path (parent folders created) or URL."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return storage.write_bytes(location, buffer.getvalue())


def intensity_range_from_histogram(counts: np.ndarray, low: float = 1.0, high: float = 99.8) -> tuple[float, float]:
    """Exact (``low``, ``high``) percentiles of an integer channel from its value histogram."""
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    if total == 0:
        return 0.0, 1.0
    lo = int(np.searchsorted(cumulative, total * low / 100.0))
    hi = int(np.searchsorted(cumulative, total * high / 100.0))
    return float(lo), float(max(hi, lo + 1))


def intensity_ranges(image: Any) -> tuple[tuple[float, float], ...]:
    """Per-channel normalisation range of a CYX image (NumPy, lazy Dask, or a ``unet.slide.Slide``), the same
    rule for training and inference: 8-bit images 0..255, others their (1, 99.8) percentiles, exact for integer
    images (from a histogram; Dask merges per-chunk percentiles of floating-point images: close, not exact)."""
    if np.dtype(image.dtype) == np.uint8:  # nothing to read
        return ((0.0, 255.0),) * image.shape[0]
    if isinstance(image, np.ndarray):  # in memory already: NumPy alone, no Dask
        return tuple(_channel_range(channel) for channel in image)
    import dask.array as da  # lazy images only: the library stays importable without a scheduler

    image = image.to_dask() if hasattr(image, "to_dask") else da.asarray(image)
    ranges = []
    for channel in image:
        if image.dtype.kind in "iu":
            values = channel.ravel().astype(np.int64)
            shift = int(values.min().compute())
            lo, hi = intensity_range_from_histogram(da.bincount(values - shift).compute())
            ranges.append((lo + shift, hi + shift))
        else:
            lo, hi = da.percentile(channel.ravel().astype(np.float64), [1.0, 99.8]).compute()
            ranges.append((float(lo), float(max(hi, lo + 1e-6))))
    return tuple(ranges)


def _channel_range(channel: np.ndarray) -> tuple[float, float]:
    """``intensity_ranges``' rule for one in-memory channel."""
    if channel.dtype.kind in "iu":
        values = channel.ravel().astype(np.int64)
        shift = int(values.min())
        lo, hi = intensity_range_from_histogram(np.bincount(values - shift))
        return lo + shift, hi + shift
    lo, hi = np.percentile(channel.ravel().astype(np.float64), [1.0, 99.8])
    return float(lo), float(max(hi, lo + 1e-6))


def scale_intensity(image: Any, ranges: Sequence[tuple[float, float]] | np.ndarray) -> Any:
    """Image(s) ``(..., C, Y, X)`` to float32 with channel ``c`` mapped from ``ranges[c]`` = (lo, hi) to (0, 1).

    The one normalisation rule of training and inference. ``image`` is a NumPy array, or a PyTorch tensor (on any
    device, so that inference can scale 8-bit pixels after copying them to a GPU); both compute in float32.
    """
    ranges = np.asarray(ranges, np.float32).reshape(-1, 2)
    lo = ranges[:, 0].reshape(-1, 1, 1)
    span = np.maximum(ranges[:, 1].reshape(-1, 1, 1) - lo, np.float32(1e-6))
    if isinstance(image, np.ndarray):
        scaled = image.astype(np.float32)  # one new array, then in place: this runs on every inference chunk
        scaled -= lo
        scaled /= span
        return scaled
    import torch  # a tensor was given: PyTorch is already loaded

    scaled = image.to(torch.float32, copy=True)
    scaled -= torch.as_tensor(lo, device=image.device)
    scaled /= torch.as_tensor(span, device=image.device)
    return scaled


def pixel_size_um(path: str | Path) -> float | None:
    """Pixel size in micrometres from TIFF metadata (Aperio MPP, OME PhysicalSizeX, resolution tags)."""
    path = Path(path)
    if image_suffix(path) not in TIFF_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if tif.is_svs:
                return float(tifffile.tifffile.svs_description_metadata(page.description)["MPP"])
            if tif.is_ome and tif.ome_metadata and "PhysicalSizeX=" in tif.ome_metadata:
                value = tif.ome_metadata.split('PhysicalSizeX="', 1)[1].split('"', 1)[0]
                return float(value)
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                numerator, denominator = tags["XResolution"].value
                per_unit = numerator / denominator if denominator else 0
                unit = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value))
                if per_unit > 1 and unit:  # 1 pixel per unit means "unknown" in practice
                    return unit / per_unit
    except (OSError, KeyError, ValueError, IndexError, tifffile.TiffFileError):
        return None
    return None
