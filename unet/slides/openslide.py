"""Slides read through OpenSlide (``openslide-python`` with the library from the ``openslide-bin`` wheel): every
vendor format OpenSlide detects, as 8-bit RGB composited over white. ``unet.slides.open_slide`` sends a file here
by its content; this module only knows how to read one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unet.errors import one_line
from unet.slides.base import MAX_CHUNK_BYTES, READABLE, Slide, SlideError, check_level, make_slide


def openslide_vendor(path: str | Path) -> str | None:
    """The format OpenSlide detects in a local file by its content ("aperio", "mirax", ...), or None."""
    import openslide  # here, not at the top: loading the library would slow every command's start

    try:
        return openslide.OpenSlide.detect_format(path)
    except (OSError, openslide.OpenSlideError):
        return None


def open_openslide(path: str | Path, level: int = 0) -> Slide:
    """Open ``level`` of a slide through OpenSlide, whatever its format, as 8-bit RGB (axes yxc)."""
    import openslide

    try:
        handle = openslide.OpenSlide(path)
    except (OSError, openslide.OpenSlideError) as exc:
        reason = one_line(exc)
        raise SlideError(f"{path}: OpenSlide cannot read it ({reason}); readable: {READABLE}") from None
    try:
        check_level(str(path), level, handle.level_count)
        try:
            mpp = float(handle.properties[openslide.PROPERTY_NAME_MPP_X])
        except (KeyError, ValueError):
            mpp = 0.0
        pixel_size = mpp * handle.level_downsamples[level] if mpp > 0 else None
        level_array = OpenSlideLevel(handle, level, str(path))
        slide = make_slide(str(path), level, handle.level_count, "yxc", level_array, pixel_size)
        _check_openslide_tiles(str(path), level, handle.properties)
        return slide
    except BaseException:
        handle.close()
        raise


def _check_openslide_tiles(path: str, level: int, properties: Any) -> None:
    """Refuse a level whose tiles (as OpenSlide reports them, where it does) exceed ``MAX_CHUNK_BYTES`` decoded:
    OpenSlide decodes a whole tile, as RGBA, to read one pixel of it, and aborts the process when that fails."""
    try:
        height = int(properties[f"openslide.level[{level}].tile-height"])
        width = int(properties[f"openslide.level[{level}].tile-width"])
    except (KeyError, ValueError):
        return
    tile_bytes = height * width * 4
    if tile_bytes > MAX_CHUNK_BYTES:
        raise SlideError(
            f"{path}: level {level} is stored in tiles of {height:,} x {width:,} pixels ({tile_bytes / 2**20:,.0f} "
            f"MiB decoded), more than unet.slides.MAX_CHUNK_BYTES = {MAX_CHUNK_BYTES // 2**20:,} MiB: reading any "
            "pixel would decode a whole tile"
        )


class OpenSlideLevel:
    """One level of an OpenSlide slide as a read-only (H, W, 3) uint8 array, indexed ``[y0:y1, x0:x1, :]``.

    OpenSlide's RGBA is composited over white: pixels outside the scanned area (alpha 0) become white glass.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, handle: Any, level: int, path: str) -> None:
        self.handle, self.level, self.path, self.closed = handle, level, path, False
        width, height = handle.level_dimensions[level]
        self.shape = (int(height), int(width), 3)
        self.downsample = float(handle.level_downsamples[level])

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if not isinstance(key, tuple) or not 2 <= len(key) <= 3 or not all(isinstance(k, slice) for k in key[:2]):
            raise IndexError(f"an OpenSlide level takes [y0:y1, x0:x1(, channels)], not {key!r}")
        (y0, y1, ystep), (x0, x1, xstep) = (k.indices(n) for k, n in zip(key[:2], self.shape, strict=False))
        if ystep != 1 or xstep != 1:
            raise IndexError("an OpenSlide level is read in unit steps")
        height, width = max(y1 - y0, 0), max(x1 - x0, 0)
        if height and width:
            # read_region takes its corner in level-0 pixels, which OpenSlide divides by its float downsample: at a
            # downsample like 4.0001 it draws the window at a sub-pixel offset, i.e. resampled (a known OpenSlide
            # behaviour, openslide/openslide#256); level 0 and exact downsamples (2, 4, ...) read exact pixels
            corner = (round(x0 * self.downsample), round(y0 * self.downsample))
            rgb = _over_white(np.asarray(self._read_region(corner, (width, height))))
        else:
            rgb = np.full((height, width, 3), 255, np.uint8)  # read_region has nothing to give
        return rgb[:, :, key[2]] if len(key) == 3 else rgb

    def _read_region(self, corner: tuple[int, int], size: tuple[int, int]) -> Any:
        import openslide

        try:
            return self.handle.read_region(corner, self.level, size)
        except openslide.OpenSlideError as exc:  # a corrupt tile: OpenSlide's handle is unusable after it
            reason = one_line(exc)
            raise SlideError(f"{self.path}: OpenSlide cannot read level {self.level} at {corner} ({reason})") from None

    def close(self) -> None:
        if not self.closed:  # OpenSlide refuses a second close; Slide.close may come from both a with and a finally
            self.closed = True
            self.handle.close()


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite (non-premultiplied, as openslide-python returns it) RGBA over white, rounded to uint8."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
