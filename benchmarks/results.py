"""What the results people open cost: the pyramid levels and the objects table written by ``pipelines.infer``
(``infer.pyramid``, ``infer.objects``: both on by default), and the outlines exported for QuPath by
``pipelines.export``, each as a fraction of the inference time.

Each slide is segmented with both off and with both on (the default), alternately, twice each; the table
gives the shorter wall time of each (one process from start to exit, as ``benchmarks.inference`` times it)
and the difference as a fraction of the time without them. The export is one ``python -m pipelines.export
OUT --format qupath`` process, timed the same way. Slides: the real CMU slide (6.6 Mpx) and the 19.7 Mpx
slide made by mirroring it (real tissue, made-up layout); the model is the briefly trained one of
``benchmarks/models.py`` (base 16 and the paper's base 64), default ``configs/infer.yaml``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.inference import make_inputs, measure

TITLE = "Results people open: pyramid, objects table and QuPath export, as a fraction of inference"
PLAN = [("real 2220x2967", 16), ("mirrored 3840x5120", 16), ("mirrored 3840x5120", 64)]
QUICK_PLAN = [("real 2220x2967", 16)]
OFF = ("infer.pyramid=false", "infer.objects=false")
REPEATS = 2


def export_seconds(output: Path) -> tuple[float, int]:
    """Wall time of one QuPath export process, and the number of objects it wrote."""
    import json

    target = output.with_suffix(".geojson")
    command = [sys.executable, "-m", "pipelines.export", str(output), "--format", "qupath", "--output", str(target)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    return seconds, len(json.loads(target.read_text())["features"])


def run(quick: bool = False) -> dict:
    plan = QUICK_PLAN if quick else PLAN
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        slides, models, tracking = make_inputs(Path(tmp), [(name, base, ()) for name, base in plan])
        for name, base in plan:
            seconds: dict[str, list[float]] = {"off": [], "on": []}
            for repeat in range(1 if quick else REPEATS):
                for kind, overrides in (("off", OFF), ("on", ())):
                    out = Path(tmp) / f"{base}-{kind}-{repeat}-{len(rows)}.ome.zarr"
                    row = measure("ours", slides[name], models[base], tracking, out, *overrides)
                    seconds[kind].append(row["seconds"])
            export, objects = export_seconds(out)  # the last output made with both on
            off, on = min(seconds["off"]), min(seconds["on"])
            rows.append({"slide": name, "base": base, "mpx": row["mpx"], "off": off, "on": on,
                         "export": export, "objects": objects})  # fmt: skip
            print(f"  {name} base {base}: off {off:.1f} s, on {on:.1f} s, export {export:.1f} s", flush=True)
    return {"title": TITLE, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        "| slide | base | Mpx | objects | inference without (s) | with pyramid + objects table (s) | extra "
        "| QuPath export (s) | export / inference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        extra = (r["on"] - r["off"]) / r["off"]
        lines.append(
            f"| {r['slide']} | {r['base']} | {r['mpx']:.1f} | {r['objects']} | {r['off']:.1f} | {r['on']:.1f} "
            f"| {extra:+.0%} | {r['export']:.1f} | {r['export'] / r['on']:.0%} |"
        )
    return "\n".join(lines)
