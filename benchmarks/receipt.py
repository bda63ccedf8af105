"""What the per-slide receipt and the cohort report add to a batch: the 20-slide cohort of ``benchmarks.batch``
(windows of the real CMU slide, stored as Zarr; real tissue, made-up cohort), one ``pipelines.infer`` job with
the default ``configs/infer.yaml``, the briefly trained base-16 model (whose compute is the smallest, so the
share is the largest) and the paper's base 64.

Two ways to see it. *Counted*: after the job, the receipt's own work is timed again on its outputs, piece by
piece, with the functions the job runs: the tissue mask of every slide (``unet.tissue.slide_tissue``), the chunk
counts (``unet.receipt.chunk_counts`` on every chunk's labels and stored probability, already in memory in the
job's label task), the QC picture (``pipelines.infer.qc.qc_picture``), flags, and the report written as often as
the job wrote it (first write with the thumbnails, then rewrites), summed as if nothing ran in parallel: an upper
bound on the wall time they add. *Wall*: the same job with ``infer.report=false``, alternately, twice each; the
difference (noisy on 2 cores: both ways within a few percent).

Nearly all of it is the QC picture (a fixed cost per slide: at most 1024 px a panel, drawn and PNG-compressed), so
its share falls as slides grow: these slides are tiny for whole-slide images (1 and 4 Mpx, where a scanned slide has
hundreds to thousands), and the small base-16 model computes one in well under a second, the worst case.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.batch import infer_command, make_cohort
from benchmarks.inference import peak_of_tree

TITLE = "Receipt and report: what they add to a 20-slide batch"
SLIDES = 20
# (slide side, model base, repeats of the with / without report pair; 0: with only)
PLAN = [(1024, 16, 2), (1024, 64, 1), (2048, 64, 0)]


def counted_seconds(output_folder: Path, slides: Path, chunk: int, job_seconds: float) -> dict[str, float]:
    """The receipt's and report's work on a finished batch's outputs, timed piece by piece (module docstring)."""
    from pipelines.infer.batch import REPORT_EVERY_S, Report
    from pipelines.infer.cohort import expand
    from unet.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "infer.yaml",
                         [f"infer.input={slides}", f"infer.output={output_folder}"])  # fmt: skip
    cohort = expand(str(slides), str(output_folder), None)
    parts = dict.fromkeys(("tissue mask", "chunk counts", "QC picture", "flags", "report"), 0.0)
    slide_receipt(cohort.items[0], chunk, dict(parts))  # untimed: imports and caches warmed up, as in the job
    jobs = [slide_receipt(item, chunk, parts) for item in cohort.items]
    report = Report(config, cohort, jobs)
    writes = min(len(jobs), 1 + int(job_seconds / REPORT_EVERY_S))  # as often as the job could rewrite it
    started = time.perf_counter()
    for index in range(writes):
        report.write(final=index == writes - 1)
    parts["report"] = time.perf_counter() - started
    return parts


