"""Augmentation applied identically to image, target and weights (MONAI dictionary transforms).

Geometric transforms (flips, 90-degree rotations, the paper's elastic deformation) move all
three together: image and weights are interpolated bilinearly, the target with nearest
neighbour so it stays a label image. Intensity jitter touches the image only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from unet.config import DataConfig

KEYS = ("image", "target", "weights")


def build_augmentation(config: DataConfig, patch_size: int | None = None) -> Compose | None:
    """The training augmentation described by ``config`` (None when ``config.augment`` is off)."""
    if not config.augment:
        return None
    patch_size = patch_size or config.patch_size
    keys = list(KEYS)
    transforms: list[Any] = [
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.75, max_k=3),
    ]
    if config.elastic_prob > 0 and config.elastic_sigma > 0:
        # Gaussian displacements (std elastic_sigma px) on a coarse grid, upsampled bicubically.
        spacing = max(patch_size // (config.elastic_grid - 1), 1)
        transforms.append(
            Rand2DElasticd(
                keys,
                spacing=(spacing, spacing),
                magnitude_range=(config.elastic_sigma, config.elastic_sigma),
                prob=config.elastic_prob,
                mode=("bilinear", "nearest", "bilinear"),
                padding_mode="reflection",
            )
        )
    if config.intensity_jitter > 0:
        transforms += [
            RandScaleIntensityd("image", factors=config.intensity_jitter, prob=1.0),
            RandShiftIntensityd("image", offsets=config.intensity_jitter, prob=1.0),
        ]
    return Compose(transforms)


def augment(
    transform: Compose, image: np.ndarray, target: np.ndarray, weights: np.ndarray, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``transform`` with its randomness fixed by ``seed``; returns (image, target, weights).

    ``image`` is CYX float32, ``target`` YX integer, ``weights`` YX float32; the target comes back
    as int64 with only values it had before.
    """
    transform.set_random_state(seed=seed)
    out = transform(
        {
            "image": torch.as_tensor(image, dtype=torch.float32),
            "target": torch.as_tensor(target[None].astype(np.float32)),
            "weights": torch.as_tensor(weights[None], dtype=torch.float32),
        }
    )
    as_plain = {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)) for k, v in out.items()}
    return (
        as_plain["image"].contiguous(),
        as_plain["target"][0].round().to(torch.int64).contiguous(),
        as_plain["weights"][0].contiguous(),
    )
