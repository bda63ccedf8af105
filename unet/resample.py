"""Images at a model's pixel size: which pyramid level to read, and resampling that is exact window by window.

A model is trained at one pixel size (``data.pixel_size_um``) and must see every slide at it. ``choose_level``
picks the level to read: the coarsest whose pixels are not larger than the model's (within ``TOLERANCE``), else
the finest level (which is then up-sampled). ``Resampled`` then shows that level at the model's pixel size.

Output pixel ``i`` covers source pixels ``[i * scale, (i + 1) * scale)`` (``scale``: source pixels per output
pixel), so the output's pixel grid has the same origin (the top-left corner of pixel 0) as the source's. Its
value is a weighted sum of a fixed set of source pixels, taken in a fixed order, with weights that depend only
on ``i``: the antialiased linear filter of PIL and ``torch`` (``antialias=True``), a triangle as wide as an
output pixel when down-sampling and linear interpolation when up-sampling, clamped at the image border. Reading
any window of the output therefore gives bit for bit the same pixels as resampling the whole image, which keeps
overlap-tile inference exact at the model's resolution (``unet.tiling``); the libraries that resample whole
arrays (``scipy.ndimage.zoom``, OpenCV, PIL) would differ at every window's edge. Labels are resampled by nearest
neighbour, so ids are kept and never blended.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TOLERANCE = 0.05  # pixel sizes within 5% of each other are the same resolution: read as stored, no resampling


def same_size(a: float, b: float, tolerance: float = TOLERANCE) -> bool:
    """Whether pixel sizes ``a`` and ``b`` differ by at most ``tolerance`` (relative)."""
    return abs(a / b - 1) <= tolerance


def resampled_length(length: int, scale: float) -> int:
    """Pixels along an axis of ``length`` source pixels at ``scale`` source pixels per output pixel."""
    return max(1, round(length / scale))


def choose_level(pixel_sizes: list[float], target: float, tolerance: float = TOLERANCE) -> int:
    """The level to read for pixel size ``target``: the coarsest of those not coarser than it (within
    ``tolerance``), else the finest. ``pixel_sizes`` are the levels' pixel sizes, level 0 first."""
    fine_enough = [level for level, size in enumerate(pixel_sizes) if size <= target * (1 + tolerance)]
    if fine_enough:
        return max(fine_enough, key=lambda level: pixel_sizes[level])
    return min(range(len(pixel_sizes)), key=lambda level: pixel_sizes[level])


