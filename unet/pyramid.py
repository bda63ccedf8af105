"""Multiscale levels of a segmentation output: how many, their shapes, and the 2x2 rules between them.

Level ``k + 1`` halves level ``k`` (rounding up, so the last row and column are never dropped) until the
longest side fits in one chunk. Probability is averaged over each 2x2 block (an odd last row or column
averages the pixels that exist); labels take the block's top-left pixel (nearest neighbour), so every
id in a level is an id of level 0 and no id is ever blended into another.
"""

from __future__ import annotations

import numpy as np


def level_shapes(height: int, width: int, chunk: int) -> list[tuple[int, int]]:
    """(height, width) of level 0, 1, ...: each half the last (rounded up) until both sides fit one chunk."""
    shapes = [(height, width)]
    while max(shapes[-1]) > chunk:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def source_window(start: int, stop: int, size: int) -> tuple[int, int]:
    """The rows (or columns) ``[start, stop)`` of a level come from these of the level above (``size`` long)."""
    return 2 * start, min(2 * stop, size)


def mean_2x2(block: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """2x2 mean of a YX block in ``dtype``; integers are rounded to nearest (ties to even), not truncated."""
    values = block.astype(np.float32)
    h, w = values.shape
    if h % 2 or w % 2:  # repeating the last row/column makes the mean that of the pixels that exist
        values = np.pad(values, ((0, h % 2), (0, w % 2)), mode="edge")
    mean = (values[0::2, 0::2] + values[1::2, 0::2] + values[0::2, 1::2] + values[1::2, 1::2]) / 4
    if np.issubdtype(np.dtype(dtype), np.integer):
        mean = np.round(mean)
    return mean.astype(dtype)


def nearest_2x2(block: np.ndarray) -> np.ndarray:
    """Every second pixel of a YX block, from the first: labels keep their ids."""
    return block[0::2, 0::2]


def ngff_datasets(levels: int, pixel_size_um: float | None, origin: float = 0.0, channel: bool = True) -> list[dict]:
    """NGFF ``datasets`` of a CYX pyramid (YX without ``channel``): each level's scale, and the offset of its first
    pixel's centre (that of the 2x2 block it summarises, plus ``origin``: where level 0's first pixel centre lies).
    Without a known pixel size, scales are in level-0 pixels."""
    pixel = pixel_size_um or 1.0
    datasets = []
    for index in range(levels):
        factor = 2.0**index
        size, offset = round(pixel * factor, 9), round(origin + pixel * (factor - 1) / 2, 9)  # no 0.74849999999
        scale, translation = [size, size], [offset, offset]
        if channel:  # the channel axis is neither scaled nor moved
            scale, translation = [1.0, *scale], [0.0, *translation]
        transforms = [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]
        datasets.append({"path": str(index), "coordinateTransformations": transforms})
    return datasets
