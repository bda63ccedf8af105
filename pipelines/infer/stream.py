"""The chunks of every slide of a job as one bounded stream of Dask tasks.

Predictions are submitted slide after slide, never more than ``window`` tasks in flight, so a cohort of
thousands of slides never becomes one giant graph and workers never idle between slides. Each slide then
goes through its further passes, each started when the one before is complete and ahead of further
predictions: as soon as all its chunks are predicted, its seams are merged here and its label tasks run
(each also measuring its objects); then each pyramid level is computed from the one above. When the last
pass is done the slide is handed to ``on_done`` (objects table, receipt, metadata, MLflow, rename) with what its
tasks measured (``Segmented``). A task that fails fails its slide only: its other tasks are cancelled and the
stream goes on.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.infer.slide import FAILED, Segmented, SlideJob
from unet.errors import first_line

if TYPE_CHECKING:
    from distributed import Client, Future

    from unet.instances import ChunkEdges

LATER_PRIORITY = 1  # a slide's label and pyramid tasks run before further predictions, so it finishes early
PREDICT, LABEL = 0, 1  # Passes.stage; stage 1 + k computes pyramid level k


@dataclass
class Passes:
    """One slide's progress through the stream: the pass under way and what its tasks returned so far."""

    job: SlideJob
    stage: int = PREDICT  # 0 predict, 1 label, 2... pyramid level 1...
    left: int = 0  # tasks of this pass not yet done
    units: int = 0  # tasks done, of all passes
    edges: dict[tuple[int, int], ChunkEdges] = field(default_factory=dict)  # of predicted chunks, by key
    objects: int = 0  # once its seams are merged
    parts: dict[tuple[int, int], dict] = field(default_factory=dict)  # the objects' partial sums, by chunk
    counts: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)  # receipt counts, by chunk
    compute_seconds: float = 0.0  # its tasks' time in workers
    gpu_seconds: float = 0.0  # its predictions' time, where they ran on a GPU
    devices: set[str] = field(default_factory=set)  # what predicted its chunks


@dataclass(frozen=True)
class Task:
    """One Dask task of a slide's pass: ``function(*args)`` on the chunk ``key``."""

    passes: Passes
    key: tuple[int, int]
    function: Callable
    args: tuple
    priority: int = LATER_PRIORITY
    resources: dict | None = None
    device: str | None = None  # a prediction's: its time counts as GPU time on cuda, its device is named
    precision: str | None = None  # a prediction's infer.precision: named with its device as it was computed


def stream(
    client: Client,
    jobs: list[SlideJob],
    window: int,
    resources: dict | None,
    on_done: Callable[[SlideJob, Segmented], None],
    on_failed: Callable[[SlideJob, BaseException], None],
) -> None:
    """Predict and label every chunk of ``jobs`` (predictions ask for ``resources``); call ``on_done(job,
    segmented)`` when a slide is segmented, ``on_failed(job, error)`` when one of its tasks failed."""
    ChunkStream(client, jobs, window, resources, on_done, on_failed).run()


