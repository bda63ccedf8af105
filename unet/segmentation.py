"""From foreground probability to objects: the one rule of inference, training validation and evaluation.

The probability is stored (uint8, x255 rounded, or float16) and thresholded *as stored*, so the objects agree with
what a reader of the output sees; then each chunk is labelled alone (holes filled within the chunk, small objects
dropped, ``unet.instances.label_chunk``) and objects continuing across seams are merged (``merge_chunks``).
``pipelines.infer`` applies the rule chunk by chunk on its workers; ``label_image`` applies it to a whole image in
memory with the same chunking, so the scores that choose the champion describe exactly the objects inference
writes. (With ``infer.tissue_mask``, inference leaves chunks without tissue unpredicted; labelled images are scored
whole, as tissue.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from unet.instances import ChunkEdges, ChunkLabels, label_chunk, merge_chunks, relabel
from unet.tiling import grid

if TYPE_CHECKING:
    from unet.config import InferConfig
    from unet.model import UNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectRule:
    """How a probability becomes objects (built from the ``infer`` section by ``from_config``)."""

    threshold: float  # foreground: stored probability above it
    probability_dtype: str  # how the probability is stored: "uint8" or "float16"
    fill_holes: bool  # fill holes inside objects (within a chunk) before labelling
    min_object_pixels: int  # objects smaller than this are dropped before ids are assigned

    @classmethod
    def from_config(cls, infer: InferConfig, model: UNet, pixel_size_um: float | None, source: str) -> ObjectRule:
        """The rule of the ``infer`` section for ``model``'s objects at ``pixel_size_um`` (the size of the pixels
        segmented; ``source`` names them in a warning): the one place it is built."""
        return cls(
            threshold=infer.threshold,
            probability_dtype=infer.probability_dtype,
            fill_holes=infer.fill_holes,
            min_object_pixels=min_object_pixels(infer.min_object_area_um2, model, pixel_size_um, source),
        )

    def store(self, probability: np.ndarray) -> np.ndarray:
        """Probability in [0, 1] as stored: uint8 (x255, rounded) or float16."""
        if self.probability_dtype == "uint8":
            return np.round(np.clip(probability, 0, 1) * 255).astype(np.uint8)
        return probability.astype(np.float16)

    def foreground(self, stored: np.ndarray) -> np.ndarray:
        """Threshold the *stored* probability (``store``)."""
        if stored.dtype == np.uint8:
            return stored > round(self.threshold * 255)
        return stored.astype(np.float32) > self.threshold

    def label_chunk(self, stored: np.ndarray) -> ChunkLabels:
        """One chunk's local objects (int32 ids 1..n), n and their areas; objects touching its border are judged by
        ``merge_chunks``, once their parts in other chunks are known."""
        return label_chunk(self.foreground(stored), self.fill_holes, self.min_object_pixels)


def from_stored(stored: np.ndarray) -> np.ndarray:
    """Stored probability (``ObjectRule.store``) in [0, 1], as float64: object means are exact to stored values."""
    if stored.dtype == np.uint8:
        return stored / 255.0
    return stored.astype(np.float64)


def min_object_pixels(area_um2: float | None, model: UNet, pixel_size_um: float | None, source: str) -> int:
    """The smallest object kept, in pixels of ``pixel_size_um``: ``area_um2`` (``infer.min_object_area_um2``), or
    by default half the 1st-percentile area of the model's training objects; 0 where either that or the pixel size
    is unknown."""
    if area_um2 is None:
        area_um2 = 0.5 * model.object_area_um2["p1"] if model.object_area_um2 else 0.0
    if not area_um2:
        return 0
    if pixel_size_um is None:
        log.warning("%s: its pixel size is unknown, so no minimum object area applies", source)
        return 0
    return math.ceil(area_um2 / pixel_size_um**2)


def label_image(stored: np.ndarray, rule: ObjectRule, chunk: int) -> np.ndarray:
    """Objects (int32 ids 1..K) of a whole stored probability image (H, W), labelled chunk by chunk and merged
    across seams exactly as ``pipelines.infer`` labels a slide with ``infer.chunk_size`` = ``chunk``."""
    height, width = stored.shape
    local, edges = {}, {}
    for key, region in grid(height, width, chunk):
        labels, count, areas = rule.label_chunk(stored[region.slices])
        local[key], edges[key] = labels, ChunkEdges.of(labels, count, areas)
    mappings, _ = merge_chunks(edges, rule.min_object_pixels)
    objects = np.zeros((height, width), np.int32)
    for key, region in grid(height, width, chunk):
        objects[region.slices] = relabel(local[key], mappings[key])
    return objects