def taps(start: int, stop: int, scale: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (each (stop - start, taps)) of output pixels ``start..stop-1`` along an axis
    of ``length`` source pixels; row ``i`` depends only on the output index, never on the window."""
    support = max(scale, 1.0)  # half-width of the triangle, in source pixels
    count = math.ceil(2 * support) + 1
    centre = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5
    index = np.floor(centre - support).astype(np.int64)[:, None] + 1 + np.arange(count)
    weight = np.clip(1 - np.abs(index - centre[:, None]) / support, 0, None)
    weight[(index < 0) | (index >= length)] = 0  # clamped at the border: the weights left are renormalised
    weight /= weight.sum(axis=1, keepdims=True)
    return np.clip(index, 0, length - 1), weight.astype(np.float32)


def _filter_rows(values: np.ndarray, index: np.ndarray, weight: np.ndarray, first: int) -> np.ndarray:
    """Weighted sums of rows (axis -2) of float32 ``values`` (whose row 0 is source row ``first``), tap by tap in
    order: whole rows are gathered (contiguous copies), the fastest way NumPy has."""
    index = index - first
    total = np.take(values, index[:, 0], axis=-2)
    total *= weight[:, 0, None]
    for tap in range(1, index.shape[1]):
        gathered = np.take(values, index[:, tap], axis=-2)
        gathered *= weight[:, tap, None]
        total += gathered
    return total


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Filtered values in the source's dtype: integers rounded to nearest and clipped to their range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        high = float(info.max) if float(info.max) <= info.max else np.nextafter(float(info.max), 0)  # 64-bit ids
        values = np.rint(np.clip(values, info.min, high, out=values), out=values)
    return values.astype(dtype, copy=False)


def resample_window(
    read: Callable[[int, int, int, int], np.ndarray],
    size: tuple[int, int],
    scale: float,
    window: tuple[int, int, int, int],
) -> np.ndarray:
    """Output pixels ``window`` = (y0, y1, x0, x1) of a (..., H, W) source of ``size`` (H, W) read by
    ``read(y0, y1, x0, x1)``, at ``scale`` source pixels per output pixel, in the source's dtype."""
    y0, y1, x0, x1 = window
    rows, row_weights = taps(y0, y1, scale, size[0])
    cols, col_weights = taps(x0, x1, scale, size[1])
    top, left = int(rows.min()), int(cols.min())
    source = read(top, int(rows.max()) + 1, left, int(cols.max()) + 1)
    precise = np.float64 if source.dtype.itemsize >= 4 else np.float32  # float32 holds 16-bit values exactly
    values = _filter_rows(source.astype(precise, copy=False), rows, row_weights, top)
    values = np.ascontiguousarray(np.swapaxes(values, -1, -2))  # columns as rows: gathered whole as well
    values = _filter_rows(values, cols, col_weights, left)
    return _as_dtype(np.swapaxes(values, -1, -2), source.dtype)


def resample_image(image: np.ndarray, scale: float) -> np.ndarray:
    """A whole (..., H, W) image at ``scale`` source pixels per output pixel (``resample_window``'s rule)."""
    height, width = image.shape[-2:]
    shape = (resampled_length(height, scale), resampled_length(width, scale))
    return resample_window(lambda y0, y1, x0, x1: image[..., y0:y1, x0:x1], (height, width), scale,
                           (0, shape[0], 0, shape[1]))  # fmt: skip


def nearest_indices(start: int, stop: int, scale: float, source_length: int) -> np.ndarray:
    """For output pixels ``start..stop-1``, the source index whose pixel holds each one's centre (nearest
    neighbour), at ``scale`` source pixels per output pixel."""
    centre = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale
    return np.clip(np.floor(centre).astype(np.int64), 0, source_length - 1)


def resample_labels(labels: np.ndarray, scale: float) -> np.ndarray:
    """A (..., H, W) label image at ``scale`` by nearest neighbour: every id kept, none blended."""
    height, width = labels.shape[-2:]
    rows = nearest_indices(0, resampled_length(height, scale), scale, height)
    cols = nearest_indices(0, resampled_length(width, scale), scale, width)
    return labels[..., rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class Resampled:
    """A slide level (``unet.slides.Slide``) seen at ``scale`` source pixels per output pixel: ``read`` returns
    windows of the resampled image, exact whatever the window. It stands in for a ``Slide`` where inference
    reads pixels (``path``, ``levels``, ``channels``, ``height``, ``width``, ``dtype``, ``pixel_size_um``)."""

    source: object  # a unet.slides.Slide
    scale: float

    @property
    def height(self) -> int:
        return resampled_length(self.source.height, self.scale)

    @property
    def width(self) -> int:
        return resampled_length(self.source.width, self.scale)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.source.channels, self.height, self.width

    @property
    def pixel_size_um(self) -> float | None:
        size = self.source.pixel_size_um
        return None if size is None else size * self.scale

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def level(self) -> int:
        return self.source.level

    @property
    def levels(self) -> int:
        return self.source.levels

    @property
    def channels(self) -> int:
        return self.source.channels

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The window ``[y0:y1, x0:x1]`` of the resampled level as (C, y1 - y0, x1 - x0)."""
        from unet.slides import SlideError

        y0, y1, x0, x1 = (operator.index(v) for v in (y0, y1, x0, x1))
        if not (0 <= y0 <= y1 <= self.height and 0 <= x0 <= x1 <= self.width):
            raise SlideError(f"{self.path}: window y {y0}:{y1}, x {x0}:{x1} is outside the resampled level "
                             f"({self.height} x {self.width} pixels)")  # fmt: skip
        if y0 == y1 or x0 == x1:
            return np.zeros((self.channels, y1 - y0, x1 - x0), self.dtype)
        size = (self.source.height, self.source.width)
        return resample_window(self.source.read, size, self.scale, (y0, y1, x0, x1))

    def close(self) -> None:
        self.source.close()
