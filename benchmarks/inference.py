"""Slide inference end to end: ``pipelines.infer`` against (a) one whole-image forward pass and (b) MONAI's
``sliding_window_inference`` (roi 512, overlap 0.25, Gaussian, sw_batch_size 4), in memory.

Every method is one process, timed from its start to its exit as a user would see it: Python start-up,
imports, loading the model, reading the slide, predicting; ours also writes the OME-Zarr output
(probability and seam-merged instance labels) and its MLflow run, with the default
``configs/infer.yaml`` and only the paths set. All use the same model file (briefly trained on the
real H&E nuclei so that it finds nuclei-like objects, ``benchmarks/models.py``), bf16 autocast,
channels_last and the machine's cores as torch threads. The tracking database exists beforehand, as
a user's would. "Start-up" and "after start-up" are the job's own report: set-up (model, input,
output, Dask) and segmentation throughput.

Slides: the real CMU slide (2220 x 2967, 6.6 Mpx), and slides made from it by mirroring it about its
borders (real tissue, made-up layout): 3840 x 5120 (19.7 Mpx) and 10240 x 10240 (105 Mpx). The
whole-image forward is run where it fits in this machine's memory (24 GB; at 105 Mpx it would need
about 28 GB for base 16 and 90 GB for base 64). Peak memory is the peak resident memory of all
processes of a run, sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

TITLE = "Slide inference: pipelines.infer vs whole-image forward vs MONAI sliding window"
ROOT = Path(__file__).resolve().parents[1]
THREADS = os.cpu_count() or 1
LABELS = {
    "ours": "pipelines.infer (ours), end to end",
    "whole": "(a) one whole-image forward",
    "monai": "(b) MONAI sliding window",
}
# (slide, model base width, methods); the whole-image forward only where it fits in this machine's memory
PLAN = [
    ("real 2220x2967", 16, ("ours", "whole", "monai")),
    ("real 2220x2967", 64, ("ours", "whole", "monai")),
    ("mirrored 3840x5120", 16, ("ours", "whole", "monai")),
    ("mirrored 3840x5120", 64, ("ours", "whole", "monai")),  # the whole-image forward peaks near 18 GB here
    ("mirrored 10240x10240", 16, ("ours", "monai")),
    ("mirrored 10240x10240", 64, ("ours", "monai")),
]
QUICK_PLAN = [("real 2220x2967", 16, ("ours", "whole", "monai"))]


def peak_of_tree(command: list[str], interval: float = 0.1) -> tuple[int, float, str]:
    """Run ``command``; return (peak summed RSS of it and its descendants, wall seconds, its output)."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a pipe nobody reads fills up and blocks
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):  # a process that just ended
                peak = max(peak, sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]))
            time.sleep(interval)
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    return peak, seconds, output


def in_memory(kind: str, slide: str, model_dir: str, device: str = "cpu") -> None:
    """(Run as a subprocess) the whole slide through the model at once, or through MONAI's sliding window (its
    windows on ``device``, the slide and the blended result in host memory); prints Mpx and compute seconds."""
    import torch
    from monai.inferers import sliding_window_inference

    from unet.model import autocast_context
    from unet.model_files import load_weights
    from unet.slides import open_slide

    torch.set_num_threads(THREADS)
    model = load_weights(model_dir).eval().to(device, memory_format=torch.channels_last)
    s = open_slide(slide)
    image = torch.from_numpy(s.read(0, s.height, 0, s.width).astype(np.float32) / 255)[None]
    m = model.size_multiple
    started = time.perf_counter()
    with torch.inference_mode(), autocast_context(torch.device(device).type, "bf16"):
        if kind == "whole":
            padded = torch.nn.functional.pad(image, (0, (-s.width) % m, 0, (-s.height) % m), mode="reflect")
            out = model(padded.to(device).contiguous(memory_format=torch.channels_last))[..., : s.height, : s.width]
        else:
            out = sliding_window_inference(image, roi_size=(512, 512), sw_batch_size=4 if device == "cpu" else 16,
                                           predictor=model, overlap=0.25, mode="gaussian", sw_device=device,
                                           device="cpu")  # fmt: skip
        out.float().softmax(1).cpu()
    print(json.dumps({"mpx": s.height * s.width / 1e6, "compute_seconds": time.perf_counter() - started}))


