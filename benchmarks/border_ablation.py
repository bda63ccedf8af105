"""The paper's claim, measured: does the border term of the weight map (w0 > 0) separate touching
nuclei better? Same model, seed, data, augmentation and steps, trained twice: with the paper's
weights (w0 = 10, sigma = 5) and with class balancing only (w0 = 0).

Data: the real fluorescence image (BBBC038, 125 nuclei, 21 touching pairs), cut into four
256 x 256 quadrants; 4-fold cross-validation (train on three quadrants, test on the fourth), so
every nucleus is scored once by a model that never saw it. Both conditions train on the same
target, in which touching nuclei are already split; only the weights differ.

    python -m benchmarks.border_ablation [--steps 300] [--output docs/ablation.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch.utils.data import DataLoader

from pipelines.prepare import prepare
from unet.config import DataConfig, load_config
from unet.data.augment import build_augmentation
from unet.data.dataset import PatchDataset
from unet.data.store import TrainingStore
from unet.evaluation import ValidationExample, evaluate
from unet.inference import InferenceSettings
from unet.intensity import intensity_ranges
from unet.loss import WeightedLoss
from unet.metrics import SegmentationTally
from unet.samples import fetch_samples
from unet.segmentation import ObjectRule
from unet.training import (
    build_model,
    build_optimizer,
    build_scheduler,
    make_grad_scaler,
    train_step,
)

CONDITIONS = {"with border term (w0=10, sigma=5)": 10.0, "without (w0=0, class balance only)": 0.0}
PIXEL_SIZE_UM = 0.5  # the fluorescence sample's metadata states none
SCORING = load_config(None, [])  # the thresholds training validation and pipelines.evaluate use by default
KEYS = ("f1", "precision", "recall", "merged", "split", "iou", "n_true", "n_pred")


def quadrants(array: np.ndarray) -> list[np.ndarray]:
    h, w = array.shape[0] // 2, array.shape[1] // 2
    return [array[:h, :w], array[:h, w:], array[h:, :w], array[h:, w:]]


def scored(model: torch.nn.Module, image: np.ndarray, labels: np.ndarray, tally: SegmentationTally) -> None:
    """Add a test image's scores to ``tally``: predicted and segmented as ``pipelines.infer`` does (in fp32), small
    objects judged by the model's training objects."""
    infer = SCORING.infer.model_copy(update={"precision": "fp32"})
    example = ValidationExample(
        "test", image[None], intensity_ranges(image[None]), labels, (labels > 0).astype(np.uint8)
    )
    rule = ObjectRule.from_config(infer, model, PIXEL_SIZE_UM, "the test quadrant")
    evaluate(model, [example], InferenceSettings.from_config(infer), rule, infer.chunk, tally.threshold, tally)


def train_fold(folder: Path, images, labels, w0: float, steps: int, seed: int) -> torch.nn.Module:
    for kind, arrays in (("images", images), ("labels", labels)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(arrays):
            tifffile.imwrite(folder / kind / f"q{i}.tif", array)
    overrides = [f"data.images={folder / 'images'}", f"data.labels={folder / 'labels'}"]
    overrides += [f"data.store={folder / 's.zarr'}", "data.val_fraction=0", "model.n_channels=1"]
    overrides += [f"data.pixel_size_um={PIXEL_SIZE_UM}"]
    overrides += ["model.base_channels=16", f"loss.w0={w0}", f"train.steps_per_epoch={steps}", "train.epochs=1"]
    overrides += ["train.lr=0.003", "train.warmup_steps=20", f"train.seed={seed}"]
    config = load_config(None, overrides)
    store = prepare(config, previews=0)
    torch.manual_seed(seed)
    trained_on = TrainingStore(store)  # its pixel size and objects, as pipelines.train records them in the model
    model = build_model(
        config.model, pixel_size_um=trained_on.pixel_size_um, object_area_um2=trained_on.object_area_um2
    )
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    augmentation = build_augmentation(DataConfig(), 128)
    dataset = PatchDataset(store, patch_size=128, length=steps * 4, foreground_bias=0.5, augmentation=augmentation,
                           seed=seed)  # fmt: skip
    scaler, loss_fn, cpu = make_grad_scaler("fp32", torch.device("cpu")), WeightedLoss(), torch.device("cpu")
    for batch in DataLoader(dataset, batch_size=4):
        train_step(model, batch, optimizer, loss_fn, scaler, device=cpu, precision="bf16", channels_last=True,
                   grad_clip=1.0)  # fmt: skip
        scheduler.step()
    return model.eval()


def run(steps: int = 300, seed: int = 0) -> dict:
    folder = fetch_samples(["fluo_nuclei"])["fluo_nuclei"]
    image = tifffile.imread(folder / "images" / "dsb2018_0.tif")
    labels = tifffile.imread(folder / "labels" / "dsb2018_0.tif")
    images, label_parts = quadrants(image), quadrants(labels)
    results = {}
    for condition, w0 in CONDITIONS.items():
        tally, started = SegmentationTally(SCORING.evaluate.iou_threshold), time.perf_counter()
        for test in range(4):
            train = [i for i in range(4) if i != test]
            with tempfile.TemporaryDirectory() as tmp:
                model = train_fold(
                    Path(tmp), [images[i] for i in train], [label_parts[i] for i in train], w0, steps, seed
                )
            scored(model, images[test], label_parts[test], tally)
            print(f"{condition}: fold {test + 1}/4 done", flush=True)
        results[condition] = {**tally.scores(), "seconds": time.perf_counter() - started}
    return {"steps": steps, "seed": seed, "results": results}


def to_markdown(result: dict, command: str) -> str:
    lines = [
        "# Ablation: the border term of the weight map",
        "",
        (__doc__ or "").split("\n\n    python")[0].strip(),
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}`; {result['steps']} steps of 4 patches "
        f"(128 x 128) per fold, seed {result['seed']}, U-Net base width 16, AdamW, bf16, CPU.",
        "",
        "| condition | instance F1 @ IoU 0.5 | precision | recall | merged | split | pixel IoU | true | predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for condition, r in result["results"].items():
        lines.append(
            f"| {condition} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['merged']:.0f} "
            f"| {r['split']:.0f} | {r['iou']:.3f} | {r['n_true']:.0f} | {r['n_pred']:.0f} |"
        )
    with_term, without = result["results"].values()
    lines += [
        "",
        f"Difference (with - without): instance F1 {with_term['f1'] - without['f1']:+.3f}, merged objects "
        f"{with_term['merged'] - without['merged']:+.0f}, split objects {with_term['split'] - without['split']:+.0f}.",
        "",
        "Scope: one small image, four folds, one seed; a difference of a few objects is within what another "
        "seed could change. Merged = a predicted object holding most of two or more true nuclei.",
        "",
        "Objects are scored as `pipelines.infer` writes them (`unet.segmentation`, since 8dd95b9): the stored uint8 "
        "probability thresholded at 0.5, holes filled, objects under half the 1st-percentile area of the fold's "
        "training nuclei dropped. Without that last rule (as before), the model trained without the border term "
        "leaves many small fragments: F1 0.398 with 220 predicted objects at cf80dff, against 0.713 with the term.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.border_ablation", description="border-term ablation")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("docs/ablation.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    result = run(args.steps, args.seed)
    command = "python -m benchmarks.border_ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_markdown(result, command.strip()))
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
