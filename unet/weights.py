"""The paper's pixel-wise loss weights (Ronneberger et al., 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

``d1`` and ``d2`` are the distances from background pixel ``x`` to the nearest and the
second-nearest object; ``w_c`` balances the class frequencies. The large weight on the thin
background gaps between touching objects is what teaches the network to separate them. As in
the paper, the training *target* itself separates touching objects: object pixels that touch
another object become background, so every pair of touching objects is split by a gap.

Conventions (they matter for reproducing the numbers):

- the border term is applied to background pixels of the target only (inside an object both
  distances would be taken from the object itself and the term would be meaningless);
- distances are Euclidean, between pixel centres (``scipy.ndimage.distance_transform_edt``);
- an object is one label id, even when it comes in several pieces; ids need not be consecutive;
- fewer than two objects means no border term;
- ``w_c = 1 / (number of classes present * frequency of the pixel's class)``, so its mean is 1.

Speed: one distance transform per object, but only over the object's bounding box grown by the
radius beyond which the border term is below ``tolerance``: a 2048x2048 tile with ~2000 nuclei
takes under half a second instead of about six minutes (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from unet.config import LossConfig

__all__ = [
    "WeightMapParams",
    "border_weights",
    "class_weights",
    "cutoff_radius",
    "separate_touching",
    "target_and_weights",
]


_LOSS = LossConfig.model_fields


@dataclass(frozen=True)
class WeightMapParams:
    """Parameters of eq. 2: ``w0`` and ``sigma`` (pixels) of the border term, class balancing. Defaults are the
    ``loss`` section's (one source); ``from_config`` builds them from a config."""

    w0: float = _LOSS["w0"].default
    sigma: float = _LOSS["sigma"].default
    class_balance: bool = _LOSS["class_balance"].default
    tolerance: float = 1e-6  # border-term values below this may be dropped (speed)

    @classmethod
    def from_config(cls, loss: LossConfig) -> WeightMapParams:
        return cls(w0=loss.w0, sigma=loss.sigma, class_balance=loss.class_balance)


def separate_touching(labels: np.ndarray) -> np.ndarray:
    """Copy of ``labels`` where object pixels with a different object among their 8 neighbours are 0."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    foreground = labels > 0
    if not foreground.any():
        return labels.copy()
    highest = ndi.maximum_filter(labels, size=3, mode="nearest")
    # Background must not count as a smaller id: replace it by one larger than every id.
    lowest = ndi.minimum_filter(np.where(foreground, labels, labels.max() + 1), size=3, mode="nearest")
    touching = foreground & ((highest > labels) | (lowest < labels))
    return np.where(touching, 0, labels).astype(labels.dtype, copy=False)


def cutoff_radius(w0: float, sigma: float, tolerance: float) -> float:
    """Distance beyond which ``w0 * exp(-d**2 / (2 sigma**2))`` is below ``tolerance``."""
    if w0 <= tolerance:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tolerance))


def nearest_two_distances(labels: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every pixel to its nearest and second-nearest object (ids > 0).

    Exact wherever the second-nearest object is within ``radius``; elsewhere ``d2`` may be too
    large (possibly infinite), which is all the border term needs.
    """
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    margin = math.ceil(radius)
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:  # ids need not be consecutive
            continue
        window = tuple(
            slice(max(s.start - margin, 0), min(s.stop + margin, size))
            for s, size in zip(box, labels.shape, strict=True)
        )
        distance = ndi.distance_transform_edt(labels[window] != index + 1)
        near1, near2 = d1[window], d2[window]  # views: updated in place
        closer = distance < near1
        near2[...] = np.where(closer, near1, np.minimum(near2, distance))
        near1[...] = np.where(closer, distance, near1)
    return d1, d2


def border_weights(separated: np.ndarray, w0: float = 10.0, sigma: float = 5.0, tolerance: float = 1e-6) -> np.ndarray:
    """The border term ``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` on background pixels (float32).

    ``separated`` are instance labels whose touching objects are already split
    (``separate_touching``). Values below ``tolerance`` may be returned as 0.
    """
    if w0 == 0:
        return np.zeros(separated.shape, np.float32)
    d1, d2 = nearest_two_distances(separated, cutoff_radius(w0, sigma, tolerance))
    with np.errstate(over="ignore", invalid="ignore"):
        term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    term[~np.isfinite(d2) | (separated > 0)] = 0.0
    return term.astype(np.float32)


def class_weights(target: np.ndarray, frequencies: dict[int, float] | None = None) -> np.ndarray:
    """``w_c``: ``1 / (classes present * frequency of the pixel's class)``; mean 1 over the image.

    Pass ``frequencies`` ({class: fraction of pixels}) to balance by a whole slide's counts when
    ``target`` is only a chunk of it.
    """
    if frequencies is None:
        classes, counts = np.unique(target, return_counts=True)
        frequencies = dict(zip(classes.tolist(), (counts / target.size).tolist(), strict=True))
    present = {c: f for c, f in frequencies.items() if f > 0}
    weights = np.ones(target.shape, np.float32)
    for cls, freq in present.items():
        weights[target == cls] = 1.0 / (len(present) * freq)
    return weights


def target_and_weights(
    labels: np.ndarray, params: WeightMapParams = WeightMapParams(), frequencies: dict[int, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """From instance labels: the binary target (uint8, touching objects split) and eq. 2's weights."""
    if labels.dtype.kind not in "iu":
        raise ValueError(f"instance labels must be integers, got {labels.dtype}")
    separated = separate_touching(labels)
    target = (separated > 0).astype(np.uint8)
    weights = border_weights(separated, params.w0, params.sigma, params.tolerance)
    if params.class_balance:
        weights += class_weights(target, frequencies)
    else:
        weights += 1.0
    return target, weights
