"""A slide's receipt: what its segmentation measured, in numbers comparable across slides, and the flags that say
which slides of a cohort to look at.

Measures, counted chunk by chunk (``chunk_counts``) and added up (``slide_measures``):

- ``tissue_mm2``: the tissue's area (``unet.tissue``; where a slide has no tissue mask, every pixel counts);
- ``objects_per_mm2``: objects per mm2 of that tissue;
- ``uncertain_share``: the share of tissue pixels whose probability lies in ``UNCERTAIN`` (the model is unsure);
- ``empty_tissue_chunk_share``: the share of chunks holding tissue but no object (missed or blank regions).

Flags: ``absolute_flags`` for one slide on its own (no tissue, almost no objects, mostly uncertain, pixel size
missing, resampled far), ``cohort_flags`` for a slide unlike the rest of its cohort: a robust z-score (median and
MAD) beyond a threshold. Each flag is one line, ``"KIND: why"``.
"""

from __future__ import annotations

import math
from statistics import median
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from unet.resolution import Resolution

UNCERTAIN = (0.3, 0.7)  # a probability strictly between these: the model is unsure
NO_TISSUE_MM2 = 0.01  # less tissue than this (a 100 um square): dust or debris on glass, not a specimen
ALMOST_NO_OBJECTS_PER_MM2 = 10.0  # nuclei: thousands per mm2 of tissue at 20x; under this, segmentation failed
MOSTLY_UNCERTAIN = 0.5  # more uncertain tissue pixels than this share
FAR_DOWNSAMPLING = 2.5  # read from a level this much finer than the model's: the pyramid lacks a level (slow)
FAR_UPSAMPLING = 1.5  # pixels this much coarser than the model's: less detail than it was trained on
MIN_COHORT = 5  # slides with a measure, at least, before any is called an outlier of the cohort
MIN_SPREAD = 0.05  # the robust spread is at least this share of the median: near-identical slides stay unflagged
OUTLIER_MEASURES = {  # the measures compared across a cohort; sizes (tissue area, object count) vary by design
    "objects_per_mm2": "objects per mm2",
    "object_area_um2_median": "median object area (um2)",
    "uncertain_share": "uncertain share",
    "empty_tissue_chunk_share": "share of tissue chunks without objects",
}
NO_TISSUE = "no tissue"  # the kind of flag of a slide whose measures are not compared with the cohort's
MEASURES = ("tissue_share", "tissue_mm2", "objects_per_mm2", "uncertain_share", "empty_tissue_chunk_share")


def chunk_counts(labels: np.ndarray, stored: np.ndarray, tissue: np.ndarray | None) -> dict[str, int]:
    """One chunk's counts: its pixels, its tissue pixels (``tissue``, a bool YX mask; None: all), the uncertain
    pixels among them (``stored``: the probability as stored, ``unet.segmentation``) and whether any object lies
    in it (1 or 0)."""
    scale = 255.0 if stored.dtype == np.uint8 else 1.0
    uncertain = (stored > UNCERTAIN[0] * scale) & (stored < UNCERTAIN[1] * scale)
    if tissue is not None:
        uncertain &= tissue
    return {
        "pixels": int(labels.size),
        "tissue_pixels": int(labels.size if tissue is None else np.count_nonzero(tissue)),
        "uncertain_pixels": int(np.count_nonzero(uncertain)),
        "has_objects": int(bool(labels.any())),
    }


def slide_measures(counts: list[dict[str, int]], objects: int, pixel_size_um: float | None) -> dict[str, float]:
    """The slide's measures (module docstring) from its chunks' ``chunk_counts``; a measure that cannot be known
    (no pixel size, no tissue) is left out."""
    tissue = sum(c["tissue_pixels"] for c in counts)
    measures: dict[str, float] = {"tissue_share": tissue / max(1, sum(c["pixels"] for c in counts))}
    if pixel_size_um is not None:
        measures["tissue_mm2"] = tissue * pixel_size_um**2 / 1e6
        if tissue:
            measures["objects_per_mm2"] = objects / measures["tissue_mm2"]
    if tissue:
        measures["uncertain_share"] = sum(c["uncertain_pixels"] for c in counts) / tissue
        with_tissue = [c for c in counts if c["tissue_pixels"]]
        measures["empty_tissue_chunk_share"] = sum(not c["has_objects"] for c in with_tissue) / len(with_tissue)
    return measures


