"""Instance labels across a chunked slide: label each chunk alone, then merge objects that
continue across chunk seams into one id, unique over the whole slide.

Chunks are labelled with 4-connectivity, and two chunks' objects are joined where foreground
pixels face each other across the seam (also 4-connectivity), so the result equals connected
components of the whole foreground, computed without ever holding it in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def label_chunk(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """Local instance ids 1..n of a chunk's foreground (int32) and n."""
    labels, count = ndi.label(foreground)
    return labels.astype(np.int32, copy=False), int(count)


@dataclass(frozen=True)
class ChunkEdges:
    """A chunk's object count and the local ids along its four borders."""

    count: int
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, count: int) -> ChunkEdges:
        return cls(count, labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())


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


def merge_ids(total: int, pairs: np.ndarray) -> np.ndarray:
    """Mapping (length total + 1) from provisional ids to final ids 1..K; 0 stays background.

    Objects joined by ``pairs`` share one id; final ids follow the order of first appearance.
    """
    if total == 0:
        return np.zeros(1, np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0] - 1, pairs[:, 1] - 1)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    _, first = np.unique(component, return_index=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(1, len(first) + 1)
    return np.concatenate([[0], order[component]])


def relabel(local: np.ndarray, start: int, mapping: np.ndarray) -> np.ndarray:
    """Final ids of a chunk from its local ids, its provisional offset and the global mapping."""
    out = np.zeros(local.shape, np.int32 if mapping.max() < 2**31 else np.int64)
    inside = local > 0
    out[inside] = mapping[local[inside].astype(np.int64) + start]
    return out
