"""Peak memory against slide size: ``pipelines.infer`` with the default config (base-16 model; infer.precision
auto, i.e. bf16 on a CPU with bf16 instructions, fp32 on one without; up to infer.read_cache_mb = 256 MB of
decoded input kept per worker) on slides made from real tissue (the real CMU slide mirrored about its borders)
of 105 Mpx and 1.07 Gpx (32768 x 32768). Peak memory is the peak resident memory of all processes of the job,
sampled every 0.1 s; it should not grow with the slide, since chunks are read, predicted and written one at a
time."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.inference import make_inputs, measure

TITLE = "Peak memory against slide size"
SLIDES = ("mirrored 10240x10240", "mirrored 32768x32768")


def run(quick: bool = False) -> dict:
    slides = ("real 2220x2967", "mirrored 3840x5120") if quick else SLIDES
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        inputs, models, tracking = make_inputs(Path(tmp), [(name, 16, ()) for name in slides])
        for name in slides:
            row = measure("ours", inputs[name], models[16], tracking, Path(tmp) / f"{len(rows)}.ome.zarr")
            rows.append({"slide": name, **row})
            print(f"  {name}: {row['seconds']:.1f} s, {row['peak_mb']:.0f} MB", flush=True)
    return {"title": TITLE, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = ["| slide | Mpx | wall (s) | Mpx/s end to end | peak memory (MB) |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['slide']} | {r['mpx']:.0f} | {r['seconds']:.0f} | {r['mpx_per_s']:.2f} | {r['peak_mb']:.0f} |"
        )
    small, large = result["rows"][0], result["rows"][-1]
    lines += [
        "",
        f"{large['mpx'] / small['mpx']:.0f}x the pixels, {large['peak_mb'] / small['peak_mb']:.2f}x the memory.",
    ]
    return "\n".join(lines)
