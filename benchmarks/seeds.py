"""Seed study: does the model a user gets depend on the seed? The demo recipe (`configs/demo.yaml`, run for
`train.epochs` 30 as a user would) trained with several seeds on each sample dataset, each champion scored on
held-out images it never saw, neither in training nor in the choice of its best epoch:

- H&E nuclei: trained on the 12 crops (the store's validation split: 2 of them), scored on `patch1-3` (real
  tissue, 125 nuclei);
- fluorescence nuclei (one 512 x 512 image, 125 nuclei): trained on three quadrants cut into 12 tiles of 128 px
  (validation: 2 tiles), scored on the fourth quadrant (256 x 256);
- H&E, small (`he-small`): as a lab starting out would have it, 6 crops (5 to train on, 1 to validate on: a few
  dozen objects), scored on the same `patch1-3`.

The split is fixed (the store is prepared once per dataset); only `train.seed` changes, which seeds the
weights, the patch sampling and the augmentation. Held-out instance F1 at IoU 0.5 and merged objects (a
predicted object covering most of two or more true ones) are scored by `unet.metrics` with today's
`pipelines.evaluate`, whatever code trained the model (`--code` runs prepare and train of another checkout,
e.g. a `git worktree` of an older commit), predicting as inference does (bf16, the default chunk). Since 8dd95b9
validation and scoring count the objects inference writes (`unet.segmentation`: the stored uint8 probability
thresholded, holes filled, objects under half the training objects' 1st-percentile area dropped); the rows below
were measured before it, on the connected components of the float probability above 0.5. The champions of
**average**, scored again with today's rule, moved by -0.003 to +0.004 in held-out F1 and at most one predicted
object (2026-12-06); their choice of epoch was made by the earlier validation.

    python -m benchmarks.seeds [--seeds 0 1 2] [--datasets he fluo] [--epochs 30] [--label NAME]
        [--code DIR] [--set KEY=VALUE ...] [--results docs/seeds.json] [--output docs/benchmarks.md] [--table-only]

Results accumulate in `--results` by label and dataset (a re-run replaces what it measures again); the section
of `docs/benchmarks.md` is written from all of them, each variant's command and time listed under the table.
What the study found, and what the recipe keeps because of it: docs/operations.md, "Which model you get".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
TITLE = "Seed study: held-out quality across seeds"
DATASETS = ("he", "fluo", "he-small")
SCORES = ("f1", "precision", "recall", "merged", "split", "n_true", "n_pred", "dice")


def splits(dataset: str, folder: Path) -> dict[str, Path]:
    """Write the dataset's training images (train + validation) and its held-out ones as TIFF folders."""
    from unet.samples import fetch_samples

    written = {}
    sample = f"{dataset.split('-')[0]}_nuclei"
    for part, pairs in _pairs(dataset, fetch_samples([sample])[sample]).items():
        written[part] = folder / part
        for name, (image, labels) in pairs.items():
            for kind, array in (("images", image), ("labels", labels)):
                (folder / part / kind).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(folder / part / kind / f"{name}.tif", array)
    return written


