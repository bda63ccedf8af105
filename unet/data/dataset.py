"""Training patches sampled from a training store, reproducible and independent per DDP rank.

Item ``i`` of epoch ``e`` on rank ``r`` is a pure function of ``(seed, e, r, i)``: the same
patch and augmentation whatever the number of DataLoader workers, and a different random stream
on every rank, so data-parallel workers never train on the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from unet.config import Config, DataConfig
from unet.data.augment import augment as apply_augmentation
from unet.data.augment import build_augmentation
from unet.data.store import Example, TrainingStore
from unet.errors import UserError
from unet.intensity import scale_intensity
from unet.tiling import mirrored_crop

FOREGROUND_STRIDE = 4  # foreground centres are drawn from a 1-in-4 grid: plenty, and small


@dataclass
class _Loaded:
    """One example's arrays in memory, and where its foreground is."""

    image: np.ndarray  # CYX float32, normalised
    target: np.ndarray  # YX uint8
    weights: np.ndarray  # YX float32
    foreground: np.ndarray  # (N, 2) coordinates of foreground pixels (on the stride grid)


_DATA = DataConfig.model_fields


class PatchDataset(Dataset):
    """Random ``patch_size`` patches of one split of a training store.

    Args:
        store: the training store (or its path).
        split: "train" or "val".
        patch_size: patch side; should be a multiple of the model's ``size_multiple``.
        length: items per epoch (e.g. steps per epoch x batch size).
        foreground_bias: probability that a patch is centred on a foreground pixel.
        augmentation: a transform from ``build_augmentation`` (None: no augmentation).
        seed, rank: the random stream; call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        store: TrainingStore | str,
        split: str = "train",
        patch_size: int = _DATA["patch_size"].default,
        length: int = 1000,
        foreground_bias: float = _DATA["foreground_bias"].default,
        augmentation=None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.store = store if isinstance(store, TrainingStore) else TrainingStore(store)
        self.names = self.store.names_in(split)
        if not self.names:
            raise UserError(f"{self.store.location} has no {split!r} examples")
        self.patch_size, self.length = patch_size, length
        self.foreground_bias, self.augmentation = foreground_bias, augmentation
        self.seed, self.rank, self.epoch = seed, rank, 0
        areas = np.array([np.prod(self.store.example(n).labels.shape) for n in self.names], dtype=np.float64)
        self.probabilities = areas / areas.sum()
        self._loaded: dict[str, _Loaded] = {}  # filled lazily, per DataLoader worker process

    @classmethod
    def from_config(cls, store: TrainingStore | str, config: Config, rank: int = 0) -> PatchDataset:
        """The training split as ``data`` and ``train`` describe it: patch size and bias, augmentation, one
        epoch of ``train.steps_per_epoch`` batches, ``train.seed``."""
        data, train = config.data, config.train
        return cls(
            store,
            "train",
            patch_size=data.patch_size,
            length=train.steps_per_epoch * train.batch_size,
            foreground_bias=data.foreground_bias,
            augmentation=build_augmentation(data),
            seed=train.seed,
            rank=rank,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _load(self, name: str) -> _Loaded:
        if name not in self._loaded:
            ex: Example = self.store.example(name)
            target = np.asarray(ex.target[:])
            self._loaded[name] = _Loaded(
                image=scale_intensity(np.asarray(ex.image[:]), ex.attrs["intensity_range"]),
                target=target,
                weights=np.asarray(ex.weights[:]),
                foreground=np.argwhere(target[::FOREGROUND_STRIDE, ::FOREGROUND_STRIDE]) * FOREGROUND_STRIDE,
            )
        return self._loaded[name]

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        ex = self._load(self.names[rng.choice(len(self.names), p=self.probabilities)])
        height, width = ex.target.shape
        if len(ex.foreground) and rng.random() < self.foreground_bias:
            cy, cx = ex.foreground[rng.integers(len(ex.foreground))]
        else:
            cy, cx = rng.integers(height), rng.integers(width)
        top, left = int(cy) - self.patch_size // 2, int(cx) - self.patch_size // 2
        image = mirrored_crop(ex.image, top, left, self.patch_size)
        target = mirrored_crop(ex.target, top, left, self.patch_size)
        weights = mirrored_crop(ex.weights, top, left, self.patch_size)
        if self.augmentation is not None:
            image_t, target_t, weights_t = apply_augmentation(
                self.augmentation, image, target, weights, seed=int(rng.integers(2**31))
            )
        else:
            image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
            target_t = torch.from_numpy(target.astype(np.int64))
            weights_t = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        return {"image": image_t, "target": target_t, "weights": weights_t}
