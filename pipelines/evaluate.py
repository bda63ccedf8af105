"""Evaluate a model on held-out labelled images: pixel IoU/Dice, instance precision/recall/F1 at
IoU 0.5, merged and split objects; per-image table, pictures, and an MLflow run. With evaluate.baseline, a second
model is scored on the same images and both are compared.

    python -m pipelines.evaluate --config configs/train.yaml --set evaluate.model=models:/unet-he@champion
    python -m pipelines.evaluate --set data.store=new.zarr --set evaluate.model=models:/unet-he/4 \
        --set evaluate.baseline=models:/unet-he@champion
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import make_parser, run
from unet.config import Config
from unet.errors import UserError

# heavy modules (torch, mlflow, zarr, scipy) are imported where they are used, so that --help answers at once
if TYPE_CHECKING:
    from unet.data.store import TrainingStore
    from unet.evaluation import Evaluation, ValidationExample
    from unet.model import UNet

log = logging.getLogger("evaluate")
SUMMARY_KEYS = ("iou", "dice", "precision", "recall", "f1", "merged", "split", "n_true", "n_pred")
SCORES = ("iou", "dice", "precision", "recall", "f1")  # the fractions; the rest are counts


def evaluate_model(config: Config, model_uri: str, tracking_uri: str) -> Evaluation:
    """Scores of ``evaluate.split`` of the store, pooled and per image: each image predicted and segmented exactly
    as ``pipelines.infer`` segments a slide with the same ``infer`` settings (``unet.evaluation``)."""
    from pipelines.models import load_model

    store, examples = held_out(config)
    return score(config, load_model(model_uri, tracking_uri=tracking_uri), store, examples)


def held_out(config: Config, store_location: str | None = None) -> tuple[TrainingStore, list[ValidationExample]]:
    """The store (``store_location``, else ``evaluate.store``, else ``data.store``) and its ``evaluate.split``."""
    from unet import evaluation
    from unet.data.store import TrainingStore

    split = config.evaluate.split
    store = TrainingStore(store_location or config.evaluate.store or config.data.store)
    examples = evaluation.load_validation(store, split)
    if not examples:
        raise UserError(f"{store.location} has no {split!r} examples to evaluate on")
    return store, examples


def score(
    config: Config, model: UNet, store: TrainingStore, examples: list[ValidationExample], device: str | None = None
) -> Evaluation:
    """``model``'s scores on ``examples`` of ``store`` as inference would segment them with the ``infer`` settings
    (on ``device``, default ``infer.device``): the one scoring of ``pipelines.evaluate`` and of the champion's
    comparison in training. A model of other channels or another pixel size than the store's is refused in one
    line."""
    from unet import evaluation
    from unet.inference import InferenceSettings
    from unet.segmentation import ObjectRule

    infer = config.infer
    if store.attrs["channels"] != model.n_channels:
        raise UserError(
            f"{store.location} has {store.attrs['channels']}-channel images; the model expects {model.n_channels}"
        )
    check_resolution(store, model)
    rule = ObjectRule.from_config(infer, model, store.pixel_size_um, store.location)
    settings = InferenceSettings.from_config(infer, device=device)
    return evaluation.evaluate(model, examples, settings, rule, infer.chunk, config.evaluate.iou_threshold)


def check_resolution(store: TrainingStore, model: UNet, name: str = "the model") -> None:
    """Scores (and fine-tuning) mean something only at the model's pixel size: a store of another is refused in one
    line naming the model as ``name``."""
    from unet.resample import TOLERANCE, same_size

    stored, trained = store.pixel_size_um, model.pixel_size_um
    if stored is not None and trained is not None and not same_size(stored, trained):
        raise UserError(
            f"{store.location} holds images at {stored:g} um/px but {name} was trained at {trained:g} (more than "
            f"{TOLERANCE:.0%} apart); prepare the store with data.pixel_size_um={trained:g}"
        )


def main(config: Config, args: argparse.Namespace) -> dict:
    return evaluate(config)


def evaluate(config: Config) -> dict:
    """Score ``evaluate.model`` (and ``evaluate.baseline``, on the same images) on ``evaluate.split`` of the store;
    write the table and pictures, log an MLflow run."""
    from pipelines import registry
    from pipelines.models import load_model
    from pipelines.registry import resolve_model
    from unet import storage
    from unet.devices import check_device

    check_device("infer.device", config.infer.device, config.infer.precision)
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    store, examples = held_out(config)
    model_uri, version = resolve_model(config.evaluate.model, tracking_uri)
    evaluation = score(config, load_model(model_uri, tracking_uri=tracking_uri), store, examples)
    summary, table = evaluation.scores, write_results(evaluation, Path(config.evaluate.output))
    params = {"model_uri": model_uri, "model_version": version, "store": store.location,
              "store_sha256": storage.sha256(store.location), "split": config.evaluate.split}  # fmt: skip
    metrics = {f"eval/{k}": v for k, v in summary.items()}
    rows = {model_uri: summary}
    if config.evaluate.baseline:
        baseline_uri, baseline_version = resolve_model(config.evaluate.baseline, tracking_uri)
        baseline = score(config, load_model(baseline_uri, tracking_uri=tracking_uri), store, examples).scores
        params |= {"baseline_uri": baseline_uri, "baseline_version": baseline_version}
        metrics |= {f"baseline/{k}": v for k, v in baseline.items()}
        metrics |= {f"difference/{k}": summary[k] - baseline[k] for k in SCORES}
        rows[baseline_uri] = baseline
    name = f"evaluate {Path(model_uri).name}" + (f" vs {Path(baseline_uri).name}" if config.evaluate.baseline else "")
    run_id = registry.log_job_run(tracking_uri, config.tracking.experiment, "evaluation", name, params, metrics,
                                  (table,))  # fmt: skip
    print_scores(rows, f"images: {len(examples)} ({config.evaluate.split} split of {store.location})")
    print(f"  per image  {table}; pictures {table.parent}/*.png; MLflow run {run_id}")
    return {**summary, "images": len(examples), "mlflow_run_id": run_id,
            **({"baseline": rows[baseline_uri]} if config.evaluate.baseline else {})}  # fmt: skip


def print_scores(rows: dict[str, dict[str, float]], images: str) -> None:
    """One line of scores per model, and their difference when there are two."""
    print()
    print(f"  {images}")
    width = max(len(uri) for uri in rows)
    print(f"  {'model':<{width}}  " + "  ".join(f"{k:>9}" for k in SUMMARY_KEYS))
    for uri, scores in rows.items():
        print(f"  {uri:<{width}}  " + "  ".join(f"{scores[k]:>9.3f}" if k in SCORES else f"{scores[k]:>9.0f}"
                                                for k in SUMMARY_KEYS))  # fmt: skip
    if len(rows) == 2:
        first, second = rows.values()
        print(f"  {'difference':<{width}}  " + "  ".join(f"{first[k] - second[k]:>+9.3f}" if k in SCORES
                                                       else f"{'':>9}" for k in SUMMARY_KEYS))  # fmt: skip


def write_results(evaluation: Evaluation, folder: Path) -> Path:
    """Write one row of scores per image (``per_image.csv``, returned) and a picture of each image's prediction."""
    from unet.io import write_png
    from unet.visualize import prediction_panel

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image": p.example.name, **p.scores} for p in evaluation.predictions]
    table = folder / "per_image.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for p in evaluation.predictions:
        panel = prediction_panel(p.example.image, p.example.target, p.probability, p.objects)
        write_png(folder / f"{p.example.name}.png", panel)
    return table


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.evaluate", __doc__.splitlines()[0], default_config="configs/train.yaml")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
