"""Start-up: how long every entry point takes to answer ``--help`` (the median of 5 runs, each a new
process), which is the time before any work starts: heavy libraries (PyTorch, Dask, MLflow, Ray) are
imported only where a job needs them."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks.inference import ROOT

TITLE = "Start-up: --help of every entry point"
ENTRY_POINTS = ("infer", "prepare", "train", "evaluate", "convert", "demo", "fetch_samples")


def run(quick: bool = False) -> dict:
    rows = []
    for name in ENTRY_POINTS[:2] if quick else ENTRY_POINTS:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", f"pipelines.{name}", "--help"], cwd=ROOT, check=True,
                           capture_output=True)  # fmt: skip
            times.append(time.perf_counter() - started)
        rows.append({"command": f"python -m pipelines.{name} --help", "seconds": statistics.median(times)})
    return {"title": TITLE, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = ["| command | median wall (s) |", "|---|---:|"]
    lines += [f"| `{r['command']}` | {r['seconds']:.2f} |" for r in result["rows"]]
    return "\n".join(lines)
