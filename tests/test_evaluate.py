"""pipelines.evaluate: it predicts through the one prediction path (the same probabilities as pipelines.infer on
the same image, bit for bit), and its scores are what independent computations give on the real H&E store."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage as ndi

from benchmarks.models import with_resolution
from pipelines.evaluate import cli, evaluate_model
from tests.helpers import ROOT
from tests.test_infer import infer, stored
from unet.config import load_config
from unet.data.store import TrainingStore
from unet.model_files import load_weights, save_weights

pytestmark = pytest.mark.slow


@pytest.fixture
def store(trained_model_dir: Path) -> Path:
    """The real H&E nuclei store the test model was trained on (its validation images were held out)."""
    return trained_model_dir.parent / "he.zarr"


def overrides(trained_model_dir: Path, store: Path, tmp_path: Path) -> list[str]:
    return [f"evaluate.model={trained_model_dir}", f"evaluate.store={store}", f"evaluate.output={tmp_path / 'eval'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip


def as_slide(store: Path, name: str, folder: Path) -> Path:
    """A store's image as a plain Zarr array, for pipelines.infer."""
    slide = folder / f"{name}.zarr"
    zarr.create_array(slide, data=np.asarray(TrainingStore(store).example(name).image[:]))
    return slide


SQUEEZE = 2e-2  # probabilities between about 0.47 and 0.53


def hesitant(model_dir: Path, folder: Path) -> Path:
    """The model with its class logits squeezed towards logit(0.501): thousands of probabilities lie just above 0.5,
    where
    the stored uint8 value, 128, is not above round(0.5 * 255) = 128 while the float is above 0.5. It states the
    store's pixel size and training objects (p1 4 um2: objects under 32 pixels are dropped, holes are filled)."""
    model = load_weights(model_dir)
    with torch.no_grad():
        model.outc.conv.weight.mul_(SQUEEZE)
        model.outc.conv.bias.mul_(SQUEEZE)
        model.outc.conv.bias[1] += math.log(0.501 / 0.499)
    save_weights(model, folder / "hesitant")
    return with_resolution(folder / "hesitant", folder, 0.25, {"count": 100.0, "p1": 4.0, "p50": 20.0})


def test_evaluate_and_infer_give_identical_probabilities_and_objects(trained_model_dir, store, tmp_path) -> None:
    float16 = "infer.probability_dtype=float16"
    config = load_config(ROOT / "configs" / "train.yaml", [*overrides(trained_model_dir, store, tmp_path), float16])
    for prediction in evaluate_model(config, str(trained_model_dir), config.tracking.tracking_uri).predictions:
        name = prediction.example.name
        slide, output = as_slide(store, name, tmp_path), tmp_path / f"{name}.ome.zarr"
        assert infer(tmp_path, trained_model_dir, slide, output, float16) == 0
        probability, objects = stored(output)
        np.testing.assert_array_equal(probability, prediction.probability.astype(np.float16))
        np.testing.assert_array_equal(objects, prediction.objects)


def test_evaluate_scores_the_objects_inference_writes_at_uint8(trained_model_dir, store, tmp_path) -> None:
    """At the default uint8 storage, with probabilities just above infer.threshold, chunks of 100 pixels."""
    model = hesitant(trained_model_dir, tmp_path)
    config = load_config(ROOT / "configs" / "train.yaml",
                         [*overrides(model, store, tmp_path), "infer.chunk_size=100"])  # fmt: skip
    assert config.infer.probability_dtype == "uint8" and config.infer.threshold == 0.5
    prediction = evaluate_model(config, str(model), config.tracking.tracking_uri).predictions[0]
    slide, output = as_slide(store, prediction.example.name, tmp_path), tmp_path / "out.ome.zarr"
    assert infer(tmp_path, model, slide, output, "infer.chunk_size=100", "infer.pixel_size_um=0.25") == 0
    probability, objects = stored(output)
    in_the_gap = (prediction.probability > 0.5) & (probability <= 128)  # the float and the stored value disagree
    assert in_the_gap.sum() > 1000, "the model should place many probabilities just above 0.5"
    np.testing.assert_array_equal(objects, prediction.objects)  # the same objects, ids included
    assert objects.max() > 10
    # thresholding the float probability (as scoring did) would have scored another segmentation
    assert ((prediction.probability > 0.5) != (objects > 0)).sum() > 1000
    assert prediction.scores["n_pred"] == objects.max()


def test_scores_agree_with_independent_counts(trained_model_dir, store, tmp_path, capsys) -> None:
    args = ["--config", str(ROOT / "configs" / "train.yaml")]
    for item in overrides(trained_model_dir, store, tmp_path):
        args += ["--set", item]
    assert cli(args) == 0
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    config = load_config(ROOT / "configs" / "train.yaml", overrides(trained_model_dir, store, tmp_path))
    predictions = evaluate_model(config, str(trained_model_dir), config.tracking.tracking_uri).predictions
    names = TrainingStore(store).names_in("val")
    assert sorted(rows) == sorted(names) and len(names) == 3
    for name, prediction in zip(names, predictions, strict=True):
        truth = np.asarray(TrainingStore(store).example(name).labels[:])
        # inference's rule, written out: threshold the stored uint8 value, fill holes (each image is one chunk)
        assert max(truth.shape) <= config.infer.chunk
        stored = np.round(prediction.probability * 255) > round(config.infer.threshold * 255)
        predicted = ndi.binary_fill_holes(stored, np.ones((3, 3)))
        union = np.logical_or(predicted, truth > 0).sum()
        assert float(rows[name]["iou"]) == pytest.approx(np.logical_and(predicted, truth > 0).sum() / union)
        assert int(float(rows[name]["n_true"])) == len(np.unique(truth)) - 1
        assert int(float(rows[name]["n_pred"])) == ndi.label(predicted)[1]
        assert (tmp_path / "eval" / f"{name}.png").is_file()
    out = capsys.readouterr().out
    assert "images: 3 (val split" in out and "MLflow run" in out
    # a model trained at another pixel size than the store's (0.25 um/px) is not scored on it
    other = with_resolution(trained_model_dir, tmp_path, 0.5)
    assert cli([*args, "--set", f"evaluate.model={other}"]) == 2
    assert "holds images at 0.25 um/px but the model was trained at 0.5" in capsys.readouterr().err
