"""Resampling to the model's pixel size, as a fraction of inference (CPU).

One slide, segmented by one model that says it was trained at different pixel sizes, so the slide is read as
stored or resampled per chunk (``unet.resample``): up-sampled 2x and 1.4x, down-sampled 2x. For each, the
inference is one ``pipelines.infer`` process timed from start to exit (default ``configs/infer.yaml``, as
``benchmarks.inference`` times it), and the resampling alone is timed in this process, one thread: every chunk
of the output read as inference reads it (``Resampled.read``: the chunk with its halo for the model, the chunk
again for the objects' mean intensities), from a slide already in memory, so it counts the filter and not the
reading. "Share" is that time over the inference's wall time: about what resampling adds to a job here, where
it runs in the task threads, which share the 2 cores with the model.

The slide is the 19.7 Mpx slide made by mirroring the real CMU slide about its borders (3840 x 5120, real tissue,
made-up layout; 0.499 um/px, given with ``infer.pixel_size_um`` as a plain Zarr array has no metadata); the
model is the briefly trained one of ``benchmarks/models.py`` (base 16).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.inference import make_inputs, measure

TITLE = "Resampling to the model's pixel size, as a fraction of inference (CPU)"
SLIDE_UM = 0.499
# the model's pixel size: as stored, up-sampled 2x and 1.4x, down-sampled 2x
PLAN = [("mirrored 3840x5120", (0.499, 0.25, 0.35, 1.0))]
QUICK_PLAN = [("real 2220x2967", (0.499, 0.35))]


def resampling_seconds(slide_path: Path, scale: float, chunk: int, halo: int, multiple: int) -> tuple[float, int]:
    """Seconds to resample every chunk's input window (chunk and halo, mirrored at the border) and the chunk again
    at ``scale``, one thread, from memory; and the pixels resampled."""
    from unet.resample import Resampled
    from unet.slides import open_slide
    from unet.tiling import grid, input_region, read_mirrored

    slide = open_slide(slide_path)
    pixels = slide.read(0, slide.height, 0, slide.width)

    class InMemory:  # the slide's pixels, read from memory: the benchmark times the filter, not the disk
        height, width, channels, dtype, path, level, levels = slide.height, slide.width, 3, pixels.dtype, "", 0, 1
        pixel_size_um = None

        @staticmethod
        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            return pixels[:, y0:y1, x0:x1]

    view = Resampled(InMemory, scale)
    started, resampled = time.perf_counter(), 0
    for _, region in grid(view.height, view.width, chunk):
        window = read_mirrored(view.read, view.height, view.width, input_region(region, halo, multiple))
        view.read(region.y0, region.y1, region.x0, region.x1)
        resampled += window.shape[1] * window.shape[2] + region.height * region.width
    return time.perf_counter() - started, resampled


def run(quick: bool = False) -> dict:
    from benchmarks.models import with_resolution
    from unet.config import load_config
    from unet.model_files import load_weights

    plan = QUICK_PLAN if quick else PLAN
    chunk = load_config(None, []).infer.chunk
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-resolution-") as tmp:
        slides, models, tracking = make_inputs(Path(tmp), [(name, 16, ()) for name, _ in plan])
        model = load_weights(models[16])
        for name, sizes in plan:
            for size in sizes:
                out = Path(tmp) / f"out-{size}-{len(rows)}.ome.zarr"
                model_dir = with_resolution(models[16], Path(tmp), size)
                row = measure("ours", slides[name], model_dir, tracking, out, f"infer.pixel_size_um={SLIDE_UM}")
                scale = 1.0 if size == SLIDE_UM else size / SLIDE_UM
                alone, pixels = (
                    resampling_seconds(slides[name], scale, chunk, model.halo, model.size_multiple)
                    if scale != 1
                    else (0.0, 0)
                )
                rows.append({"slide": name, "model_um": size, "scale": scale, "output_mpx": row["mpx"],
                             "seconds": row["seconds"], "resampling": alone,
                             "resampled_mpx": pixels / 1e6})  # fmt: skip
                print(f"  {name} at {size} um/px: {row['seconds']:.1f} s, resampling alone {alone:.1f} s", flush=True)
    return {"title": TITLE, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        "| slide | model's pixel size (um) | source pixels per output pixel | output Mpx | inference (s) "
        "| resampling alone, 1 thread (s) | share of inference | Mpx resampled (chunks, halos, again for objects) "
        "| resampling Mpx/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        speed = f"{r['resampled_mpx'] / r['resampling']:.1f}" if r["resampling"] else ""
        lines.append(
            f"| {r['slide']} | {r['model_um']:g} | {r['scale']:.2f} | {r['output_mpx']:.1f} | {r['seconds']:.1f} "
            f"| {r['resampling']:.1f} | {r['resampling'] / r['seconds']:.0%} | {r['resampled_mpx']:.1f} | {speed} |"
        )
    return "\n".join(lines)
