"""The weight map of eq. 2 against a straightforward reference, on edge cases and real touching nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from benchmarks.reference import reference_border_weights, reference_separation
from unet.samples import fetch_samples
from unet.weights import (
    WeightMapParams,
    border_weights,
    class_weights,
    cutoff_radius,
    separate_touching,
    target_and_weights,
)


@pytest.fixture(scope="module")
def fluo_labels() -> np.ndarray:
    """The real fluorescence nuclei (BBBC038): 125 nuclei, ids up to 183, 21 touching pairs."""
    path = fetch_samples(["fluo_nuclei"])["fluo_nuclei"] / "labels" / "dsb2018_0.tif"
    return tifffile.imread(path)


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_touching_objects_are_split_in_the_target() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:15] = 4
    labels[5:15, 15:27] = 9  # shares an edge with object 4
    separated = separate_touching(labels)
    np.testing.assert_array_equal(separated, reference_separation(labels))
    assert (separated[5:15, 14] == 0).all() and (separated[5:15, 15] == 0).all()  # a 2-pixel gap
    assert ndi.label(separated > 0)[1] == 2
    # Objects touching only background keep every pixel.
    np.testing.assert_array_equal(separate_touching(np.where(labels == 4, 4, 0)), np.where(labels == 4, 4, 0))


def test_real_touching_nuclei_are_separated(fluo_labels: np.ndarray) -> None:
    separated = separate_touching(fluo_labels)
    np.testing.assert_array_equal(separated, reference_separation(fluo_labels))
    # Connected components of the raw foreground merge touching nuclei; of the target they do not.
    ids = np.unique(fluo_labels)[1:]
    merged = ndi.label(fluo_labels > 0)[1]
    split = ndi.label(separated > 0, structure=np.ones((3, 3)))[1]
    assert merged < len(ids) <= split


def test_matches_reference_on_real_touching_nuclei(fluo_labels: np.ndarray) -> None:
    separated = separate_touching(fluo_labels)
    fast = border_weights(separated)
    np.testing.assert_allclose(fast, reference_border_weights(separated), rtol=0, atol=1e-5)
    # The gaps between touching nuclei are where the weight is high.
    gaps = (fluo_labels > 0) & (separated == 0)
    assert (
        fast[gaps].mean()
        > 7.0
        > 0.5
        > fast[(separated == 0) & ~ndi.binary_dilation(fluo_labels > 0, iterations=10)].mean()
    )


@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (5.0, 2.0), (25.0, 12.0)])
def test_matches_reference_for_other_parameters(fluo_labels: np.ndarray, w0: float, sigma: float) -> None:
    crop = separate_touching(fluo_labels[:200, :256])
    np.testing.assert_allclose(
        border_weights(crop, w0, sigma), reference_border_weights(crop, w0, sigma), rtol=0, atol=1e-5
    )


def test_edge_cases_match_the_reference() -> None:
    shape = (64, 80)
    empty = np.zeros(shape, np.uint16)
    one = disk(shape, (30, 40), 8).astype(np.uint16) * 7
    cut = (disk(shape, (0, 10), 9) * 3 + disk(shape, (40, 79), 10) * 250).astype(np.int64)  # cut by the border
    pieces = (disk(shape, (20, 20), 5) | disk(shape, (20, 50), 5)).astype(np.int32) * 5  # one id, two pieces
    pieces[disk(shape, (50, 35), 6)] = 2
    for labels in (empty, one, cut, pieces):
        separated = separate_touching(labels)
        np.testing.assert_allclose(border_weights(separated), reference_border_weights(separated), atol=1e-5)
    assert not border_weights(empty).any() and not border_weights(one).any()  # fewer than two objects
    # Between the two pieces of object 5 the nearest *other* object is 2, far away: little weight.
    between = border_weights(separate_touching(pieces))[20, 30:41]
    assert between.max() < 0.5


def test_class_weights_balance_frequencies() -> None:
    target = np.zeros((10, 10), np.uint8)
    target[:2] = 1  # 20% foreground
    weights = class_weights(target)
    assert weights[0, 0] == pytest.approx(1 / (2 * 0.2)) and weights[9, 9] == pytest.approx(1 / (2 * 0.8))
    assert weights.mean() == pytest.approx(1.0)
    assert (class_weights(np.zeros((4, 4), np.uint8)) == 1).all()  # one class present
    # Whole-slide frequencies can be imposed on a chunk.
    assert class_weights(target, {0: 0.5, 1: 0.5})[0, 0] == pytest.approx(1.0)


def test_target_and_weights(fluo_labels: np.ndarray) -> None:
    target, weights = target_and_weights(fluo_labels)
    assert target.dtype == np.uint8 and set(np.unique(target)) == {0, 1}
    assert weights.dtype == np.float32 and weights.shape == fluo_labels.shape
    expected = class_weights(target) + reference_border_weights(separate_touching(fluo_labels))
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    _, unbalanced = target_and_weights(fluo_labels, WeightMapParams(w0=0, class_balance=False))
    assert (unbalanced == 1).all()
    with pytest.raises(ValueError, match="integers"):
        target_and_weights(fluo_labels.astype(np.float32))


def test_cutoff_radius() -> None:
    r = cutoff_radius(10.0, 5.0, 1e-6)
    assert 10.0 * np.exp(-(r**2) / 50) == pytest.approx(1e-6)
    assert cutoff_radius(1e-7, 5.0, 1e-6) == 0.0
