"""How the default chunk size was chosen: ``pipelines.infer`` on the 3840 x 5120 slide made from real
tissue (the real CMU slide mirrored), for several ``infer.chunk_size`` values, each chunk in one forward
pass (``infer.pass_memory_mb=0`` so that no chunk is split). Larger chunks waste less on the 96-px halo
(a 1024-px chunk computes 1.41x its pixels, 2048: 1.20x) but run slower per pixel once a pass no longer
fits the CPU's caches; the job's own segmentation throughput (after start-up) and the peak memory of
the process are reported. Same model files, bf16, channels_last, all cores, as in the inference table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.inference import make_inputs, measure

TITLE = "Choosing the chunk size (CPU)"
SLIDE = "mirrored 3840x5120"
SIZES = (512, 768, 1024, 1536, 2048)
BASES = (16, 64)


def run(quick: bool = False) -> dict:
    sizes, bases = ((512, 1024), (16,)) if quick else (SIZES, BASES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-chunk-") as tmp:
        slides, models, tracking = make_inputs(Path(tmp), [(SLIDE, base, ()) for base in bases])
        for base in bases:
            for size in sizes:
                out = Path(tmp) / f"out-{base}-{size}.ome.zarr"
                row = measure("ours", slides[SLIDE], models[base], tracking, out, f"infer.chunk_size={size}",
                              "infer.pass_memory_mb=0")  # fmt: skip
                rows.append({"base": base, "chunk": size, **row})
                print(f"  base {base} chunk {size}: {row['throughput']:.2f} Mpx/s, {row['peak_mb']:.0f} MB", flush=True)
    return {"title": TITLE, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        "| base | chunk | pass input (px) | computed / kept | Mpx/s after start-up | wall (s) | peak memory (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        side = r["chunk"] + 2 * 96
        best = max(x["throughput"] for x in result["rows"] if x["base"] == r["base"])
        mark = " **(best)**" if r["throughput"] == best else ""
        lines.append(
            f"| {r['base']} | {r['chunk']} | {side} x {side} | {side**2 / r['chunk'] ** 2:.2f}x "
            f"| {r['throughput']:.2f}{mark} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)