def mirrored(real: np.ndarray, height: int, width: int, path: Path, block: int = 4096) -> Path:
    """A (3, height, width) Zarr slide made of ``real`` mirrored about its borders, written block by block."""
    import zarr

    from unet.tiling import reflect_indices

    array = zarr.create_array(path, shape=(3, height, width), chunks=(3, 512, 512), dtype=real.dtype)
    for y0 in range(0, height, block):
        rows = reflect_indices(y0, min(y0 + block, height), real.shape[1])
        for x0 in range(0, width, block):
            cols = reflect_indices(x0, min(x0 + block, width), real.shape[2])
            array[:, y0 : y0 + len(rows), x0 : x0 + len(cols)] = real[:, rows][:, :, cols]
    return path


def make_inputs(folder: Path, plan: list) -> tuple[dict[str, Path], dict[int, Path], str]:
    """The slides and models of ``plan``, and a tracking database that already exists."""
    from benchmarks.models import briefly_trained
    from pipelines import registry
    from pipelines.convert import convert
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    svs = fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs"
    real_slide = open_slide(svs)
    real = real_slide.read(0, real_slide.height, 0, real_slide.width)
    slides: dict[str, Path] = {}
    for name, _, _ in plan:
        if name in slides:
            continue
        if name.startswith("real"):
            slides[name] = Path(convert(svs, folder / "cmu.ome.zarr", chunk=512))
        else:
            height, width = (int(v) for v in name.split()[-1].split("x"))
            slides[name] = mirrored(real, height, width, folder / f"{height}x{width}.zarr")
    models = {base: briefly_trained(folder, base) for base in sorted({base for _, base, _ in plan})}
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    registry.connect(tracking)  # creates the database's tables
    return slides, models, tracking


def measure(method: str, slide: Path, model: Path, tracking: str, out: Path, *overrides: str) -> dict:
    """One process of ``method`` ("ours", "whole", "monai"): wall time, peak memory, Mpx/s (and the job's report)."""
    if method == "ours":
        command = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
        for item in (f"infer.input={slide}", f"infer.output={out}", f"infer.model={model}",
                     f"tracking.tracking_uri={tracking}", *overrides):  # fmt: skip
            command += ["--set", item]
    else:
        command = [sys.executable, "-m", "benchmarks.inference", method, str(slide), str(model)]
    peak, seconds, output = peak_of_tree(command)
    row = {"method": method, "seconds": seconds, "peak_mb": peak / 1e6}
    if method == "ours":
        import zarr

        from pipelines.infer.output import LINEAGE_KEY

        stats = zarr.open_group(out, mode="r").attrs[LINEAGE_KEY]["stats"]
        row |= {"mpx": stats["megapixels"], "startup": stats["startup_seconds"], "throughput": stats["mpx_per_s"]}
    else:
        row["mpx"] = json.loads(output.strip().splitlines()[-1])["mpx"]
    row["mpx_per_s"] = row["mpx"] / seconds
    return row


def run(quick: bool = False) -> dict:
    plan = QUICK_PLAN if quick else PLAN
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        slides, models, tracking = make_inputs(Path(tmp), plan)
        for name, base, methods in plan:
            for method in methods:
                out = Path(tmp) / f"out-{len(rows)}.ome.zarr"
                row = measure(method, slides[name], models[base], tracking, out)
                rows.append({"slide": name, "base": base, **row})
                print(f"  {name} base {base} {method}: {row['seconds']:.1f} s, {row['mpx_per_s']:.2f} Mpx/s, "
                      f"{row['peak_mb']:.0f} MB", flush=True)  # fmt: skip
    return {"title": TITLE, "rows": rows}


def _ratio(rows: list[dict], row: dict, method: str) -> str:
    other = next((r for r in rows if r["slide"] == row["slide"] and r["base"] == row["base"] and
                  r["method"] == method), None)  # fmt: skip
    return "" if other is None else f"{row['mpx_per_s'] / other['mpx_per_s']:.2f}x"


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| slide | base | method | Mpx | wall (s) | Mpx/s end to end | ours vs MONAI | ours vs whole "
        "| start-up (s) | Mpx/s after start-up | peak memory (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours = r["method"] == "ours"
        vs_monai, vs_whole = (_ratio(rows, r, "monai"), _ratio(rows, r, "whole")) if ours else ("", "")
        startup, after = (f"{r['startup']:.1f}", f"{r['throughput']:.2f}") if ours else ("", "")
        lines.append(
            f"| {r['slide']} | {r['base']} | {LABELS[r['method']]} | {r['mpx']:.1f} | {r['seconds']:.1f} "
            f"| {r['mpx_per_s']:.2f} | {vs_monai} | {vs_whole} | {startup} | {after} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one in-memory measurement (used by run())")
    parser.add_argument("kind", choices=["whole", "monai"])
    parser.add_argument("slide")
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    in_memory(arguments.kind, arguments.slide, arguments.model_dir, arguments.device)
