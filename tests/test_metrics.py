"""Pixel and instance metrics on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from unet.metrics import (
    SegmentationTally,
    instance_scores,
)
from unet.segmentation import ObjectRule, label_image


def squares(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (40, 40), ids=None) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        labels[y0:y1, x0:x1] = ids[i] if ids else i + 1
    return labels


def test_pixel_scores() -> None:
    truth = squares((0, 10, 0, 10))
    scores = SegmentationTally(0.5).add(truth, squares((0, 10, 0, 5)))
    assert (scores["iou"], scores["dice"]) == (0.5, pytest.approx(2 * 50 / 150))
    empty = SegmentationTally(0.5).add(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert (empty["iou"], empty["dice"]) == (1.0, 1.0)


def test_perfect_and_empty_predictions() -> None:
    truth = squares((0, 10, 0, 10), (20, 30, 20, 30), ids=[7, 42])
    perfect = instance_scores(truth, truth, 0.5)
    assert (perfect.true_positives, perfect.f1, perfect.merged, perfect.split) == (2, 1.0, 0, 0)
    empty = instance_scores(truth, np.zeros_like(truth), 0.5)
    assert (empty.n_pred, empty.recall, empty.f1) == (0, 0.0, 0.0)


def test_merge_and_split_are_counted() -> None:
    truth = squares((5, 15, 5, 15), (5, 15, 16, 26), (30, 38, 5, 35))
    # one prediction covers the first two true objects; the third true object is cut in two
    predicted = squares((5, 15, 5, 26), (30, 38, 5, 19), (30, 38, 21, 35))
    scores = instance_scores(truth, predicted, 0.5)
    assert (scores.n_true, scores.n_pred, scores.true_positives) == (3, 3, 0)
    assert (scores.merged, scores.split) == (1, 1)


def test_iou_threshold() -> None:
    truth = squares((0, 10, 0, 10))
    shifted = squares((0, 10, 3, 13))  # IoU 70/130 = 0.54
    assert instance_scores(truth, shifted, 0.5).true_positives == 1
    assert instance_scores(truth, shifted, threshold=0.6).true_positives == 0


def test_touching_prediction_counts_as_one_object() -> None:
    truth = squares((5, 15, 5, 15), (5, 15, 15, 25))  # touching
    # right pixels, but no gap: inference's rule makes one connected component of them
    objects = label_image(np.where(truth > 0, 255, 0).astype(np.uint8), ObjectRule(0.5, "uint8", False, 0), 16)
    scores = SegmentationTally(0.5).add(truth, objects)
    assert scores["iou"] == 1.0 and scores["n_pred"] == 1 and scores["merged"] == 1 and scores["f1"] == 0.0
    assert objects.max() == 1


def test_tally_pools_counts_over_images() -> None:
    truth_a, truth_b = squares((0, 10, 0, 10)), squares((0, 10, 0, 10), (20, 30, 20, 30))
    tally = SegmentationTally(0.5)
    tally.add(truth_a, truth_a)  # perfect
    tally.add(truth_b, np.zeros_like(truth_b))  # misses both
    scores = tally.scores()
    assert scores["n_true"] == 3 and scores["n_pred"] == 1
    assert scores["recall"] == pytest.approx(1 / 3) and scores["precision"] == 1.0
    assert scores["f1"] == pytest.approx(2 * 1 / 4)
    assert scores["iou"] == pytest.approx(100 / 300)
