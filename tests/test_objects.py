"""One chunk's objects on real H&E: ``label_chunk``'s areas and ``chunk_sums``' partial sums against a recount and
``skimage.measure.regionprops`` (the whole slide's table is checked end to end in test_results)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.measure import regionprops

from unet.instances import label_chunk
from unet.objects import chunk_sums
from unet.slides import open_slide

Y0, X0 = 1024, 768  # the chunk's origin in the slide


@pytest.fixture(scope="module")
def chunk(cmu_slide: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 512-px chunk of the real slide (CYX uint8) and its dark (hematoxylin) pixels as foreground."""
    image = open_slide(cmu_slide).read(Y0, Y0 + 512, X0, X0 + 512)
    return image, image.mean(axis=0) < 120


def test_label_chunk_gives_each_kept_object_its_area(chunk) -> None:
    _, foreground = chunk
    labels, count, areas = label_chunk(foreground, fill_holes=True, min_area=30)
    everything = label_chunk(foreground, fill_holes=True)
    assert count > 20 and everything.count > count  # small objects were dropped
    np.testing.assert_array_equal(areas, np.bincount(labels.ravel(), minlength=count + 1))
    np.testing.assert_array_equal(everything.areas, np.bincount(everything.labels.ravel()))
    inside = np.ones(count + 1, bool)
    inside[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    assert areas[1:][inside[1:]].min() >= 30  # the small ones kept touch the border, for the merge to judge


@pytest.mark.parametrize("ids", ["1..n", "any"])
def test_chunk_sums_agree_with_regionprops(chunk, ids: str) -> None:
    image, foreground = chunk
    labels, _, areas = label_chunk(foreground, fill_holes=True, min_area=30)
    if ids == "any":  # every third object gone and the rest renumbered with gaps: no areas given
        labels = np.where(labels % 3 == 0, 0, labels * 7).astype(np.int32)
        areas = None
    probability = np.random.default_rng(0).random(labels.shape)
    parts = chunk_sums(labels, probability, image, Y0, X0, areas)
    props = regionprops(labels, intensity_image=np.dstack([probability, *image]).astype(np.float64))
    assert list(parts["id"]) == [p.label for p in props]
    np.testing.assert_array_equal(parts["area"], [p.area for p in props])
    for name, column in {"bbox_y0": 0, "bbox_x0": 1, "bbox_y1": 2, "bbox_x1": 3}.items():
        np.testing.assert_array_equal(parts[name], [p.bbox[column] + (Y0, X0)[column % 2] for p in props])
    area = parts["area"]
    np.testing.assert_allclose(parts["sum_y"] / area, [p.centroid[0] + Y0 for p in props], rtol=1e-12)
    np.testing.assert_allclose(parts["sum_x"] / area, [p.centroid[1] + X0 for p in props], rtol=1e-12)
    np.testing.assert_allclose(parts["sum_probability"] / area, [p.intensity_mean[0] for p in props], rtol=1e-12)
    for channel in range(3):
        means = [p.intensity_mean[1 + channel] for p in props]
        np.testing.assert_allclose(parts[f"sum_intensity_{channel}"] / area, means, rtol=1e-12)
