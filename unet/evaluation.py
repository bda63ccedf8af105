"""Scoring a model on labelled images: the one evaluation loop of training validation, ``pipelines.evaluate`` and
the benchmarks. Each image is predicted as ``pipelines.infer`` predicts a slide (``predict_image``) and its
objects are made by inference's own rule (``unet.segmentation``), so the scores describe what inference writes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from unet.data.store import TrainingStore
from unet.inference import ChunkPredictor, InferenceSettings, predict_image
from unet.intensity import scale_intensity
from unet.metrics import SegmentationTally
from unet.model import UNet
from unet.segmentation import ObjectRule, label_image


@dataclass
class ValidationExample:
    name: str
    pixels: np.ndarray  # CYX as stored
    intensity_range: tuple[tuple[float, float], ...]  # the training rule's normalisation range
    labels: np.ndarray  # YX instance ids
    target: np.ndarray  # YX 0/1
    mask: np.ndarray | None = None  # YX bool: where annotation is complete (an annotated region); None: everywhere

    @property
    def image(self) -> np.ndarray:
        """The normalised image (CYX float32), as the model sees it."""
        return scale_intensity(self.pixels, self.intensity_range)


@dataclass
class Prediction:
    """One image as inference would segment it, and its own scores."""

    example: ValidationExample
    probability: np.ndarray  # YX float32, as predicted
    objects: np.ndarray  # YX instance ids, as inference writes them
    scores: dict[str, float]  # pixel IoU/Dice and instance scores of this image alone


@dataclass
class Evaluation:
    scores: dict[str, float]  # pooled over the images (micro-averaged)
    predictions: list[Prediction]


# Too few validation objects make the best epoch (and the champion) a matter of luck: an F1 measured on n objects
# has a standard error of about 0.5 / sqrt(n), 0.05 at 100 objects.
MIN_VALIDATION_OBJECTS = 100


def small_validation_split(store: TrainingStore) -> str | None:
    """What to say when the store's validation split has too few objects to choose the best epoch on (objects cut
    by an image's border count once per image)."""
    objects = sum(int(np.count_nonzero(np.unique(store.example(name).labels[:]))) for name in store.names_in("val"))
    if objects >= MIN_VALIDATION_OBJECTS:
        return None
    return (f"the validation split of {store.location} has {objects} objects: the best epoch and the champion are "
            f"chosen on them, and below {MIN_VALIDATION_OBJECTS} that choice is noisy (raise data.val_fraction, or "
            "add labelled images)")  # fmt: skip


def load_validation(store: TrainingStore, split: str = "val") -> list[ValidationExample]:
    """Whole images of a store's ``split``, as stored, with their normalisation ranges."""
    examples = []
    for name in store.names_in(split):
        ex = store.example(name)
        ranges = tuple(tuple(map(float, pair)) for pair in ex.attrs["intensity_range"])
        mask = None if ex.mask is None else np.asarray(ex.mask[:], dtype=bool)
        pixels, labels, target = (np.asarray(array[:]) for array in (ex.image, ex.labels, ex.target))
        examples.append(ValidationExample(name, pixels, ranges, labels, target, mask))
    return examples


def evaluate(
    model: UNet,
    examples: Iterable[ValidationExample],
    settings: InferenceSettings,
    rule: ObjectRule,
    chunk: int,
    iou_threshold: float,
    tally: SegmentationTally | None = None,
) -> Evaluation:
    """Scores over all ``examples`` (pixel IoU/Dice, instance F1 at ``iou_threshold``, merges, splits) of the
    objects ``pipelines.infer`` would write with ``settings``, ``rule`` and ``infer.chunk_size`` = ``chunk``;
    ``tally`` pools them with earlier calls' (a new one by default)."""
    tally = SegmentationTally(iou_threshold) if tally is None else tally
    predictions = []
    with ChunkPredictor(model, settings) as predictor:
        for ex in examples:
            probability = predict_image(predictor, ex.pixels, ex.intensity_range, chunk)
            objects = label_image(rule.store(probability), rule, chunk)
            predictions.append(Prediction(ex, probability, objects, tally.add(ex.labels, objects, ex.mask)))
    return Evaluation(tally.scores(), predictions)
