"""Instance labels across a chunked slide: label each chunk alone, then merge objects that
continue across chunk seams into one id, unique over the whole slide.

Chunks are labelled with 4-connectivity, and two chunks' objects are joined where foreground
pixels face each other across the seam (also 4-connectivity), so the result equals connected
components of the whole foreground, computed without ever holding it in memory.

Objects smaller than a minimum area are dropped before final ids are given, so ids stay 1..K: an object
inside one chunk is dropped there (``label_chunk``), one that crosses seams once its parts' areas are added
up (``merge_ids``), so the rule is exact whatever the chunking. Holes are filled within a chunk (background
that a chunk's foreground encloses); a hole cut by a chunk seam stays open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


class ChunkLabels(NamedTuple):
    """A chunk's local objects: ``labels`` (int32 ids 1..``count``) and ``areas``, the pixels of each id (index: id;
    0: the background), as ``np.bincount(labels.ravel())`` gives them, so later steps need not count again."""

    labels: np.ndarray
    count: int
    areas: np.ndarray


def label_chunk(foreground: np.ndarray, fill_holes: bool = False, min_area: int = 0) -> ChunkLabels:
    """Local instance ids 1..n of a chunk's foreground, and their areas: holes inside the chunk filled if asked,
    objects of fewer than ``min_area`` pixels dropped unless they touch the chunk's border (``merge_ids``
    judges those, once their parts in other chunks are known)."""
    if fill_holes:
        foreground = fill_holes_of(foreground)
    labels, count = connected(foreground, 4)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    if min_area > 1 and count:
        keep = areas >= min_area
        keep[np.unique(_border(labels))] = True  # their whole area is not known here
        keep[0] = False
        count = int(keep.sum())
        ids = np.zeros(len(keep), np.int32)
        ids[keep] = np.arange(1, count + 1)
        labels = np.take(ids, labels)  # take: about twice as fast as ids[labels]
        kept = areas[keep]
        areas = np.concatenate([[labels.size - kept.sum()], kept])
    return ChunkLabels(labels, count, areas)


def connected(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D ``mask`` (4- or 8-connected) as int32 ids 1..n, and n; by cc3d, about twice
    as fast as ``scipy.ndimage.label`` (docs/benchmarks.md, "The pipeline around the model"). 4-connected, the ids
    are scipy's (raster order of each object's first pixel); 8-connected, the same components in another order."""
    import cc3d

    # As bytes: cc3d 4.1.1 labels some background pixels of a *boolean* mask 8-connected (about one small mask in
    # twenty; tests/test_tiling.py), never of the same mask viewed as uint8, which costs no copy.
    data = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    labels, count = cc3d.connected_components(data, connectivity=connectivity, return_N=True, out_dtype=np.uint32)
    return labels.view(np.int32), int(count)  # fewer than 2**31 objects in a chunk: the same values


def fill_holes_of(foreground: np.ndarray) -> np.ndarray:
    """``foreground`` with its holes filled: background not connected to the border, 8-connected (the dual of
    4-connected objects: a diagonal gap is no hole). The same pixels as ``ndi.binary_fill_holes`` with a 3x3
    structure, by one labelling of the background instead of its iterated dilations (4-40x faster on nuclei,
    docs/benchmarks.md, "The pipeline around the model")."""
    background, count = connected(~foreground, 8)
    if count == 0:
        return foreground.copy()
    filled = np.ones(count + 1, bool)  # by background id: enclosed (a hole), or 0, the foreground itself
    filled[_border(background)] = False
    filled[0] = True
    return np.take(filled, background)


def _border(labels: np.ndarray) -> np.ndarray:
    return np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])


@dataclass(frozen=True)
class ChunkEdges:
    """A chunk's object count, the local ids along its four borders, and the area (pixels) of each object
    touching a border (index: local id; 0 for the others, whose area ``label_chunk`` has judged already)."""

    count: int
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    areas: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, count: int, areas: np.ndarray | None = None) -> ChunkEdges:
        """The edges of a chunk's ``labels`` (ids 1..``count``); ``areas``: their pixel counts by id, if known."""
        if areas is None:
            areas = np.bincount(labels.ravel(), minlength=count + 1)
        areas = areas.astype(np.int64)  # a copy: the inside objects' areas are zeroed below
        inside = np.ones(count + 1, bool)
        inside[np.unique(_border(labels))] = False
        areas[inside] = 0
        return cls(count, labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy(), areas)


