"""pipelines.evaluate: it predicts through the one prediction path (the same probabilities as pipelines.infer on
the same image, bit for bit), and its scores are what independent computations give on the real H&E store."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from benchmarks.models import with_resolution
from pipelines.evaluate import cli, evaluate_model
from tests.helpers import ROOT
from tests.test_infer import infer
from unet.config import load_config
from unet.data.store import TrainingStore

pytestmark = pytest.mark.slow


@pytest.fixture
def store(trained_model_dir: Path) -> Path:
    """The real H&E nuclei store the test model was trained on (its validation images were held out)."""
    return trained_model_dir.parent / "he.zarr"


def overrides(trained_model_dir: Path, store: Path, tmp_path: Path) -> list[str]:
    return [f"evaluate.model={trained_model_dir}", f"evaluate.store={store}", f"evaluate.output={tmp_path / 'eval'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip


def test_evaluate_and_infer_give_identical_probabilities(trained_model_dir, store, tmp_path) -> None:
    config = load_config(ROOT / "configs" / "train.yaml", overrides(trained_model_dir, store, tmp_path))
    _, rows, probabilities = evaluate_model(config, str(trained_model_dir), config.tracking.tracking_uri)
    for row, probability in zip(rows, probabilities, strict=True):
        slide = tmp_path / f"{row['image']}.zarr"
        zarr.create_array(slide, data=np.asarray(TrainingStore(store).example(row["image"]).image[:]))
        output = tmp_path / f"{row['image']}.ome.zarr"
        assert infer(tmp_path, trained_model_dir, slide, output, "infer.probability_dtype=float16") == 0
        stored = np.asarray(zarr.open_group(output, mode="r")["0"])[0]
        np.testing.assert_array_equal(stored, probability.astype(np.float16))


def test_scores_agree_with_independent_counts(trained_model_dir, store, tmp_path, capsys) -> None:
    args = ["--config", str(ROOT / "configs" / "train.yaml")]
    for item in overrides(trained_model_dir, store, tmp_path):
        args += ["--set", item]
    assert cli(args) == 0
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    config = load_config(ROOT / "configs" / "train.yaml", overrides(trained_model_dir, store, tmp_path))
    _, _, probabilities = evaluate_model(config, str(trained_model_dir), config.tracking.tracking_uri)
    names = TrainingStore(store).names_in("val")
    assert sorted(rows) == sorted(names) and len(names) == 3
    for name, probability in zip(names, probabilities, strict=True):
        truth = np.asarray(TrainingStore(store).example(name).labels[:])
        predicted = probability > config.infer.threshold
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
