"""Inference throughput and peak memory: the Dask overlap-tile pipeline against (a) one whole-image
forward pass and (b) MONAI's ``sliding_window_inference`` (overlap 0.25, Gaussian) in memory.

All three use the same model (U-Net, base width 16, depth 4, untrained weights: speed does not
depend on them), bf16 autocast, channels_last and the machine's cores (the pipeline: 2 Dask
worker processes x 1 torch thread each on 2 cores; the others: 2 torch threads). Useful output
Mpx/s counts slide pixels, end to end: the pipeline's figure includes starting its Dask cluster
and writing OME-Zarr. Peak memory is the peak resident memory of all processes of a run.

Slides: the real CMU slide (2967 x 2220) and, to show that memory does not grow with slide size,
a made-up slide 4x as large in each direction (the real one mirrored 4 x 4, 105 Mpx).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

TITLE = "Inference: Dask overlap-tile pipeline vs whole-image forward vs MONAI sliding window"
ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


def _peak_of_tree(proc: subprocess.Popen, interval: float = 0.1) -> tuple[int, float]:
    """Wait for ``proc``; return (peak summed RSS of it and its descendants, seconds)."""
    parent, peak, started = psutil.Process(proc.pid), 0, time.perf_counter()
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(interval)
    return peak, time.perf_counter() - started


def _in_memory(kind: str, slide: str, model_dir: str) -> dict:
    """Run in a subprocess: whole-image forward or MONAI sliding window over the whole slide."""
    import torch
    from monai.inferers import sliding_window_inference

    from unet.model import autocast_context
    from unet.slide import open_slide
    from unet.training import load_weights

    torch.set_num_threads(THREADS)
    model = load_weights(model_dir).to(memory_format=torch.channels_last)
    started = time.perf_counter()
    s = open_slide(slide)
    image = torch.from_numpy(s.read(0, s.height, 0, s.width).astype(np.float32) / 255)[None]
    m = model.size_multiple
    with torch.inference_mode(), autocast_context("cpu", "bf16"):
        if kind == "whole":
            padded = torch.nn.functional.pad(image, (0, (-s.width) % m, 0, (-s.height) % m), mode="reflect")
            out = model(padded.contiguous(memory_format=torch.channels_last))[..., : s.height, : s.width]
        else:
            out = sliding_window_inference(image, roi_size=(512, 512), sw_batch_size=4, predictor=model,
                                           overlap=0.25, mode="gaussian")  # fmt: skip
        out.float().softmax(1)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "mpx": s.height * s.width / 1e6}


def _make_inputs(folder: Path) -> tuple[dict[str, Path], Path]:
    import torch
    import zarr

    from pipelines.convert import convert
    from unet.model import UNet
    from unet.samples import fetch_samples
    from unet.slide import open_slide
    from unet.training import save_weights

    torch.manual_seed(0)
    model_dir = save_weights(UNet(3, 2, base_channels=16).eval(), folder / "model")
    svs = fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs"
    small = convert(svs, folder / "cmu.ome.zarr", chunk=512)
    real = open_slide(svs).read(0, open_slide(svs).height, 0, open_slide(svs).width)
    row = np.concatenate([real, real[:, :, ::-1]] * 2, axis=2)
    big = np.concatenate([row, row[:, ::-1]] * 2, axis=1)
    zarr.create_array(folder / "big.zarr", data=big, chunks=(3, 512, 512))
    return {"real 2967x2220": small, "made-up 11868x8880": folder / "big.zarr"}, model_dir


def run(quick: bool = False) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        slides, model_dir = _make_inputs(Path(tmp))
        if quick:
            slides = {k: v for k, v in slides.items() if k.startswith("real")}
        for name, slide in slides.items():
            for method in ("pipeline", "whole", "monai") if name.startswith("real") else ("pipeline",):
                if method == "pipeline":
                    cmd = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs/infer.yaml")]
                    items = [f"infer.input={slide}", f"infer.output={tmp}/out-{len(rows)}.ome.zarr"]
                    items += [f"infer.model={model_dir}", "infer.chunk_size=1024", "infer.tile_size=512"]
                    items += [f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", f"infer.workers={THREADS}"]
                    cmd += [arg for item in items for arg in ("--set", item)]
                else:
                    cmd = [sys.executable, "-m", "benchmarks.inference", method, str(slide), str(model_dir)]
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                peak, seconds = _peak_of_tree(proc)
                output = proc.stdout.read()
                if proc.returncode != 0:
                    raise RuntimeError(f"{method} on {name} failed: {output[-2000:]}")
                mpx = json.loads(output.strip().splitlines()[-1])["mpx"] if method != "pipeline" else None
                if mpx is None:
                    from unet.slide import open_slide

                    s = open_slide(slide)
                    mpx = s.height * s.width / 1e6
                rows.append({"slide": name, "method": method, "mpx": mpx, "seconds": seconds,
                             "mpx_per_s": mpx / seconds, "peak_mb": peak / 1e6})  # fmt: skip
    return {"title": TITLE, "rows": rows}


LABELS = {
    "pipeline": "Dask pipeline (ours), end to end",
    "whole": "(a) whole-image forward",
    "monai": "(b) MONAI sliding window, overlap 0.25, gaussian",
}


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    ours = next(r for r in rows if r["method"] == "pipeline")
    lines = [
        "| slide | method | Mpx | wall (s) | useful Mpx/s | vs ours | peak memory (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["mpx_per_s"] / ours["mpx_per_s"] if r["slide"] == ours["slide"] else float("nan")
        lines.append(
            f"| {r['slide']} | {LABELS[r['method']]} | {r['mpx']:.1f} | {r['seconds']:.1f} | {r['mpx_per_s']:.2f} "
            f"| {'n/a' if np.isnan(ratio) else f'{ratio:.2f}x'} | {r['peak_mb']:.0f} |"
        )
    pipelines = [r for r in rows if r["method"] == "pipeline"]
    if len(pipelines) == 2:
        a, b = pipelines
        lines.append("")
        lines.append(
            f"Pipeline peak memory: {a['peak_mb']:.0f} MB for {a['mpx']:.0f} Mpx and {b['peak_mb']:.0f} MB for "
            f"{b['mpx']:.0f} Mpx ({b['mpx'] / a['mpx']:.0f}x the pixels, "
            f"{b['peak_mb'] / a['peak_mb']:.2f}x the memory)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one in-memory measurement (used by run())")
    parser.add_argument("kind", choices=["whole", "monai"])
    parser.add_argument("slide")
    parser.add_argument("model_dir")
    arguments = parser.parse_args()
    print(json.dumps(_in_memory(arguments.kind, arguments.slide, arguments.model_dir)))