def _pairs(dataset: str, source: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    read = lambda kind, name: tifffile.imread(source / kind / f"{name}.tif")  # noqa: E731
    if dataset.startswith("he"):
        names = sorted(p.stem for p in (source / "images").glob("*.tif"))
        held_out = {n for n in names if n.startswith("patch")}
        if dataset == "he-small":  # the first 6 crops and the held-out patches
            names = [n for n in names if n in held_out or n < "crop06"]
        return {part: {n: (read("images", n), read("labels", n)) for n in names if (n in held_out) == (part == "test")}
                for part in ("trainval", "test")}  # fmt: skip
    image, labels = read("images", "dsb2018_0"), read("labels", "dsb2018_0")
    tiles = {f"tile{y // 128}{x // 128}": (image[y : y + 128, x : x + 128], labels[y : y + 128, x : x + 128])
             for y in range(0, 512, 128) for x in range(0, 512, 128) if not (y >= 256 and x >= 256)}  # fmt: skip
    return {"trainval": tiles, "test": {"quadrant11": (image[256:, 256:], labels[256:, 256:])}}


def job(code: Path, module: str, overrides: list[str], *flags: str) -> float:
    """Run ``python -m MODULE --config configs/demo.yaml FLAGS --set ...`` in checkout ``code``; its wall seconds."""
    command = [sys.executable, "-m", module, "--config", str(code / "configs" / "demo.yaml"), *flags]
    command += [arg for override in overrides for arg in ("--set", override)]
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "RAY_ADDRESS"}}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=code, env={**env, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def study(dataset: str, seeds: list[int], epochs: int, code: Path, work: Path, extra: list[str]) -> list[dict]:
    """Prepare once, train once per seed, score each champion on the held-out images."""
    from mlflow.tracking import MlflowClient

    folders, tracking = splits(dataset, work / dataset), f"sqlite:///{work / 'mlflow.db'}"
    common = ["model.n_channels=1"] if dataset == "fluo" else []
    stores = {part: str(work / dataset / f"{part}.zarr") for part in folders}
    for part, folder in folders.items():
        fraction = "0.2" if part == "trainval" else "0"
        size = "0.5" if dataset == "fluo" else "0.25"  # the samples' metadata states none
        job(code, "pipelines.prepare", [*common, f"data.pixel_size_um={size}", f"data.images={folder / 'images'}",
                                        f"data.labels={folder / 'labels'}", f"data.store={stores[part]}",
                                        f"data.val_fraction={fraction}"], "--overwrite")  # fmt: skip
    rows = []
    for seed in seeds:
        name = f"seeds-{dataset}-{seed}"
        overrides = [*common, f"data.store={stores['trainval']}", f"train.seed={seed}", f"train.epochs={epochs}",
                     f"train.run_name={name}", f"train.storage_path={work / 'runs'}", "tracking.experiment=seeds",
                     f"tracking.tracking_uri={tracking}", f"tracking.registered_model={name}", *extra]  # fmt: skip
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a run of that name would be resumed, not redone
        seconds = job(code, "pipelines.train", overrides)
        client = MlflowClient(tracking)
        version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        scores = held_out_scores(f"models:/{name}/{version.version}", tracking, stores["test"], common, work)
        rows.append({"seed": seed, **scores, "best_epoch": float(version.tags.get("best_epoch", "nan")),
                     "val_f1": float(version.tags.get("val/f1", "nan")), "train_seconds": seconds,
                     "val_curve": validation_curve(client, version.run_id)})  # fmt: skip
        print(f"{dataset} seed {seed}: held-out F1 {scores['f1']:.3f}, merged {scores['merged']:.0f} "
              f"({seconds:.0f} s)", flush=True)  # fmt: skip
    return rows


def validation_curve(client, run_id: str) -> list[float]:
    """The run's validation F1 per epoch, in order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, "val/f1"), key=lambda m: m.step)]


def jumps(curve: list[float]) -> float:
    """How much the validation F1 moves from one epoch to the next over the second half of a run, where the best
    epoch is chosen: the mean absolute change (nan without a curve)."""
    late = curve[len(curve) // 2 :]
    return float(np.mean(np.abs(np.diff(late)))) if len(late) > 1 else float("nan")


def held_out_scores(model_uri: str, tracking: str, store: str, common: list[str], work: Path) -> dict[str, float]:
    from pipelines.evaluate import evaluate_model
    from unet.config import load_config

    config = load_config(None, [*common, f"evaluate.store={store}", "evaluate.split=train",
                                f"evaluate.output={work / 'evaluate'}"])  # fmt: skip
    summary = evaluate_model(config, model_uri, tracking).scores
    return {key: float(summary[key]) for key in SCORES}


def to_markdown(results: dict) -> str:
    lines = [
        "| code | dataset | held-out F1 per seed (merged) | mean F1 | spread (max - min) | mean merged | "
        "validation F1, epoch-to-epoch change | training, mean |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, result in results.items():
        for dataset, rows in sorted(result["datasets"].items(), key=lambda item: DATASETS.index(item[0])):
            f1 = [row["f1"] for row in rows]
            per_seed = ", ".join(f"{row['seed']}: {row['f1']:.3f} ({row['merged']:.0f})" for row in rows)
            lines.append(
                f"| {label} | {dataset} | {per_seed} | {np.mean(f1):.3f} | {max(f1) - min(f1):.3f} | "
                f"{np.mean([row['merged'] for row in rows]):.1f} | "
                f"{np.mean([jumps(row.get('val_curve', [])) for row in rows]):.3f} | "
                f"{np.mean([row['train_seconds'] for row in rows]) / 60:.1f} min |"
            )
    notes = [f"- **{label}**: {r['what']} (`{r['command']}`, {r['when']})" for label, r in results.items()]
    return "\n".join([*lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=TITLE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--label", default="today", help="the name of this variant in the results")
    parser.add_argument("--what", default="the demo recipe at this commit", help="what the variant is, for the table")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose prepare and train run")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override on top of the demo recipe (repeatable)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/unet-seeds"))
    parser.add_argument("--table-only", action="store_true", help="train nothing: write the section from --results")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "seeds.json")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.seeds " + " ".join(sys.argv[1:] if argv is None else argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code, capture_output=True, text=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if not args.table_only:
        work = args.work / args.label
        datasets = {d: study(d, args.seeds, args.epochs, args.code.resolve(), work, args.extra) for d in args.datasets}
        datasets = results.get(args.label, {}).get("datasets", {}) | datasets  # a label's other datasets are kept
        results[args.label] = {"what": args.what, "commit": commit.stdout.strip(), "command": command.strip(),
                               "when": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "datasets": datasets}  # fmt: skip
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    from benchmarks.run import write_section

    table = to_markdown(results)
    print(table)
    intro = re.sub(r"\n\n    python -m benchmarks\.seeds.*?\n\n", "\n\n", __doc__ or "", flags=re.S).strip()
    write_section(args.output, TITLE, intro, table, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
