"""Weight map (eq. 2): the library's windowed implementation against the per-object reference.

Tiles: the real 512x512 fluorescence image (125 nuclei), and larger tiles made by tiling its
real label image 2x2 and 4x4 with new ids (made-up arrangements of real nuclei, said so in the
report). The reference runs one full-image distance transform per object; on the largest tile it
is timed on a random subset of objects and extrapolated linearly (its cost is linear in the
number of objects) unless ``full_reference`` is set.
"""

from __future__ import annotations

import time

import numpy as np
import tifffile
from scipy import ndimage as ndi

from benchmarks.reference import reference_border_weights
from unet.samples import fetch_samples
from unet.weights import border_weights, separate_touching

TITLE = "Weight map: windowed distance transforms vs per-object reference"


def tiled_labels(labels: np.ndarray, reps: int) -> np.ndarray:
    """``labels`` repeated reps x reps times, each copy with its own ids."""
    step = int(labels.max()) + 1
    rows = [
        np.hstack([np.where(labels > 0, labels + step * (i * reps + j), 0) for j in range(reps)]) for i in range(reps)
    ]
    return np.vstack(rows).astype(np.int32)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_seconds_extrapolated(separated: np.ndarray, sample: int, seed: int = 0) -> float:
    """Time the reference's per-object distance transforms on ``sample`` objects; scale to all."""
    ids = np.unique(separated)[1:]
    chosen = np.random.default_rng(seed).choice(ids, size=min(sample, len(ids)), replace=False)
    start = time.perf_counter()
    for i in chosen:
        ndi.distance_transform_edt(separated != i)
    return (time.perf_counter() - start) * len(ids) / len(chosen)


def run(full_reference: bool = False, quick: bool = False) -> dict:
    labels = tifffile.imread(fetch_samples(["fluo_nuclei"])["fluo_nuclei"] / "labels" / "dsb2018_0.tif")
    rows = []
    for reps in (1,) if quick else (1, 2, 4):
        separated = separate_touching(tiled_labels(labels, reps))
        n_objects = len(np.unique(separated)) - 1
        fast = best_of(lambda s=separated: border_weights(s), repeats=3)
        measured = full_reference or reps <= 2
        if measured:
            start = time.perf_counter()
            expected = reference_border_weights(separated)
            reference = time.perf_counter() - start
            max_error = float(np.abs(border_weights(separated) - expected).max())
        else:
            reference = reference_seconds_extrapolated(separated, sample=100)
            max_error = float("nan")
        rows.append(
            {
                "tile": f"{separated.shape[0]}x{separated.shape[1]}",
                "data": "real" if reps == 1 else f"real nuclei tiled {reps}x{reps} (made-up layout)",
                "objects": n_objects,
                "reference_s": reference,
                "reference": "measured" if measured else "extrapolated from 100 objects",
                "fast_s": fast,
                "speedup": reference / fast,
                "max_abs_error": max_error,
            }
        )
    return {"title": TITLE, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        "| tile | data | objects | reference (s) | | fast (s) | speed-up | max abs difference |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        error = "n/a" if np.isnan(r["max_abs_error"]) else f"{r['max_abs_error']:.1e}"
        lines.append(
            f"| {r['tile']} | {r['data']} | {r['objects']} | {r['reference_s']:.2f} | {r['reference']} "
            f"| {r['fast_s']:.3f} | {r['speedup']:.0f}x | {error} |"
        )
    return "\n".join(lines)