def offsets(counts: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """First provisional global id (minus one) of every chunk, in row-major order."""
    result, total = {}, 0
    for key in sorted(counts):
        result[key] = total
        total += counts[key]
    return result


def _facing(a: np.ndarray, b: np.ndarray, offset_a: int, offset_b: int) -> np.ndarray:
    both = (a > 0) & (b > 0)
    return np.stack([a[both].astype(np.int64) + offset_a, b[both].astype(np.int64) + offset_b], axis=1)


def seam_pairs(edges: dict[tuple[int, int], ChunkEdges], starts: dict[tuple[int, int], int]) -> np.ndarray:
    """(k, 2) provisional global ids that touch across a seam between neighbouring chunks."""
    pairs = [np.zeros((0, 2), np.int64)]
    for (row, col), edge in edges.items():
        right, below = edges.get((row, col + 1)), edges.get((row + 1, col))
        if right is not None:
            pairs.append(_facing(edge.right, right.left, starts[(row, col)], starts[(row, col + 1)]))
        if below is not None:
            pairs.append(_facing(edge.bottom, below.top, starts[(row, col)], starts[(row + 1, col)]))
    return np.unique(np.concatenate(pairs), axis=0)


def border_areas(edges: dict[tuple[int, int], ChunkEdges], starts: dict[tuple[int, int], int]) -> np.ndarray:
    """Area (pixels) of every provisional id that touches its chunk's border, 0 for the others (index: id)."""
    total = sum(edge.count for edge in edges.values())
    areas = np.zeros(total + 1, np.int64)
    for key, edge in edges.items():
        areas[starts[key] + 1 : starts[key] + edge.count + 1] = edge.areas[1:]
    return areas


def merge_ids(total: int, pairs: np.ndarray, areas: np.ndarray | None = None, min_area: int = 0) -> np.ndarray:
    """Mapping (length total + 1) from provisional ids to final ids 1..K; 0 stays background.

    Objects joined by ``pairs`` share one id; final ids follow the order of first appearance. With ``areas``
    (``border_areas``), an object whose parts touching chunk borders add up to fewer than ``min_area`` pixels,
    and no part lies inside a chunk, is dropped (mapped to 0); objects inside one chunk were judged by
    ``label_chunk``.
    """
    if total == 0:
        return np.zeros(1, np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0] - 1, pairs[:, 1] - 1)), shape=(total, total))
    count, component = connected_components(graph, directed=False)
    kept = np.ones(count, bool)
    if areas is not None and min_area > 1:
        parts = areas[1:]
        summed = np.bincount(component, weights=parts, minlength=count)
        judged = np.bincount(component, weights=parts == 0, minlength=count) > 0  # held a part inside a chunk
        kept = judged | (summed >= min_area)
    _, first = np.unique(component, return_index=True)
    order = np.zeros(count, np.int64)
    survivors = np.argsort(first)[kept[np.argsort(first)]]  # components in order of first appearance, kept ones
    order[survivors] = np.arange(1, len(survivors) + 1)
    return np.concatenate([[0], order[component]])


def merge_chunks(
    edges: dict[tuple[int, int], ChunkEdges], min_area: int = 0
) -> tuple[dict[tuple[int, int], np.ndarray], int]:
    """Each chunk's mapping from its local ids to final ids 1..K (index 0, the background, maps to 0), and K, for a
    chunked image, from every chunk's edges (``merge_ids``): objects facing each other across a seam become one,
    objects whose parts add up to fewer than ``min_area`` pixels are dropped. A chunk's mapping is all that its
    relabelling needs (a few KB), not the image's whole one; its ids are int32 while K fits."""
    edges = dict(sorted(edges.items()))  # row-major, whatever order the chunks were done in
    starts = offsets({key: edge.count for key, edge in edges.items()})
    total = sum(edge.count for edge in edges.values())
    mapping = merge_ids(total, seam_pairs(edges, starts), border_areas(edges, starts), min_area)
    objects = int(mapping.max())
    mapping = mapping.astype(np.int32 if objects < 2**31 else np.int64)
    own = {}
    for key, edge in edges.items():  # local id i of a chunk is provisional id starts[key] + i
        own[key] = mapping[starts[key] : starts[key] + edge.count + 1].copy()
        own[key][0] = 0
    return own, objects


def relabel(local: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Final ids of a chunk from its local ids and its own mapping (``merge_chunks``)."""
    return np.take(mapping, local)
