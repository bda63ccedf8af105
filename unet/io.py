"""Reading and writing images: TIFF (and Aperio SVS), PNG/JPEG, NumPy and Zarr arrays."""

from __future__ import annotations

import io
from pathlib import Path

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
