"""TIFF, OME-TIFF and Aperio SVS levels through tifffile (any channel count, 8 or 16 bit), read as Zarr."""

from __future__ import annotations

from pathlib import Path

import tifffile
import zarr

from unet.io import pixel_size_um as tiff_pixel_size_um
from unet.slides.base import Slide, SlideError, check_level, make_slide

TIFF_ERRORS = (OSError, ValueError, IndexError, tifffile.TiffFileError, zarr.errors.BaseZarrError)


def open_tiff(path: Path, level: int) -> Slide:
    """Open with tifffile; its own errors (``_TIFF_ERRORS``) are left to the caller."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = len(series.levels)
        check_level(str(path), level, levels)
        axes = _tiff_axes(series.levels[level].axes)
        width0 = series.levels[0].shape[series.levels[0].axes.index("X")]
    array = zarr.open_array(tifffile.imread(path, aszarr=True, level=level), mode="r")
    pixel_size = tiff_pixel_size_um(path)
    if pixel_size is not None and "x" in axes:
        pixel_size *= width0 / array.shape[axes.index("x")]  # lower levels have proportionally larger pixels
    try:
        return make_slide(str(path), level, levels, axes, array, pixel_size)
    except SlideError:
        array.store.close()
        raise


def _tiff_axes(axes: str) -> str:
    """tifffile axis codes (YXS, CYX, TZCYX, ...) in NGFF letters; samples (S) are channels."""
    axes = axes.lower()
    return axes.replace("s", "c") if "c" not in axes else axes
