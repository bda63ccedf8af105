"""Batch inference over a cohort: 20 small slides in one ``pipelines.infer`` job against 20 single-slide jobs,
and against the pure compute of the same forward passes.

Slides: 20 windows of 1024 x 1024 (1 Mpx) cut from the real CMU slide at different places, stored as Zarr
(real tissue; the cohort itself is made up). Both ways run as a user would, with the default
``configs/infer.yaml`` and only the paths set; the same model file (base 16, and the paper's width 64), bf16,
channels_last, all cores. "One batch job" is one process over the folder; "20 single-slide jobs" are 20
processes one after the other. "Pure compute" is the same forward passes (``ChunkPredictor.predict_chunk``
with the default chunk size, one pass per chunk) in one process, the pixels already in memory, nothing
written; "share computing" is pure compute divided by the wall time. Each wall time runs from the process
start to its exit: Python, imports, model load, Dask, reading, predicting, labelling, writing, MLflow.

What a job adds to the compute is the same for both models: the process start (Python, PyTorch, MLflow, Dask)
once per job, and per slide its label pass, NGFF metadata, rename and MLflow run, all of it CPU work that on 2
cores competes with the model. A batch pays the first once instead of 20 times; against the base-64 model's
compute both are small, against the base-16 model's (under half a second per slide) they are not.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.inference import ROOT, THREADS, peak_of_tree

TITLE = "Batch inference: one job over 20 slides vs 20 single-slide jobs"
SLIDES, SIDE, BASES = 20, 1024, (16, 64)


def make_cohort(folder: Path, count: int, side: int = SIDE) -> Path:
    """``count`` windows of ``side`` x ``side`` from the real slide, as Zarr stores in ``folder/slides`` (``side``
    other than SIDE: ``folder/slides-SIDE``)."""
    import zarr

    from unet.samples import fetch_samples
    from unet.slides import open_slide

    slide = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    rng = np.random.default_rng(0)
    cohort = folder / ("slides" if side == SIDE else f"slides-{side}")
    for index in range(count):
        y0, x0 = int(rng.integers(0, slide.height - side)), int(rng.integers(0, slide.width - side))
        zarr.create_array(cohort / f"slide{index:02d}.zarr", data=slide.read(y0, y0 + side, x0, x0 + side),
                          chunks=(3, 512, 512))  # fmt: skip
    return cohort


def pure_compute(cohort: str, model_dir: str) -> None:
    """(Run as a subprocess) every chunk of every slide through the model with the job's default settings, the
    pixels already in memory; prints the seconds of the forward passes."""
    import torch

    from unet.config import load_config
    from unet.inference import ChunkPredictor, InferenceSettings, predict_image
    from unet.intensity import intensity_ranges
    from unet.model_files import load_weights
    from unet.slides import open_slide

    torch.set_num_threads(THREADS)
    infer = load_config(ROOT / "configs" / "infer.yaml").infer
    predictor = ChunkPredictor(load_weights(model_dir), InferenceSettings.from_config(infer))
    slides = [open_slide(path) for path in sorted(Path(cohort).glob("*.zarr"))]
    images = [s.read(0, s.height, 0, s.width) for s in slides]
    ranges = [intensity_ranges(pixels) for pixels in images]
    seconds = 0.0
    for pixels, intensity_range in zip(images, ranges, strict=True):
        started = time.perf_counter()
        predict_image(predictor, pixels, intensity_range, infer.chunk)  # the job's forward passes, nothing else
        seconds += time.perf_counter() - started
    print(json.dumps({"compute_seconds": seconds}))


def infer_command(slides: str | Path, output: Path, model: Path, tracking: str) -> list[str]:
    command = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    for item in (f"infer.input={slides}", f"infer.output={output}", f"infer.model={model}",
                 f"tracking.tracking_uri={tracking}"):  # fmt: skip
        command += ["--set", item]
    return command


def run(quick: bool = False) -> dict:
    from benchmarks.models import briefly_trained
    from pipelines import registry

    count, bases = (3, (16,)) if quick else (SLIDES, BASES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp)
        cohort = make_cohort(folder, count)
        tracking = f"sqlite:///{folder / 'mlflow.db'}"
        registry.connect(tracking)  # the database exists beforehand, as a user's would
        for base in bases:
            rows += measure(folder, cohort, briefly_trained(folder, base), base, tracking)
    for row in rows:
        row["mpx_per_s"] = count * SIDE * SIDE / 1e6 / row["seconds"]
        print(f"  base {row['base']}, {row['way']}: {row['seconds']:.1f} s, {row['of_compute']:.2f}x pure compute")
    return {"title": TITLE, "slides": count, "rows": rows}


def measure(folder: Path, cohort: Path, model: Path, base: int, tracking: str) -> list[dict]:
    """The three ways for one model: pure compute, one batch job, one job per slide."""
    _, _, output = peak_of_tree([sys.executable, "-m", "benchmarks.batch", str(cohort), str(model)])
    compute = json.loads(output.strip().splitlines()[-1])["compute_seconds"]
    batch_peak, batch_wall, _ = peak_of_tree(infer_command(cohort, folder / f"batch{base}", model, tracking))
    singles = [
        peak_of_tree(infer_command(path, folder / f"single{base}" / f"{path.stem}.ome.zarr", model, tracking))
        for path in sorted(cohort.glob("*.zarr"))
    ]
    single_peak, single_wall = max(s[0] for s in singles), sum(s[1] for s in singles)
    rows = [
        {"way": "one batch job", "seconds": batch_wall, "peak_mb": batch_peak / 1e6},
        {"way": f"{len(singles)} single-slide jobs", "seconds": single_wall, "peak_mb": single_peak / 1e6},
        {"way": "pure compute (forward passes only)", "seconds": compute, "peak_mb": None},
    ]
    return [{"base": base, **row, "of_compute": row["seconds"] / compute} for row in rows]


def to_markdown(result: dict) -> str:
    lines = [
        f"{result['slides']} slides of {SIDE} x {SIDE} px ({result['slides'] * SIDE * SIDE / 1e6:.0f} Mpx in all).",
        "",
        "| model | way | wall (s) | Mpx/s | x pure compute | share computing | peak memory (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
        cells = [f"base {r['base']}", r["way"], f"{r['seconds']:.1f}", f"{r['mpx_per_s']:.2f}",
                 f"{r['of_compute']:.2f}", f"{1 / r['of_compute']:.0%}", peak]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    batches = [r for r in result["rows"] if r["way"] == "one batch job"]
    lines += ["", "Goal: one batch job within 1.2x of its pure compute: " + ", ".join(
        f"base {r['base']} {r['of_compute']:.2f}x ({'met' if r['of_compute'] <= 1.2 else 'not met'})" for r in batches
    ) + "."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    pure_compute(sys.argv[1], sys.argv[2])
