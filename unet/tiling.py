"""Overlap-tile geometry (the paper's Fig. 2), free of any I/O or scheduling.

A slide is cut into output *chunks* (one Zarr chunk, one Dask task each). A chunk is predicted in
one forward pass, or, when that would not fit in memory, in output *tiles* of ``tile`` pixels.
The input of a chunk or tile is its output region, widened to the model's pooling grid
(multiples of ``size_multiple``) and grown by the model's ``halo`` on every side; where that
leaves the slide, pixels are mirrored about the slide border (``numpy.pad(mode="reflect")``).
Every pass thus sees the same pooling grid as whole-image inference of the mirror-padded slide,
and the part of it over the output region equals it, whatever the chunk and tile sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from unet.geometry import round_up


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


def grid_shape(height: int, width: int, step: int) -> tuple[int, int]:
    """(rows, cols) of ``grid``: how many cells cover the slide."""
    return -(-height // step), -(-width // step)


def tiles_of(chunk: Region, tile: int, height: int, width: int) -> list[Region]:
    """The output tiles covering ``chunk`` (clipped to the slide); chunk origins are tile-aligned."""
    return [
        Region(y0, min(y0 + tile, chunk.y1, height), x0, min(x0 + tile, chunk.x1, width))
        for y0 in range(chunk.y0, chunk.y1, tile)
        for x0 in range(chunk.x0, chunk.x1, tile)
    ]


def input_region(output: Region, halo: int, multiple: int) -> Region:
    """The model input that predicts ``output`` exactly: ``output`` widened to the pooling grid (multiples of
    ``multiple``, as whole-image inference sees it), plus ``halo`` on every side."""
    y0, x0 = output.y0 - output.y0 % multiple, output.x0 - output.x0 % multiple
    return Region(
        y0 - halo,
        y0 + round_up(output.y1 - y0, multiple) + halo,
        x0 - halo,
        x0 + round_up(output.x1 - x0, multiple) + halo,
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
    """``region`` of a (..., height, width) image, mirror-padded where it leaves the image (the edge pixel is
    not repeated, as ``numpy.pad(mode="reflect")``): the one padding rule of training crops and inference.

    ``read(y0, y1, x0, x1)`` must return the in-bounds window (..., y1-y0, x1-x0); only the
    bounding box of the needed source pixels is read.
    """
    rows = reflect_indices(region.y0, region.y1, height)
    cols = reflect_indices(region.x0, region.x1, width)
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    window = read(y0, y1, x0, x1)
    if region.y0 < 0 or region.y1 > height:  # mirrored rows: gather (inside the slide the window is the answer)
        window = window[..., rows - y0, :]
    if region.x0 < 0 or region.x1 > width:
        window = window[..., cols - x0]
    return window


def mirrored_crop(array: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """``array[..., top:top+size, left:left+size]`` of an in-memory image, mirror-padded by ``read_mirrored``'s
    rule where it leaves the image (training patches)."""
    height, width = array.shape[-2:]
    return read_mirrored(lambda y0, y1, x0, x1: array[..., y0:y1, x0:x1], height, width,
                         Region(top, top + size, left, left + size))  # fmt: skip


def crop(prediction: np.ndarray, output: Region, input: Region) -> np.ndarray:
    """The part of a prediction (..., input.height, input.width) over ``input`` that belongs to ``output``."""
    return prediction[(..., *output.relative_to(input))]


def padded_reference_shape(
    height: int, width: int, halo: int, multiple: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """np.pad widths that turn a slide into the input whose whole-image inference tiles reproduce."""
    return (halo, halo + (-height) % multiple), (halo, halo + (-width) % multiple)
