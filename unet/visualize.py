"""Pictures for people: panels of image, target, weight map and predictions as RGB uint8 arrays."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from unet.io import write_png


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An image (YX, YXC or CYX; any dtype) as YX3 uint8 for display, contrast-stretched if not uint8."""
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3:
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
    if image.dtype != np.uint8:
        data = image.astype(np.float32)
        lo, hi = np.percentile(data, (1, 99.8))
        image = (np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


@functools.cache
def _colors(cmap: str) -> np.ndarray:
    """The colormap's 256 colours as uint8 RGB (what it gives for each of its entries)."""
    return (colormaps[cmap](np.arange(256))[:, :3] * 255).astype(np.uint8)


def colorize(values: np.ndarray, vmax: float | None = None, cmap: str = "magma") -> np.ndarray:
    """Scalar map to YX3 uint8 through a matplotlib colormap, scaled to [0, vmax] (the colormap's entry for each
    value, as matplotlib picks it, looked up in a table: a slide's picture at a time)."""
    vmax = float(values.max()) if vmax is None else vmax
    scaled = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros(values.shape, np.float32)
    return _colors(cmap)[np.minimum((scaled * 256).astype(np.int64), 255)]


def outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Copy of ``rgb`` with the boundaries of ``mask``'s objects (binary or instance ids) drawn on it: the pixels of
    an object with a neighbour (of 8; beyond the border, the pixel itself) of another value."""
    mask = np.asarray(mask)
    padded = np.pad(mask, 1, mode="edge")
    height, width = mask.shape
    edges = np.zeros(mask.shape, bool)
    for dy, dx in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)):
        edges |= padded[dy : dy + height, dx : dx + width] != mask
    out = rgb.copy()
    out[edges & (mask > 0)] = color
    return out


def weight_map_panel(image: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Image with target outlines | target | weight map (magma; bright = high weight), side by side."""
    rgb = to_rgb(image)
    target_rgb = np.repeat((target > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([outline(rgb, target), gap, target_rgb, gap, colorize(weights)], axis=1)


def save_weight_map_png(location: str | Path, image: np.ndarray, target: np.ndarray, weights: np.ndarray) -> str:
    """Write ``weight_map_panel`` as PNG: the borders between touching nuclei should glow."""
    return write_png(location, weight_map_panel(image, target, weights))


def prediction_panel(image: np.ndarray, target: np.ndarray, probability: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Image | target | prediction (probability, with the predicted ``objects`` outlined in green)."""
    rgb = to_rgb(image)
    target_rgb = np.repeat((np.asarray(target) > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)
    predicted = outline(colorize(probability, vmax=1.0, cmap="gray"), objects)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, target_rgb, gap, predicted], axis=1)
