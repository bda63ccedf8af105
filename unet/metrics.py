"""Segmentation metrics: pixel IoU/Dice and instance matching at an IoU threshold.

Instances are compared through their overlap table (one ``bincount`` over pixel pairs), so the
cost is linear in the number of pixels whatever the number of objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _pixel_counts(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """Foreground intersection, union and predicted plus true pixel counts."""
    p, t = np.asarray(predicted) > 0, np.asarray(truth) > 0
    return int(np.logical_and(p, t).sum()), int(np.logical_or(p, t).sum()), int(p.sum() + t.sum())


def _overlap(intersection: int, union: int, total: int) -> dict[str, float]:
    """IoU and Dice from pixel counts (``total``: predicted plus true pixels); 1.0 when both are empty."""
    return {"iou": intersection / union if union else 1.0, "dice": 2 * intersection / total if total else 1.0}


def _detection(tp: int, n_true: int, n_pred: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of ``tp`` matches; a side with no objects scores 1 only if the other has none."""
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * tp / (n_true + n_pred) if (n_true + n_pred) else 1.0
    return precision, recall, f1


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Consecutive ids 1..n (0 stays background)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids[0] != 0:
        return inverse + 1, len(ids)
    return inverse, len(ids) - 1


def overlap_table(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersections[n_true+1, n_pred+1], true areas, predicted areas), row/column 0 = background."""
    t, n_t = _relabel(np.asarray(truth))
    p, n_p = _relabel(np.asarray(predicted))
    table = np.bincount((t * (n_p + 1) + p).ravel(), minlength=(n_t + 1) * (n_p + 1)).reshape(n_t + 1, n_p + 1)
    return table, table.sum(axis=1), table.sum(axis=0)


@dataclass(frozen=True)
class InstanceScores:
    """Instance detection at an IoU threshold, plus merge and split counts."""

    n_true: int
    n_pred: int
    true_positives: int
    precision: float
    recall: float
    f1: float
    merged: int  # predicted objects holding most of two or more true objects
    split: int  # true objects holding most of two or more predicted objects

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def instance_scores(truth: np.ndarray, predicted: np.ndarray, threshold: float) -> InstanceScores:
    """Match true and predicted instances one to one at IoU > ``threshold`` (>= 0.5 makes it unique)."""
    table, true_area, pred_area = overlap_table(truth, predicted)
    inter = table[1:, 1:].astype(np.float64)
    n_t, n_p = inter.shape
    union = true_area[1:, None] + pred_area[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    tp = int((iou > threshold).sum())
    precision, recall, f1 = _detection(tp, n_t, n_p)
    # "most of" = more than half of the object's own area
    true_mostly_in = inter > 0.5 * true_area[1:, None]  # [t, p]: true object t lies mostly inside p
    pred_mostly_in = inter > 0.5 * pred_area[None, 1:]  # [t, p]: predicted object p lies mostly inside t
    merged = int((true_mostly_in.sum(axis=0) >= 2).sum())
    split = int((pred_mostly_in.sum(axis=1) >= 2).sum())
    return InstanceScores(n_t, n_p, tp, precision, recall, f1, merged, split)


def within(instances: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``instances`` without the objects that lie mostly (more than half their pixels) outside ``mask``: what the
    scores of an annotated region count. An object cut by the region's border counts, whole, where most of it is."""
    instances = np.asarray(instances)
    ids, inverse, total = np.unique(instances, return_inverse=True, return_counts=True)
    inside = np.bincount(inverse.ravel(), weights=np.asarray(mask, bool).ravel(), minlength=len(ids))
    keep = (ids != 0) & (inside * 2 > total)
    return np.where(keep[inverse.reshape(instances.shape)], instances, 0)


class SegmentationTally:
    """Accumulates counts over several images; ``scores()`` gives pooled (micro-averaged) metrics."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.counts = dict.fromkeys(
            ("intersection", "union", "pixels_sum", "n_true", "n_pred", "true_positives", "merged", "split"), 0
        )
        self.images = 0

    def add(
        self, truth_instances: np.ndarray, predicted_instances: np.ndarray, mask: np.ndarray | None = None
    ) -> dict[str, float]:
        """Count one image (true and predicted objects as instance ids) or, with a ``mask``, its pixels inside the
        mask and the objects mostly inside it (``within``); returns its own scores: pixel IoU and Dice, then the
        instance scores."""
        if mask is not None:
            truth_instances, predicted_instances = within(truth_instances, mask), within(predicted_instances, mask)
            counts = _pixel_counts(np.where(mask, predicted_instances, 0), np.where(mask, truth_instances, 0))
        else:
            counts = _pixel_counts(predicted_instances, truth_instances)
        for key, count in zip(("intersection", "union", "pixels_sum"), counts, strict=True):
            self.counts[key] += count
        scores = instance_scores(truth_instances, predicted_instances, self.threshold)
        for key in ("n_true", "n_pred", "true_positives", "merged", "split"):
            self.counts[key] += getattr(scores, key)
        self.images += 1
        return {**_overlap(*counts), **scores.as_dict()}

    def scores(self) -> dict[str, float]:
        c = self.counts
        n_t, n_p = c["n_true"], c["n_pred"]
        precision, recall, f1 = _detection(c["true_positives"], n_t, n_p)
        return {
            **_overlap(c["intersection"], c["union"], c["pixels_sum"]),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "merged": float(c["merged"]),
            "split": float(c["split"]),
            "n_true": float(n_t),
            "n_pred": float(n_p),
        }