class ChunkStream:
    """The state of ``stream``: what is in flight, what is ready to go, each slide's passes, the progress bar."""

    def __init__(self, client, jobs, window, resources, on_done, on_failed) -> None:
        from distributed import as_completed

        self.client, self.jobs, self.window = client, jobs, window
        self.on_done, self.on_failed = on_done, on_failed
        self.passes = [Passes(job, left=len(job.keys)) for job in jobs]
        self.predictions: Iterator[Task] = (task for passes in self.passes for task in _predictions(passes, resources))
        self.ready: deque[Task] = deque()  # label and pyramid tasks, submitted before further predictions
        self.owners: dict[str, tuple[Task, Future]] = {}  # in flight, by future key
        self.segmented = self.failed = 0
        self.completed = as_completed(loop=client.loop)  # the job's client is not the default (cluster.py)
        self.bar = None

    def run(self) -> None:
        from tqdm import tqdm

        interval = 0.1 if sys.stderr.isatty() else 30  # a log file gets a line every 30 s, not every chunk
        units = sum(_units(job) for job in self.jobs)
        with tqdm(total=units, desc="segment", unit="chunk", mininterval=interval) as self.bar:
            self._submit_more()
            for future in self.completed:
                owner = self.owners.pop(future.key, None)
                if owner is not None:  # None: cancelled with its slide
                    self._handle(future, owner[0])
                    self.bar.update()
                    self.bar.set_postfix_str(self._slides(), refresh=False)
                self._submit_more()

    def _submit_more(self) -> None:
        from pipelines.infer.tasks import timed

        while len(self.owners) < self.window:
            task = self.ready.popleft() if self.ready else next(self.predictions, None)
            if task is None:
                return
            job = task.passes.job
            if job.state == FAILED:
                continue
            job.started = job.started or time.perf_counter()
            future = self.client.submit(timed, task.function, task.device, task.precision, *task.args, pure=False,
                                        resources=task.resources, priority=task.priority)  # fmt: skip
            self.owners[future.key] = (task, future)
            self.completed.add(future)

    def _handle(self, future: Future, task: Task) -> None:
        """One finished task; the last of a pass queues the slide's next pass, or hands the slide on."""
        passes = task.passes
        try:
            result, seconds, device = future.result()
        except Exception as exc:  # a task's error fails its slide; the batch goes on
            self._fail(passes, exc)
            return
        passes.units, passes.left = passes.units + 1, passes.left - 1
        _record(passes, task, result, seconds, device)
        if passes.left:
            return
        tasks = _next_pass(passes)
        if tasks:
            self.ready.extend(tasks)
        else:
            self.segmented += 1
            self.on_done(passes.job, _segmented(passes))

    def _fail(self, passes: Passes, error: BaseException) -> None:
        job = passes.job
        job.fail(f"{job.item.input}: {first_line(error)}")
        self.failed += 1
        mine = [key for key, (task, _) in self.owners.items() if task.passes is passes]
        self.client.cancel([self.owners.pop(key)[1] for key in mine])
        self.bar.total -= _units(job) - passes.units
        self.on_failed(job, error)

    def _slides(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"slides {self.segmented}/{len(self.jobs)}{failed}"


def _record(passes: Passes, task: Task, result, seconds: float, device: str | None) -> None:
    """What one task of the slide returned and how long it took."""
    passes.compute_seconds += seconds
    if device is not None:
        passes.devices.add(device)
        passes.gpu_seconds += seconds if task.device == "cuda" else 0.0
    if passes.stage == PREDICT:
        passes.edges[task.key], passes.counts[task.key] = result.edges, result.counts
        if result.sums is not None:
            passes.parts[task.key] = result.sums
    elif passes.stage == LABEL:
        passes.counts[task.key]["has_objects"] = int(result)  # objects dropped at the seams counted out


def _segmented(passes: Passes) -> Segmented:
    """What the slide's tasks found; its partial sums in grid order, whatever order they came in (they are added
    up in the same order every run), and freed here with the slide."""
    parts = [passes.parts[key] for key in sorted(passes.parts)]
    counts = [passes.counts[key] for key in sorted(passes.counts)]
    passes.parts, passes.counts = {}, {}
    return Segmented(passes.objects, parts, counts, passes.compute_seconds, passes.gpu_seconds,
                     "; ".join(sorted(passes.devices)))  # fmt: skip


def _units(job: SlideJob) -> int:
    """Tasks of all of a slide's passes: every chunk predicted and labelled, then each pyramid level's chunks."""
    from unet.tiling import grid_shape

    pyramid = [grid_shape(height, width, job.spec.chunk) for height, width in job.spec.levels[1:]]
    return 2 * len(job.keys) + sum(rows * cols for rows, cols in pyramid)


def _predictions(passes: Passes, resources: dict | None) -> Iterator[Task]:
    from pipelines.infer.tasks import predict_and_store

    job = passes.job
    settings = job.spec.model.settings
    size = job.slide.height, job.slide.width
    for key in job.keys:
        tissue = job.tissue_mask.chunk(job.spec.region(key, *size)) if job.tissue_mask else None
        args = (job.spec, key, key in job.tissue, tissue)
        yield Task(passes, key, predict_and_store, args, 0, resources, settings.device, settings.precision)


def _next_pass(passes: Passes) -> list[Task]:
    """The tasks of the slide's next pass (none: it is segmented)."""
    from pipelines.infer.tasks import downsample_chunk
    from unet.tiling import grid

    spec = passes.job.spec
    passes.stage += 1
    if passes.stage == LABEL:
        tasks = _label_tasks(passes)
    elif passes.stage - LABEL < len(spec.levels):
        level = passes.stage - LABEL
        keys = [key for key, _ in grid(*spec.levels[level], spec.chunk)]
        tasks = [Task(passes, key, downsample_chunk, (spec, level, key)) for key in keys]
    else:
        tasks = []
    passes.left = len(tasks)
    return tasks


def _label_tasks(passes: Passes) -> list[Task]:
    """Merge the slide's seams (here: small arrays), give its objects' partial sums their final ids, and describe
    its label tasks, each sent only its chunk's own mapping to final ids (the slide's whole mapping grows with it)."""
    from pipelines.infer.tasks import label_chunk_globally
    from unet.instances import merge_chunks
    from unet.objects import relabel_sums

    job, spec = passes.job, passes.job.spec
    mappings, passes.objects = merge_chunks(passes.edges, spec.rule.min_object_pixels)
    passes.edges = {}  # no longer needed: free them on large cohorts
    passes.parts = {key: relabel_sums(sums, mappings[key]) for key, sums in passes.parts.items()}
    return [Task(passes, key, label_chunk_globally, (spec, key, mappings[key])) for key in job.keys]
