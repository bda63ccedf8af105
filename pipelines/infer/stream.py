"""The chunks of every slide of a job as one bounded stream of Dask tasks.

Predictions are submitted slide after slide, never more than ``window`` tasks in flight, so a cohort of
thousands of slides never becomes one giant graph and workers never idle between slides. Each slide then
goes through its further passes, each started when the one before is complete and ahead of further
predictions: as soon as all its chunks are predicted, its seams are merged here and its label tasks run
(each also measuring its objects); then each pyramid level is computed from the one above. When the last
pass is done the slide is handed to ``on_done`` (objects table, metadata, MLflow, rename). A task that
fails fails its slide only: its other tasks are cancelled and the stream goes on.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pipelines.infer.slide import FAILED, SlideJob
from unet.errors import first_line

if TYPE_CHECKING:
    from distributed import Client, Future

LATER_PRIORITY = 1  # a slide's label and pyramid tasks run before further predictions, so it finishes early
PREDICT, LABEL = 0, 1  # SlideJob.stage; stage 1 + k computes pyramid level k


def stream(
    client: Client,
    jobs: list[SlideJob],
    window: int,
    resources: dict | None,
    on_done: Callable[[SlideJob], None],
    on_failed: Callable[[SlideJob, BaseException], None],
) -> None:
    """Predict and label every chunk of ``jobs`` (predictions ask for ``resources``); call ``on_done(job)``
    when a slide is segmented, ``on_failed(job, error)`` when one of its tasks failed."""
    ChunkStream(client, jobs, window, resources, on_done, on_failed).run()


class ChunkStream:
    """The state of ``stream``: what is in flight, what is ready to go, the progress bar."""

    def __init__(self, client, jobs, window, resources, on_done, on_failed) -> None:
        from distributed import as_completed

        from pipelines.infer.tasks import predict_chunk

        self.client, self.jobs, self.window = client, jobs, window
        self.on_done, self.on_failed = on_done, on_failed
        self.predictions: Iterator = (
            (job, predict_chunk, (job.spec, key, key in job.tissue), 0, resources) for job in jobs for key in job.keys
        )
        self.ready: deque = deque()  # label and pyramid tasks, submitted before further predictions
        self.owners: dict[str, tuple] = {}  # in flight: future key -> (slide, task arguments, future)
        for job in jobs:
            job.left = len(job.keys)
        self.segmented = self.failed = 0
        self.completed = as_completed()
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
                    self._handle(future, *owner[:2])
                    self.bar.update()
                    self.bar.set_postfix_str(self._slides(), refresh=False)
                self._submit_more()

    def _submit_more(self) -> None:
        while len(self.owners) < self.window:
            task = self.ready.popleft() if self.ready else next(self.predictions, None)
            if task is None:
                return
            job, function, args, priority, resources = task
            if job.state == FAILED:
                continue
            job.started = job.started or time.perf_counter()
            future = self.client.submit(function, *args, pure=False, resources=resources, priority=priority)
            self.owners[future.key] = (job, args, future)
            self.completed.add(future)

    def _handle(self, future: Future, job: SlideJob, args: tuple) -> None:
        """One finished task; the last of a pass queues the slide's next pass, or hands the slide on."""
        try:
            result = future.result()
        except Exception as exc:  # a task's error fails its slide; the batch goes on
            self._fail(job, exc)
            return
        job.units, job.left = job.units + 1, job.left - 1
        if job.stage == PREDICT:  # args: (spec, key, has_tissue)
            job.edges[args[1]] = result
        elif job.stage == LABEL and result is not None:
            job.parts.append(result)
        if job.left:
            return
        tasks = _next_pass(self.client, job)
        if tasks:
            self.ready.extend(tasks)
        else:
            self.segmented += 1
            self.on_done(job)

    def _fail(self, job: SlideJob, error: BaseException) -> None:
        job.fail(f"{job.item.input}: {first_line(error)}")
        self.failed += 1
        mine = [key for key, owner in self.owners.items() if owner[0] is job]
        self.client.cancel([self.owners.pop(key)[2] for key in mine])
        self.bar.total -= _units(job) - job.units
        self.on_failed(job, error)

    def _slides(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"slides {self.segmented}/{len(self.jobs)}{failed}"


def _units(job: SlideJob) -> int:
    """Tasks of all of a slide's passes: every chunk predicted and labelled, then each pyramid level's chunks."""
    return 2 * len(job.keys) + sum(-(-h // job.spec.chunk) * -(-w // job.spec.chunk) for h, w in job.spec.levels[1:])


def _next_pass(client: Client, job: SlideJob) -> list[tuple]:
    """The tasks of the slide's next pass (none: it is segmented)."""
    from pipelines.infer.tasks import downsample_chunk
    from unet.tiling import grid

    job.stage += 1
    if job.stage == LABEL:
        tasks = _label_tasks(client, job)
    elif job.stage - LABEL < len(job.spec.levels):
        level = job.stage - LABEL
        keys = [key for key, _ in grid(*job.spec.levels[level], job.spec.chunk)]
        tasks = [(job, downsample_chunk, (job.spec, level, key), LATER_PRIORITY, None) for key in keys]
    else:
        tasks = []
    job.left = len(tasks)
    return tasks


def _label_tasks(client: Client, job: SlideJob) -> list[tuple]:
    """Merge the slide's seams (here: one small array) and describe its label tasks."""
    from pipelines.infer.tasks import label_chunk_globally
    from unet.instances import border_areas, merge_ids, offsets, seam_pairs

    edges = {key: job.edges[key] for key in job.keys}  # in grid order, whatever order they finished in
    starts = offsets({key: edge.count for key, edge in edges.items()})
    total, areas = sum(edge.count for edge in edges.values()), border_areas(edges, starts)
    mapping = merge_ids(total, seam_pairs(edges, starts), areas, job.spec.min_object_pixels)
    job.stats |= {"chunks": len(job.keys), "chunks_skipped": len(job.keys) - len(job.tissue)}
    job.stats["objects"] = int(mapping.max())
    shared = client.scatter(mapping, broadcast=True)
    job.edges = {}  # no longer needed: free them on large cohorts
    return [(job, label_chunk_globally, (job.spec, key, starts[key], shared), LATER_PRIORITY, None) for key in job.keys]