def slide_receipt(item, chunk: int, parts: dict[str, float]):
    """One slide's receipt made again from its output, each part's seconds added to ``parts``; its ``SlideJob``."""
    import zarr

    from pipelines.infer.output import labels_level, probability_level
    from pipelines.infer.qc import qc_picture
    from pipelines.infer.report import thumbnail
    from pipelines.infer.slide import SlideJob, SlideStats
    from unet.io import write_png
    from unet.pyramid import level_shapes
    from unet.receipt import absolute_flags, chunk_counts, slide_measures
    from unet.slides import open_slide
    from unet.tiling import grid
    from unet.tissue import slide_tissue

    slide, root = open_slide(item.input), zarr.open_group(item.output, mode="r")
    started = time.perf_counter()
    tissue = slide_tissue(item.input, slide, chunk)
    parts["tissue mask"] += time.perf_counter() - started
    labels, stored = np.asarray(root[labels_level(0)]), np.asarray(root[probability_level(0)])[0]
    counts = []
    for _, region in grid(slide.height, slide.width, chunk):
        started = time.perf_counter()
        counts.append(chunk_counts(labels[region.slices], stored[region.slices], tissue.chunk(region).pixels()))
        parts["chunk counts"] += time.perf_counter() - started
    started = time.perf_counter()
    picture = qc_picture(item.input, item.output, tuple(level_shapes(slide.height, slide.width, chunk)), chunk, 1.0)
    write_png(Path(item.output) / "qc-again.png", picture)
    small = thumbnail(picture)
    parts["QC picture"] += time.perf_counter() - started
    started = time.perf_counter()
    measures = slide_measures(counts, int(labels.max()), slide.pixel_size_um)
    stats = SlideStats(receipt=measures, flags=absolute_flags(measures, int(labels.max()), None))
    parts["flags"] += time.perf_counter() - started
    return SlideJob(item, state="done", stats=stats, thumbnail=small)


def run(quick: bool = False) -> dict:
    from benchmarks.models import briefly_trained
    from pipelines import registry
    from unet.config import load_config

    plan = [(1024, 16, 0)] if quick else PLAN  # quick: the batch with its report only
    count = 3 if quick else SLIDES
    chunk = load_config(Path(__file__).parents[1] / "configs" / "infer.yaml").infer.chunk
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-receipt-") as tmp:
        folder = Path(tmp)
        tracking = f"sqlite:///{folder / 'mlflow.db'}"
        registry.connect(tracking)
        cohorts: dict[int, Path] = {}
        for side, base, repeats in plan:
            cohort = cohorts[side] = cohorts.get(side) or make_cohort(folder, count, side)
            model = briefly_trained(folder, base)
            walls: dict[str, list[float]] = {"with": [], "without": []}
            for repeat in range(max(1, repeats)):
                ways = [("without", ["--set", "infer.report=false"])] if repeats else []
                for way, extra in [*ways, ("with", [])]:
                    output = folder / f"out{side}-{base}-{way}-{repeat}"
                    walls[way].append(peak_of_tree(infer_command(cohort, output, model, tracking) + extra)[1])
            wall = min(walls["with"])
            parts = counted_seconds(folder / f"out{side}-{base}-with-0", cohort, chunk, wall)
            without = min(walls["without"]) if walls["without"] else None
            rows.append({"side": side, "base": base, "with": wall, "without": without, "parts": parts})
            print(f"  {side} px, base {base}: {wall:.1f} s, counted {sum(parts.values()):.2f} s", flush=True)
    return {"title": TITLE, "slides": count, "rows": rows}


def to_markdown(result: dict) -> str:
    names = list(result["rows"][0]["parts"])
    lines = [
        f"{result['slides']} slides each; seconds; the parts are CPU seconds, summed as if none ran in parallel.",
        "",
        "| slides | model | batch wall (s) | " + " | ".join(names) + " | counted in all | share of wall | wall "
        "without report (s) |",
        "|---|---|---:|" + "---:|" * len(names) + "---:|---:|---:|",
    ]
    for r in result["rows"]:
        counted = sum(r["parts"].values())
        without = f"{r['without']:.1f}" if r["without"] else "-"
        parts = [f"{r['parts'][n]:.2f}" for n in names]
        cells = [f"{r['side']} x {r['side']}", f"base {r['base']}", f"{r['with']:.1f}", *parts, f"{counted:.2f}",
                 f"{counted / r['with']:.1%}", without]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    goals = []
    for r in result["rows"]:
        share = sum(r["parts"].values()) / r["with"]
        goals.append(f"{r['side']} px base {r['base']} {share:.1%} ({'met' if share < 0.03 else 'not met'})")
    lines += ["", "Goal: receipt and report under 3% of the batch's wall time: " + ", ".join(goals) + "."]
    return "\n".join(lines)
