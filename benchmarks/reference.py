"""Straightforward reference implementations that the fast library code is checked (and benchmarked) against."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def reference_border_weights(separated: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Eq. 2's border term the obvious way: one full-image distance transform per object."""
    ids = [i for i in np.unique(separated) if i > 0]
    if len(ids) < 2:
        return np.zeros(separated.shape)
    distances = np.sort(np.stack([ndi.distance_transform_edt(separated != i) for i in ids]), axis=0)
    term = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    return np.where(separated > 0, 0.0, term)


def reference_separation(labels: np.ndarray) -> np.ndarray:
    """Object pixels with an 8-neighbour of another object become background (loop version)."""
    out = labels.copy()
    padded = np.pad(labels, 1, mode="edge")
    for y, x in zip(*np.nonzero(labels), strict=True):
        window = padded[y : y + 3, x : x + 3]
        if np.any((window > 0) & (window != labels[y, x])):
            out[y, x] = 0
    return out
