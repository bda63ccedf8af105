"""Pictures for people: panels of image, target, weight map and predictions as RGB uint8 arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from scipy import ndimage as ndi

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


def colorize(values: np.ndarray, vmax: float | None = None, cmap: str = "magma") -> np.ndarray:
    """Scalar map to YX3 uint8 through a matplotlib colormap, scaled to [0, vmax]."""
    vmax = float(values.max()) if vmax is None else vmax
    scaled = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values, dtype=np.float32)
    return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Copy of ``rgb`` with the boundaries of ``mask``'s objects (binary or instance ids) drawn on it."""
    mask = np.asarray(mask)
    edges = (ndi.maximum_filter(mask, 3) != ndi.minimum_filter(mask, 3)) & (mask > 0)
    out = rgb.copy()
    out[edges] = color
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
