"""A slide's quality-control picture, written into its output (``QC_PICTURE``) and its MLflow run: the slide's
lowest level with the objects outlined, beside the foreground probability as a heat map. Everything is read from
pyramids: the slide's lowest level and the output level whose pixels are closest to it, never the output's level 0
(and never the slide's, where it has lower levels)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import zarr

QC_SIDE = 1024  # each panel's longer side, at most (pixels)
MIN_REDUCTION = 2  # and each of its pixels covers 2 of level 0 a side at least: a thumbnail, never the slide itself
GAP = 4  # white pixels between the panels


def on_picture(array: zarr.Array, side: float, window: tuple[int, int, int, int]) -> np.ndarray:
    """An output level (labels or probability) over ``window`` = (y0, y1, x0, x1) of a picture, one of its pixels
    being ``side`` picture pixels: for each picture pixel, the level's pixel holding its centre (nearest)."""
    from pipelines.infer.output import yx_window
    from unet.resample import nearest_indices

    y0, y1, x0, x1 = window
    rows = nearest_indices(y0, y1, 1 / side, array.shape[-2])  # 1 / side level pixels per picture pixel
    cols = nearest_indices(x0, x1, 1 / side, array.shape[-1])
    block = yx_window(array, rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
    return block[(rows - rows.min())[:, None], (cols - cols.min())[None, :]]


def closest_level(levels: int, to_level0: float, factor: float) -> int:
    """Of an output's ``levels`` levels, the one whose pixels are closest to, and not larger than, ``factor``
    level-0 pixels (an output pixel being ``to_level0`` level-0 pixels): what is drawn over a picture of that size."""
    return max((k for k in range(levels) if to_level0 * 2**k <= factor * 1.05), default=0)


@dataclass(frozen=True)
class Overview:
    """A slide's lowest level as a picture, and which level of its output is drawn over it."""

    pixels: np.ndarray  # CYX, as stored: every ``step``-th pixel of the lowest level
    level: int  # the output level drawn over it (``closest_level``)
    side: float  # picture pixels per pixel of that output level

    @property
    def window(self) -> tuple[int, int, int, int]:
        return 0, self.pixels.shape[-2], 0, self.pixels.shape[-1]


def overview(slide_path: str, levels: int, to_level0: float, max_side: int | None = QC_SIDE) -> Overview | None:
    """The slide's lowest level (at most ``max_side`` pixels a side and ``MIN_REDUCTION`` times smaller than level 0;
    None: whole) under an output of ``levels``
    levels, an output pixel being ``to_level0`` level-0 pixels; None where that level is too large to read whole
    (``unet.tissue.MAX_WHOLE_LEVEL_PIXELS``: a slide without a pyramid)."""
    from unet.slides import open_slide
    from unet.tissue import MAX_WHOLE_LEVEL_PIXELS

    with open_slide(slide_path) as slide, open_slide(slide_path, slide.levels - 1) as low:
        if low.height * low.width > MAX_WHOLE_LEVEL_PIXELS:
            return None
        step = max(1, math.ceil(max(low.height, low.width) / max_side)) if max_side else 1
        if max_side and slide.width / low.width * step < MIN_REDUCTION:
            step = MIN_REDUCTION  # a small slide without a pyramid
        pixels = low.read(0, low.height, 0, low.width)[:, ::step, ::step]  # read whole, as its intensity range is
        factor = slide.width / low.width * step  # level-0 pixels per picture pixel
    level = closest_level(levels, to_level0, factor)
    return Overview(pixels, level, to_level0 * 2**level / factor)


def qc_picture(
    slide_path: str, output: str, levels: tuple[tuple[int, int], ...], chunk: int, to_level0: float
) -> np.ndarray | None:
    """The picture (YX3 uint8) of the (possibly partial) ``output`` of ``slide_path``, of ``levels`` shapes in
    ``chunk``-sized chunks, an output pixel being ``to_level0`` of the slide's level-0 pixels; None for an output
    without a pyramid larger than a chunk (its level 0 is never read whole), or an ``overview`` too large."""
    import zarr

    from pipelines.infer.output import labels_level, probability_level
    from unet.segmentation import from_stored
    from unet.visualize import colorize, outline, to_rgb

    if len(levels) == 1 and max(levels[0]) > chunk:
        return None
    view = overview(slide_path, len(levels), to_level0)
    if view is None:
        return None
    root = zarr.open_group(output, mode="r")
    labels = on_picture(root[labels_level(view.level)], view.side, view.window)
    probability = from_stored(on_picture(root[probability_level(view.level)], view.side, view.window))
    gap = np.full((view.pixels.shape[-2], GAP, 3), 255, np.uint8)
    # channels last: any number of them (the first three shown, or the first one in grey)
    outlined = outline(np.ascontiguousarray(to_rgb(np.moveaxis(view.pixels, 0, -1))), labels)
    return np.concatenate([outlined, gap, colorize(probability, vmax=1.0, cmap="magma")], axis=1)
