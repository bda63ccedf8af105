"""Patch sampling from the training store and augmentation that keeps image, target and weights aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.prepare import prepare
from unet.config import DataConfig, load_config
from unet.data.augment import augment, build_augmentation
from unet.data.dataset import PatchDataset
from unet.data.store import TrainingStore
from unet.tiling import mirrored_crop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TrainingStore:
    path = tmp_path_factory.mktemp("store") / "he.zarr"
    return TrainingStore(prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={path}"]), previews=0))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_items_are_reproducible_and_differ_by_rank_and_epoch(store: TrainingStore) -> None:
    augmentation = build_augmentation(DataConfig(), 128)
    rank0 = PatchDataset(store, patch_size=128, length=8, augmentation=augmentation, seed=7, rank=0)
    again = PatchDataset(store, patch_size=128, length=8, augmentation=build_augmentation(DataConfig(), 128), seed=7)
    rank1 = PatchDataset(store, patch_size=128, length=8, augmentation=augmentation, seed=7, rank=1)
    item = rank0[3]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert item["target"].dtype == torch.int64 and item["weights"].shape == (128, 128)
    assert same(again[3], item) and same(rank0[3], item)
    assert not same(rank1[3], item)
    rank0.set_epoch(1)
    assert not same(rank0[3], item)


def test_dataloader_workers_do_not_change_the_data(store: TrainingStore) -> None:
    dataset = PatchDataset(store, patch_size=64, length=6, augmentation=build_augmentation(DataConfig(), 64), seed=3)
    single = list(DataLoader(dataset, batch_size=3, num_workers=0))
    multi = list(DataLoader(dataset, batch_size=3, num_workers=2))
    assert all(same(a, b) for a, b in zip(single, multi, strict=True))


def test_foreground_bias(store: TrainingStore) -> None:
    def foreground_at_centre(bias: float) -> float:
        dataset = PatchDataset(store, patch_size=32, length=300, foreground_bias=bias, seed=0)
        return float(np.mean([dataset[i]["target"][16, 16].item() for i in range(len(dataset))]))

    assert foreground_at_centre(1.0) > 0.95
    assert foreground_at_centre(1.0) > foreground_at_centre(0.0) + 0.3


def test_images_are_normalised_and_splits_respected(store: TrainingStore) -> None:
    train = PatchDataset(store, "train", patch_size=64, length=4)
    val = PatchDataset(store, "val", patch_size=64, length=4)
    assert set(train.names).isdisjoint(val.names) and len(val.names) == 3
    image = train[0]["image"]
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_patches_are_mirror_padded_by_the_inference_rule() -> None:
    array = np.arange(12).reshape(3, 4)
    crop = mirrored_crop(array, -2, -1, 6)
    assert crop.shape == (6, 6)
    np.testing.assert_array_equal(crop[2:5, 1:5], array)  # the image sits inside, unchanged
    np.testing.assert_array_equal(crop[1, 1:5], array[1])  # mirrored about the top edge, the edge not repeated
    np.testing.assert_array_equal(crop, np.pad(array, ((2, 1), (1, 1)), mode="reflect"))  # inference's rule
    np.testing.assert_array_equal(mirrored_crop(array, 0, 0, 2), array[:2, :2])
    image = np.stack([array, array + 100])  # channels first, as training images are stored
    np.testing.assert_array_equal(mirrored_crop(image, -2, -1, 6)[1], crop + 100)


def labelled_example(seed: int = 0, size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image whose channels encode the target and position, so misalignment is visible."""
    rng = np.random.default_rng(seed)
    target = np.zeros((size, size), np.uint8)
    for _ in range(12):
        y, x = rng.integers(8, size - 8, 2)
        target[y - 6 : y + 6, x - 4 : x + 4] = 1
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    image = np.stack([target.astype(np.float32), yy, xx])
    weights = 1.0 + 5.0 * target.astype(np.float32)
    return image, target, weights


def test_geometric_augmentation_moves_everything_together() -> None:
    config = DataConfig(elastic_prob=0.0, intensity_jitter=0.0)
    transform = build_augmentation(config, 96)
    image, target, weights = labelled_example()
    for seed in range(8):
        out_image, out_target, out_weights = augment(transform, image, target, weights, seed)
        # flips and 90-degree rotations are exact permutations of pixels
        assert torch.equal(out_image[0], out_target.float())
        assert torch.equal(out_weights, 1.0 + 5.0 * out_target.float())
        assert sorted(out_image[0].flatten().tolist()) == sorted(image[0].flatten().tolist())


def test_elastic_deformation_keeps_labels_integer_and_aligned() -> None:
    config = DataConfig(elastic_prob=1.0, elastic_sigma=10.0, intensity_jitter=0.0)
    transform = build_augmentation(config, 96)
    image, target, weights = labelled_example(1)
    for seed in range(5):
        out_image, out_target, out_weights = augment(transform, image, target, weights, seed)
        assert out_target.dtype == torch.int64 and set(out_target.unique().tolist()) <= {0, 1}
        moved = (out_image[1:] - torch.from_numpy(image[1:])).abs().max()
        assert moved > 0.02  # the deformation really moved pixels
        # the bilinearly warped copy of the target agrees with the nearest-neighbour target
        agreement = ((out_image[0] > 0.5).long() == out_target).float().mean()
        assert agreement > 0.97
        weight_agreement = ((out_weights > 3.5).long() == out_target).float().mean()
        assert weight_agreement > 0.97


def test_intensity_jitter_touches_only_the_image() -> None:
    transform = build_augmentation(DataConfig(elastic_prob=0.0, intensity_jitter=0.2), 96)
    image, target, weights = labelled_example(2)
    out_image, out_target, out_weights = augment(transform, image, target, weights, 0)
    assert torch.equal(out_weights, 1.0 + 5.0 * out_target.float())
    assert not torch.allclose(out_image[0], out_target.float())


def test_augmentation_can_be_switched_off() -> None:
    assert build_augmentation(DataConfig(augment=False)) is None