def absolute_flags(measures: dict[str, float], objects: int, resolution: Resolution | None) -> list[str]:
    """What is wrong with one slide whatever the cohort (module docstring); none: nothing."""
    flags = []
    if measures.get("tissue_share") == 0 or measures.get("tissue_mm2", 1.0) < NO_TISSUE_MM2:
        found = f"{measures['tissue_mm2']:.2g} mm2" if "tissue_mm2" in measures else "none"
        return [f"{NO_TISSUE}: {found} found, under {NO_TISSUE_MM2:g} mm2 (a blank slide, or glass only)"]
    density = measures.get("objects_per_mm2")
    if density is not None and density < ALMOST_NO_OBJECTS_PER_MM2:
        flags.append(f"almost no objects: {objects} in {measures['tissue_mm2']:.3g} mm2 of tissue "
                     f"({density:.3g} per mm2, under {ALMOST_NO_OBJECTS_PER_MM2:g})")  # fmt: skip
    elif density is None and objects == 0:
        flags.append("almost no objects: none found")
    uncertain = measures.get("uncertain_share", 0.0)
    if uncertain > MOSTLY_UNCERTAIN:
        low, high = UNCERTAIN
        flags.append(f"mostly uncertain: {uncertain:.0%} of tissue pixels have a probability between {low} and {high}")
    if resolution is not None:
        flags += _resolution_flags(resolution)
    return flags


def _resolution_flags(resolution: Resolution) -> list[str]:
    if not resolution.pixel_size_stated:
        given = "infer.pixel_size_um" if resolution.slide_pixel_size_um else "nothing: segmented as stored"
        return [f"pixel size missing: the slide's metadata states none; its size came from {given}"]
    if resolution.scale < 1 / FAR_UPSAMPLING:
        return [f"resampled far: up-sampled {1 / resolution.scale:.2g}x to the model's pixel size; the slide holds "
                "less detail than the model was trained on"]  # fmt: skip
    if resolution.scale > FAR_DOWNSAMPLING:
        return [f"resampled far: down-sampled {resolution.scale:.2g}x from level {resolution.level}; the pyramid "
                "lacks a level near the model's pixel size (slow)"]  # fmt: skip
    return []


def cohort_flags(measures: dict[str, dict[str, float]], threshold: float) -> dict[str, list[str]]:
    """Per slide (the keys of ``measures``), its measures whose robust z-score against the cohort's exceeds
    ``threshold`` in size: ``(value - median) / (1.4826 MAD)``, the spread at least ``MIN_SPREAD`` of the median,
    compared only among ``MIN_COHORT`` slides or more. ``threshold`` 0: none."""
    flags: dict[str, list[str]] = {slide: [] for slide in measures}
    if threshold <= 0:
        return flags
    for key, label in OUTLIER_MEASURES.items():
        values = {slide: m[key] for slide, m in measures.items() if m.get(key) is not None and math.isfinite(m[key])}
        if len(values) < MIN_COHORT:
            continue
        centre = median(values.values())
        spread = max(1.4826 * median(abs(v - centre) for v in values.values()), MIN_SPREAD * abs(centre))
        if spread == 0:
            continue
        for slide, value in values.items():
            z = (value - centre) / spread
            if abs(z) > threshold:
                side = "high" if z > 0 else "low"
                flags[slide].append(f"outlier: {label} {value:.3g} is {side} for this cohort (median {centre:.3g}, "
                                    f"robust z {z:+.1f})")  # fmt: skip
    return flags


def flag_kind(flag: str) -> str:
    """A flag's kind: the words before its colon ("no tissue", "outlier", ...)."""
    return flag.split(":", 1)[0]
