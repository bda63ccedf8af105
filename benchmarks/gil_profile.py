"""Who holds the GIL in a job's process, and for how long: py-spy samples only the thread holding it (``--gil``).

On a GPU node one process drives its GPU (``pipelines.infer.cluster``): the model thread, the chunk tasks, Dask's
event loop (scheduler, worker, client) and Zarr's all share that process's GIL, while the post-processing runs in
processes of its own. What holds the GIL cannot run on another core, so the GIL seconds per megapixel bound what one
process can drive, however many cores the node has: ``megapixels / held seconds`` Mpx/s at most.

py-spy comes with Ray (``ray[default]``); it reads the process's memory, which needs ptrace (a container may forbid
it: the benchmark then says so instead of a figure).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE_HZ = 200
# Frames of the job's start-up and finishing (imports, set-up, Dask's start and close, the batch's MLflow run, each
# slide's finishing): samples under them are left out, the figure is about segmenting.
NOT_SEGMENTING = ("_find_and_load", "set_up", "start_dask", "use_model", "start_run", "_finish_or_fail", "finish",
                  "Client.close", "SpecCluster.close", "LocalCluster.close", "_track")  # fmt: skip
# The parts of the process, by thread name (py-spy's ``--threads``), in the order the table names them.
PARTS = (
    ("chunk tasks (read, normalise, store, label, objects, pyramid)", re.compile(r"Dask-Default-Threads")),
    ("model thread", re.compile(r"unet-model")),
    ("Zarr's event loop and its threads", re.compile(r"zarr_io|asyncio_\d+")),
    ("Dask's event loop (scheduler, worker, client)", re.compile(r"IO loop|Dask-Offload")),
    ("hand-off to post-processing processes (pickling)", re.compile(r"QueueFeederThread|ExecutorManagerThread")),
    ("the job's stream of tasks", re.compile(r"MainThread")),
)
OTHER = "other threads"


def py_spy() -> str | None:
    """The py-spy executable beside this Python (a venv's bin), or on PATH; None when neither has it."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(command: list[str], raw: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` under ``py-spy record --gil`` (raw samples into ``raw``); what it printed, as
    ``subprocess.run`` returns it (py-spy's own lines go to stderr)."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (it comes with ray[default])")
    sampler = [spy, "record", "--gil", "--threads", "--rate", str(RATE_HZ), "--format", "raw", "-o", str(raw), "--"]
    return subprocess.run(sampler + command, cwd=cwd, capture_output=True, text=True)


def held_seconds(raw: Path) -> dict[str, float]:
    """GIL-held seconds while segmenting, by part of the process (``PARTS``), from py-spy's raw samples
    (``thread (id): name;frame;frame... count`` a line)."""
    seconds: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2 or any(frame.split(" (")[0] in NOT_SEGMENTING for frame in frames[1:]):
            continue  # no Python frame (the interpreter starting or ending), or not segmenting
        thread = frames[0].split(": ", 1)[-1]
        part = next((name for name, pattern in PARTS if pattern.search(thread)), OTHER)
        seconds[part] += int(count) / RATE_HZ
    return dict(seconds)
