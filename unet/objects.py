"""Per-object measurements of a chunked label image, computed chunk by chunk.

Each chunk gives partial sums for the objects it contains (``chunk_sums``); an object crossing chunk seams
has a part in each of its chunks, and ``objects_table`` adds the parts up into one row per object with its
full extent. Nothing ever needs the whole label image in memory: a chunk at a time, then one small row per
object part.

Columns, one row per object, sorted by id:
``id``; ``area`` (pixels of the label image); ``centroid_y``, ``centroid_x`` (the mean row and column, as
``skimage.measure.regionprops``, in the slide's level-0 pixels: where the slide's viewer and QuPath put them,
whatever resolution it was segmented at); ``centroid_y_um``, ``centroid_x_um`` (from level 0's top-left pixel
centre), ``area_um2`` (null when the pixel size is unknown); ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1``
(half-open, in the label image's pixels: where to find the object in ``labels/nuclei/0``); ``mean_probability``
(of the stored foreground probability, in [0, 1]); ``mean_intensity_0`` ... (the input's pixel values as
segmented, per channel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# partial sums added up over an object's chunks, and extents taken at their min / max
SUMS = ("area", "sum_y", "sum_x", "sum_probability")
MINIMA, MAXIMA = ("bbox_y0", "bbox_x0"), ("bbox_y1", "bbox_x1")


def chunk_sums(
    labels: np.ndarray, probability: np.ndarray, image: np.ndarray, y0: int, x0: int, areas: np.ndarray | None = None
) -> dict:
    """Partial sums of every object in one chunk: ``labels`` (YX ids), ``probability`` (YX in [0, 1]),
    ``image`` (CYX input pixels), the chunk's origin in the slide ``(y0, x0)``; ``areas``: the pixels of each id
    (``np.bincount`` of ``labels``), if known. One array per column."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)  # the objects' pixels, in raster order: one pass, then cheap gathers
    values = flat[where]
    pixels = np.bincount(values, minlength=1) if areas is None else areas  # by id; local ids 1..n, all present
    ids = np.flatnonzero(pixels[1:]) + 1
    if len(ids) == len(pixels) - 1:  # ids 1..n: each object's index is its id - 1, no sorting needed
        index = values - 1
    else:  # any ids: numbered 0..n-1 in order
        lookup = np.zeros(len(pixels), np.int64)
        lookup[ids] = np.arange(len(ids))
        index = lookup[values]
    area, count = pixels[ids], len(ids)
    rows, cols = np.divmod(where, labels.shape[1])
    top, bottom = _extent(index, rows, count)
    left, right = _extent(index, cols, count)
    parts = {
        "id": ids.astype(np.int64),
        "area": area.astype(np.int64),
        "sum_y": np.bincount(index, rows, count) + area * float(y0),
        "sum_x": np.bincount(index, cols, count) + area * float(x0),
        "sum_probability": np.bincount(index, np.ravel(probability)[where], count),
        "bbox_y0": top + y0,
        "bbox_x0": left + x0,
        "bbox_y1": bottom + y0,
        "bbox_x1": right + x0,
    }
    for channel, plane in enumerate(image):
        parts[f"sum_intensity_{channel}"] = np.bincount(index, np.ravel(plane)[where], count)
    return parts


def _extent(index: np.ndarray, coordinates: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each object's first and past-the-last ``coordinates`` (int64): by ``ufunc.at`` over its pixels, about half
    the time of ``ndi.find_objects``, which scans the whole chunk and builds a slice per object."""
    return _reduced(np.minimum, index, coordinates, count), _reduced(np.maximum, index, coordinates, count) + 1


def _reduced(ufunc: np.ufunc, index: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """``ufunc`` (np.minimum or np.maximum) of ``values`` (integers) by ``index`` 0..count-1, as int64."""
    limits = np.iinfo(np.int64)
    out = np.full(count, limits.max if ufunc is np.minimum else limits.min)
    ufunc.at(out, index, values)
    return out


def relabel_sums(parts: dict, mapping: np.ndarray) -> dict:
    """A chunk's partial sums (``chunk_sums`` of its chunk-local ids) under the final ids (the chunk's ``mapping``
    from ``unet.instances.merge_chunks``); the parts of objects dropped at the seams (final id 0) are left out."""
    ids = mapping[parts["id"]]
    kept = ids > 0
    return {name: ids[kept].astype(np.int64) if name == "id" else values[kept] for name, values in parts.items()}


def objects_table(
    parts: list[dict], pixel_size_um: float | None, channels: int, to_level0: float = 1.0
) -> pd.DataFrame:
    """One row per object from the partial sums of all chunks (see the module docstring for the columns):
    ``pixel_size_um`` is the label image's, ``to_level0`` its pixels' side in level-0 pixels
    (``unet.resolution``)."""
    import pandas as pd

    intensities = [f"sum_intensity_{c}" for c in range(channels)]
    stacked = {name: np.concatenate([part[name] for part in parts]) if parts else np.zeros(0, np.int64)
               for name in ("id", *SUMS, *MINIMA, *MAXIMA, *intensities)}  # fmt: skip
    ids, row = np.unique(stacked["id"], return_inverse=True)  # the objects, sorted, and each part's object
    grouped = {name: np.bincount(row, stacked[name], len(ids)) for name in (*SUMS, *intensities)}
    grouped |= {name: _reduced(np.minimum, row, stacked[name], len(ids)) for name in MINIMA}
    grouped |= {name: _reduced(np.maximum, row, stacked[name], len(ids)) for name in MAXIMA}
    area = grouped["area"]  # sums of whole numbers below 2**53: exact as float64
    size = np.nan if pixel_size_um is None else pixel_size_um
    table = pd.DataFrame({"id": ids, "area": area.astype(np.int64)})
    for axis in "yx":  # the mean pixel centre, mapped to level 0 (the same numbers when segmented as stored)
        centre = grouped[f"sum_{axis}"] / area
        table[f"centroid_{axis}"] = centre if to_level0 == 1 else (centre + 0.5) * to_level0 - 0.5
    for axis in "yx":
        table[f"centroid_{axis}_um"] = table[f"centroid_{axis}"] * (size / to_level0)
    table["area_um2"] = area * size * size
    for name in (*MINIMA, *MAXIMA):
        table[name] = grouped[name].astype(np.int64)
    table["mean_probability"] = grouped["sum_probability"] / area
    for channel, name in enumerate(intensities):
        table[f"mean_intensity_{channel}"] = grouped[name] / area
    return table


def summary(table: pd.DataFrame) -> dict[str, float]:
    """A few numbers that describe a slide's objects (for its MLflow run)."""
    if table.empty:
        return {"objects": 0}
    stats = {
        "objects": len(table),
        "object_area_px_median": float(table["area"].median()),
        "object_area_px_mean": float(table["area"].mean()),
        "object_mean_probability_median": float(table["mean_probability"].median()),
    }
    if table["area_um2"].notna().all():
        stats["object_area_um2_median"] = float(table["area_um2"].median())
    return stats
