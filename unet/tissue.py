"""Where a brightfield slide holds tissue: Otsu's threshold on a low-resolution level.

One mask per slide (``TissueMask``) serves both uses: the chunks inference may skip (``infer.tissue_mask``) and the
slide's receipt (tissue area, the share of uncertain pixels inside tissue, ``unet.receipt``), so both see the same
tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu

from unet.resample import Resampled
from unet.slides import Slide, SlideError, open_slide
from unet.tiling import Region, grid

MAX_WHOLE_LEVEL_PIXELS = 2**26  # the lowest level of a pyramid is read whole for the tissue mask (67 Mpx)
MIN_CONTRAST = 0.1  # tissue is this share of the pixel range darker than the background, at least
THUMBNAIL_FACTOR = 16  # a slide without a pyramid: every 16th pixel of its level, read chunk by chunk


def tissue_mask(rgb_or_gray: np.ndarray) -> np.ndarray:
    """Tissue pixels of a (C, H, W) brightfield image: darker than Otsu's threshold of its grey level. An image
    whose two Otsu classes differ by less than ``MIN_CONTRAST`` of its type's range (blank, or glass and its noise:
    Otsu splits any image in two) has none."""
    gray = rgb_or_gray.astype(np.float32).mean(axis=0)
    if gray.max() == gray.min():
        return np.zeros(gray.shape, bool)
    mask = gray < threshold_otsu(gray)
    dtype = rgb_or_gray.dtype
    full_range = float(np.iinfo(dtype).max) if dtype.kind in "iu" else max(float(gray.max()), 1.0)
    if gray[~mask].mean() - gray[mask].mean() < MIN_CONTRAST * full_range:
        return np.zeros(gray.shape, bool)
    return mask


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


@dataclass(frozen=True)
class ChunkTissue:
    """The tissue of one chunk, small enough to send with its task: the mask's pixels under it and, for each of
    the chunk's rows and columns, the mask pixel holding its centre."""

    mask: np.ndarray  # bool, the mask's window under the chunk
    rows: np.ndarray  # per chunk row, its row in ``mask``
    cols: np.ndarray

    def pixels(self) -> np.ndarray:
        """The chunk's tissue, one bool per chunk pixel (nearest mask pixel)."""
        return self.mask[self.rows[:, None], self.cols[None, :]]


@dataclass(frozen=True)
class TissueMask:
    """A low-resolution tissue mask laid over an image of ``height`` x ``width`` pixels (the level segmented, as
    segmented): each image pixel is tissue where the mask pixel holding its centre is."""

    mask: np.ndarray  # bool YX
    height: int
    width: int

    def _indices(self, start: int, stop: int, size: int, mask_size: int) -> np.ndarray:
        centres = (np.arange(start, stop) + 0.5) * (mask_size / size)
        return np.minimum(centres.astype(np.int64), mask_size - 1)

    def chunk(self, region: Region) -> ChunkTissue:
        """The tissue of one chunk of the image (``Region``)."""
        rows = self._indices(region.y0, region.y1, self.height, self.mask.shape[0])
        cols = self._indices(region.x0, region.x1, self.width, self.mask.shape[1])
        window = self.mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        return ChunkTissue(window, rows - rows[0], cols - cols[0])

    def chunks(self, chunk: int) -> set[tuple[int, int]]:
        """Keys (row, col) of the ``chunk``-sized chunks holding any tissue, with a one-mask-pixel margin so that
        no tissue at a chunk border is missed."""
        scale_y, scale_x = self.height / self.mask.shape[0], self.width / self.mask.shape[1]
        keys = set()
        for key, region in grid(self.height, self.width, chunk):
            y0, y1 = int(region.y0 / scale_y), int(np.ceil(region.y1 / scale_y))
            x0, x1 = int(region.x0 / scale_x), int(np.ceil(region.x1 / scale_x))
            if self.mask[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1].any():
                keys.add(key)
        return keys


def slide_tissue(path: str, slide: Slide | Resampled, chunk: int, read_whole_level: bool = True) -> TissueMask:
    """The tissue mask of ``slide`` (a level, or a level resampled): from the slide's lowest-resolution level, or,
    for a slide without a pyramid, a thumbnail of the level as stored (``read_whole_level=False``: refused, as it
    reads the whole level; a resampled view would resample all of it)."""
    if slide.levels > 1:
        with open_slide(path, slide.levels - 1) as small:
            mask = tissue_mask(small.read(0, small.height, 0, small.width))
    elif not read_whole_level:
        raise SlideError(f"{path} has no pyramid: its tissue mask would read it whole")
    else:
        with open_slide(path, slide.level) as level:
            mask = tissue_mask(thumbnail(level, factor=THUMBNAIL_FACTOR, window=chunk))
    return TissueMask(mask, slide.height, slide.width)


def chunks_with_tissue(path: str, slide: Slide | Resampled, chunk: int) -> set[tuple[int, int]]:
    """Keys (row, col) of the ``chunk``-sized chunks of ``slide`` that contain any tissue (``TissueMask.chunks``)."""
    return slide_tissue(path, slide, chunk).chunks(chunk)


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
