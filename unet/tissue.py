"""Which chunks of a brightfield slide hold tissue: Otsu's threshold on a low-resolution level."""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

from unet.resample import Resampled
from unet.slides import Slide, SlideError, open_slide
from unet.tiling import grid

MAX_WHOLE_LEVEL_PIXELS = 2**26  # the lowest level of a pyramid is read whole for the tissue mask (67 Mpx)


def tissue_mask(rgb_or_gray: np.ndarray) -> np.ndarray:
    """Tissue pixels of a (C, H, W) brightfield image: darker than Otsu's threshold of its grey level."""
    gray = rgb_or_gray.astype(np.float32).mean(axis=0)
    if gray.max() == gray.min():
        return np.zeros(gray.shape, bool)
    return gray < threshold_otsu(gray)


def thumbnail(slide: Slide, factor: int, window: int) -> np.ndarray:
    """Every ``factor``-th pixel of a single-level slide, read one window at a time."""
    window -= window % factor
    rows = []
    for y0 in range(0, slide.height, window):
        row = [
            slide.read(y0, min(y0 + window, slide.height), x0, min(x0 + window, slide.width))[:, ::factor, ::factor]
            for x0 in range(0, slide.width, window)
        ]
        rows.append(np.concatenate(row, axis=2))
    return np.concatenate(rows, axis=1)


def chunks_with_tissue(path: str, slide: Slide | Resampled, chunk: int) -> set[tuple[int, int]]:
    """Keys (row, col) of the ``chunk``-sized chunks of ``slide`` (a level, or a level resampled) that contain
    any tissue.

    The mask comes from the slide's lowest-resolution level (or a thumbnail of the level as stored), mapped back
    to the chunks with a one-pixel margin so that no tissue at a chunk border is missed.
    """
    if slide.levels > 1:
        small = open_slide(path, slide.levels - 1)
        mask = tissue_mask(small.read(0, small.height, 0, small.width))
    else:  # the level as stored: a resampled view would resample the whole slide for a thumbnail
        with open_slide(path, slide.level) as level:
            mask = tissue_mask(thumbnail(level, factor=16, window=chunk))
    scale_y, scale_x = slide.height / mask.shape[0], slide.width / mask.shape[1]
    keys = set()
    for key, region in grid(slide.height, slide.width, chunk):
        y0, y1 = int(region.y0 / scale_y), int(np.ceil(region.y1 / scale_y))
        x0, x1 = int(region.x0 / scale_x), int(np.ceil(region.x1 / scale_x))
        if mask[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1].any():
            keys.add(key)
    return keys


def check_lowest_level(slide: Slide | Resampled) -> None:
    """The tissue mask reads a pyramid's lowest level whole: refuse one of absurd size (a corrupt or hostile
    pyramid) before anything is written."""
    with open_slide(slide.path, slide.levels - 1) as lowest:
        if lowest.height * lowest.width > MAX_WHOLE_LEVEL_PIXELS:
            raise SlideError(
                f"{slide.path}: its lowest level ({lowest.level}) has {lowest.height:,} x {lowest.width:,} pixels, "
                f"more than the {MAX_WHOLE_LEVEL_PIXELS:,} infer.tissue_mask reads whole; add smaller levels "
                "(python -m pipelines.convert writes a full pyramid) or set infer.tissue_mask=false"
            )
