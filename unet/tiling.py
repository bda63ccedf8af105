"""Overlap-tile geometry (the paper's Fig. 2), free of any I/O or scheduling.

A slide is cut into output *chunks* (one Zarr chunk, one Dask task each), and each chunk into
output *tiles* of ``tile`` pixels (batched through the model). A tile's input is the tile grown
by the model's ``halo`` on every side; where that leaves the slide, pixels are mirrored about
the slide border (``numpy.pad(mode="reflect")``). Tile origins sit on multiples of ``tile``,
itself a multiple of the model's ``size_multiple``, so every tile sees the same pooling grid as
whole-image inference of the mirror-padded slide, and the centre of each tile equals it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Region:
    """A half-open rectangle ``[y0, y1) x [x0, x1)`` in slide pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def relative_to(self, outer: Region) -> tuple[slice, slice]:
        """Slices of this region inside an array holding ``outer``."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)


def grid(height: int, width: int, step: int) -> Iterator[tuple[tuple[int, int], Region]]:
    """((row, col), region) of a regular grid of ``step``-sized cells, clipped at the slide border."""
    for row, y0 in enumerate(range(0, height, step)):
        for col, x0 in enumerate(range(0, width, step)):
            yield (row, col), Region(y0, min(y0 + step, height), x0, min(x0 + step, width))


def tiles_of(chunk: Region, tile: int, height: int, width: int) -> list[Region]:
    """The output tiles covering ``chunk`` (clipped to the slide); chunk origins are tile-aligned."""
    return [
        Region(y0, min(y0 + tile, chunk.y1, height), x0, min(x0 + tile, chunk.x1, width))
        for y0 in range(chunk.y0, chunk.y1, tile)
        for x0 in range(chunk.x0, chunk.x1, tile)
    ]


def input_region(tile_region: Region, tile: int, halo: int) -> Region:
    """The model input for an output tile: the full tile (even at the slide edge) plus the halo."""
    return Region(
        tile_region.y0 - halo, tile_region.y0 + tile + halo, tile_region.x0 - halo, tile_region.x0 + tile + halo
    )


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices of virtual coordinates ``start..stop-1`` mirrored into ``[0, size)``.

    The same mapping as ``numpy.pad(mode="reflect")`` (edge pixel not repeated), for any pad width.
    """
    coords = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(coords)
    period = 2 * (size - 1)
    folded = np.mod(coords, period)
    return np.where(folded < size, folded, period - folded)


def read_mirrored(
    read: Callable[[int, int, int, int], np.ndarray], height: int, width: int, region: Region
) -> np.ndarray:
    """``region`` of a (C, height, width) slide, mirror-padded where it leaves the slide.

    ``read(y0, y1, x0, x1)`` must return the in-bounds window (C, y1-y0, x1-x0); only the
    bounding box of the needed source pixels is read.
    """
    rows = reflect_indices(region.y0, region.y1, height)
    cols = reflect_indices(region.x0, region.x1, width)
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    window = read(y0, y1, x0, x1)
    return window[:, rows - y0][:, :, cols - x0]


def crop_to_tile(prediction: np.ndarray, tile_region: Region, halo: int) -> np.ndarray:
    """The part of a tile prediction (..., tile+2*halo, tile+2*halo) that belongs to ``tile_region``."""
    return prediction[..., halo : halo + tile_region.height, halo : halo + tile_region.width]


def padded_reference_shape(
    height: int, width: int, halo: int, multiple: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """np.pad widths that turn a slide into the input whose whole-image inference tiles reproduce."""
    return (halo, halo + (-height) % multiple), (halo, halo + (-width) % multiple)
