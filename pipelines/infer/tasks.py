"""The Dask tasks of ``pipelines.infer``: one call per output chunk, run in worker processes.

The model is loaded once per worker process (cached by ``ModelSpec``, shared by every slide of a batch and by
concurrent jobs with the same model and settings; the last few are kept, for jobs sharing a cluster) and each
slide opened once, so neither is shipped with a task. Each chunk records its completion in a small Zarr array
*after* its data is written, so a killed job can be resumed and redoes only chunks whose record is missing.
Every write covers whole Zarr chunks (``unet.chunk_writes.write_block``), so no two tasks ever write the same
chunk; whole chunks are read and written in the task's thread (``unet.chunk_io``), off Zarr's event loop.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from distributed import WorkerPlugin, get_worker

from pipelines.infer.output import (
    DONE_LABELS,
    DONE_PREDICT,
    LABELS,
    LOCAL,
    PROBABILITY,
    done_level,
    labels_level,
    probability_level,
)
from pipelines.infer.spec import JobSpec, ModelSpec
from unet.chunk_io import read
from unet.chunk_writes import write_block
from unet.devices import usable_cores
from unet.inference import ChunkPredictor
from unet.instances import ChunkEdges, ChunkLabels, relabel
from unet.model import UNet
from unet.objects import chunk_sums
from unet.pyramid import mean_2x2, nearest_2x2, source_window
from unet.receipt import chunk_counts
from unet.resample import Resampled
from unet.resolution import open_at
from unet.segmentation import from_stored
from unet.slides import Slide
from unet.slides.tiles import TileCache
from unet.tissue import ChunkTissue

log = logging.getLogger(__name__)

# Each worker process keeps the predictors of the last MODELS_PER_WORKER model specs used (model URI and
# inference settings; the least recently used goes first), so jobs sharing a cluster with different models or
# settings do not evict each other's model on every task. Each costs its model's weights on the worker's device
# (a few MB at base_channels 8, about 125 MB at 64 in float32), plus its compiled graph with infer.compile.
MODELS_PER_WORKER = 3
# A GPU pass gives the GIL back at each of its ~100 kernel launches and waits to get it again, while the worker's
# other threads (chunk tasks, Zarr's and Dask's event loops) keep it up to Python's switch interval (5 ms) each
# time. At 0.5 ms the model thread gets it back sooner: +6% to +25% slide throughput with a GPU-like stand-in on 2
# shared cores (docs/benchmarks.md, "The pipeline around the model"; not yet measured on a GPU).
GPU_SWITCH_INTERVAL_S = 0.0005
WORKER_WARNINGS = "unet-worker-warnings"  # the Dask event topic of ``warn_job``'s messages, which each job prints
_PREDICTORS: OrderedDict[tuple, ChunkPredictor] = OrderedDict()  # by _cache_key(spec)
_PREDICTORS_LOCK = threading.Lock()  # guards _PREDICTORS: held for a lookup, never while a model loads
_LOADING_LOCK = threading.Lock()  # one load at a time (MLflow's tracking URI is process-wide while it downloads)
LOADS: Counter = Counter()  # models loaded in this process, by spec (a model evicted and needed again counts twice)


def use_model(spec: ModelSpec, model: UNet) -> None:
    """Predict with ``model`` (already loaded) in this process instead of loading it again."""
    _set_threads(spec)
    _remember(_cache_key(spec), ChunkPredictor(model, spec.settings))


def _set_threads(spec: ModelSpec) -> None:
    """Torch's threads in this worker process and, on a GPU worker, how often Python hands the GIL over."""
    if spec.threads > 0:  # 0: a remote cluster's workers keep their own setting (jobs sharing it never change it)
        torch.set_num_threads(spec.threads)
    if spec.settings.device == "cuda":
        sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)


def _cache_key(spec: ModelSpec) -> tuple:
    """``spec`` and, for a model folder, its weights file's size and time: a folder trained again is loaded again
    (``models:/NAME/VERSION`` and ``runs:/`` models never change)."""
    from pathlib import Path

    from unet.model_files import WEIGHTS_FILE

    try:
        stat = (Path(spec.model_uri) / WEIGHTS_FILE).stat()
    except OSError:  # a models:/ or runs:/ URI
        return (spec,)
    return spec, stat.st_size, stat.st_mtime_ns


def _remember(key: tuple, predictor: ChunkPredictor) -> None:
    with _PREDICTORS_LOCK:
        _PREDICTORS[key] = predictor
        _PREDICTORS.move_to_end(key)
        while len(_PREDICTORS) > MODELS_PER_WORKER:  # a task using an evicted one keeps it until it returns
            _PREDICTORS.popitem(last=False)


def _cached(key: tuple) -> ChunkPredictor | None:
    with _PREDICTORS_LOCK:
        predictor = _PREDICTORS.get(key)
        if predictor is not None:
            _PREDICTORS.move_to_end(key)
        return predictor


def _predictor(spec: ModelSpec) -> ChunkPredictor:
    """The job's predictor in this worker process, loaded once and shared by its threads, its slides and every
    job with the same spec; loading one model never holds up tasks whose model is loaded already."""
    key = _cache_key(spec)
    if (predictor := _cached(key)) is not None:
        return predictor
    with _LOADING_LOCK:
        if (predictor := _cached(key)) is not None:  # another thread loaded it meanwhile
            return predictor
        from pipelines.models import load_model  # MLflow only where a model is actually loaded

        _set_threads(spec)
        predictor = ChunkPredictor(load_model(spec.model_uri, tracking_uri=spec.tracking_uri), spec.settings)
        LOADS[spec] += 1
        _remember(key, predictor)
        return predictor


_TILES = TileCache(0)  # this worker's decoded input chunks, of every slide it reads (``infer.read_cache_mb``)


def _slide(spec: JobSpec) -> Slide | Resampled:
    """The level a job reads, at the resolution it segments (``unet.resolution``), its decoded stored chunks kept
    in this worker's ``_TILES``."""
    if _TILES.budget_bytes != spec.read_cache_mb << 20:  # the last job's setting holds (jobs sharing a cluster)
        _TILES.resize(spec.read_cache_mb << 20)
    return _open_slide(spec.input, spec.level, spec.scale)


@functools.lru_cache(maxsize=8)  # a batch has a few slides in flight at once
def _open_slide(input: str, level: int, scale: float, cached: bool = True) -> Slide | Resampled:
    return open_at(input, level, scale, _TILES if cached else None)


def _cell(key: tuple[int, int]) -> tuple[slice, slice]:
    """The completion record of chunk ``key`` (one element, one Zarr chunk)."""
    return slice(key[0], key[0] + 1), slice(key[1], key[1] + 1)


def _arrays(spec: JobSpec, *names: str) -> list[zarr.Array]:
    return [_array(spec, name) for name in names]


@functools.lru_cache(maxsize=256)  # a few slides in flight, a dozen arrays each
def _array(spec: JobSpec, name: str) -> zarr.Array:
    """An output array, opened once per worker process: opening reads the group's and the array's metadata, which
    no task changes (a later job writing the same output with the same spec makes the same arrays); data is never
    cached. Its chunks are written even where they hold only zeros: each is written once, whole, and Zarr's check
    for an empty chunk costs as much as compressing it."""
    return zarr.open_group(spec.output, mode="r+")[name].with_config({"write_empty_chunks": True})


@dataclass(frozen=True)
class Predicted:
    """What pass 1 found in one chunk, for the driver: its seam edges (``merge_chunks``), its receipt counts
    (``unet.receipt.chunk_counts``; ``has_objects`` is settled by pass 2) and, when the job measures objects, their
    partial sums under chunk-local ids (``unet.objects.chunk_sums``; ``relabel_sums`` gives them final ids)."""

    edges: ChunkEdges
    counts: dict[str, int]
    sums: dict | None


class _Remembered:
    """A slide reader that keeps its last window: the chunk's own pixels lie inside the window the model read, so
    its objects are measured without reading (and decoding) the slide again."""

    def __init__(self, read) -> None:
        self.read, self.corner, self.window = read, (0, 0), None

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        self.corner, self.window = (y0, x0), self.read(y0, y1, x0, x1)
        return self.window

    def pixels(self, region) -> np.ndarray:
        (y0, x0), window = self.corner, self.window
        return window[:, region.y0 - y0 : region.y1 - y0, region.x0 - x0 : region.x1 - x0]


def predict_and_store(
    spec: JobSpec, key: tuple[int, int], has_tissue: bool = True, tissue: ChunkTissue | None = None
) -> Predicted:
    """Pass 1: predict one chunk, store its probability and its chunk-local objects (``unet.segmentation``) and
    measure them (``Predicted``; the receipt counts inside ``tissue``: None, all of the chunk)."""
    probability_array, local_array, done = _arrays(spec, PROBABILITY, LOCAL, DONE_PREDICT)
    height, width = local_array.shape
    region = spec.region(key, height, width)
    if spec.resumed and done[key]:  # finished before an interruption: measure what was written
        local, stored = read(local_array, region.slices), read(probability_array, (slice(0, 1), *region.slices))[0]
        areas = np.bincount(local.ravel())  # its ids are 1..n, all present
        return _measured(spec, region, ChunkLabels(local, len(areas) - 1, areas), stored, None, tissue)
    image = None
    if has_tissue:
        reader = _Remembered(_slide(spec).read)
        probability = _predictor(spec.model).predict_chunk(reader, height, width, region, spec.intensity_range)
        image = reader.pixels(region)
    else:
        probability = np.zeros((region.height, region.width), np.float32)
    stored = spec.rule.store(probability)
    write_block(probability_array, (slice(0, 1), *region.slices), stored[None])
    processes = _postprocess_processes(spec)  # off this process: they hold the GIL the model thread needs
    labelled = _POSTPROCESSING.submit(processes, label_and_measure, spec, key, None, None, tissue)  # pixels: read back
    return label_and_measure(spec, key, stored, image, tissue) if labelled is None else labelled.result()


def label_and_measure(
    spec: JobSpec,
    key: tuple[int, int],
    stored: np.ndarray | None,
    image: np.ndarray | None,
    tissue: ChunkTissue | None,
) -> Predicted:
    """The rest of pass 1, in the task's thread or in a post-processing process: label the chunk's stored
    probability, write its local objects and its completion record, measure them. A post-processing process reads
    ``stored`` and ``image`` back itself (None): sent through a pipe, they cost the GPU worker's process ~40 ms of CPU
    per 2048-px chunk, part of it pickling, which holds the GIL its model thread needs."""
    local_array, done = _arrays(spec, LOCAL, DONE_PREDICT)
    region = spec.region(key, *local_array.shape)
    if stored is None:
        stored = read(_array(spec, PROBABILITY), (slice(0, 1), *region.slices))[0]
    local = spec.rule.label_chunk(stored)
    write_block(local_array, region.slices, local.labels)
    write_block(done, _cell(key), np.ones((1, 1)))  # only now: the chunk is complete
    return _measured(spec, region, local, stored, image, tissue)


def _postprocess_processes(spec: JobSpec) -> int:
    """``infer.postprocess_processes``; by default none on CPU, half this machine's cores on a GPU worker; none in a
    daemonic worker process, which may not start processes of its own (the chunk's task labels, with a warning)."""
    if spec.postprocess_processes is not None:
        processes = spec.postprocess_processes
    else:
        processes = max(1, usable_cores() // 2) if spec.model.settings.device == "cuda" else 0
    if processes and multiprocessing.current_process().daemon:
        _warn_daemonic()
        return 0
    return processes


@functools.cache
def _warn_daemonic() -> None:
    warn_job(
        "this Dask worker is a daemonic process, which cannot start post-processing processes: its chunks are "
        "labelled in its own threads (start its workers with DASK_DISTRIBUTED__WORKER__DAEMON=False)"
    )


def warn_job(message: str) -> None:
    """Log ``message`` in this worker's log, and send it to the job that the task belongs to, which prints it too
    (``WORKER_WARNINGS``): a remote worker's log is not where the job's user reads."""
    log.warning(message)
    try:
        worker = get_worker()
    except ValueError:  # not in a Dask worker
        return
    worker.log_event(WORKER_WARNINGS, f"{worker.address}: {message}")


class _Pools:
    """This worker's post-processing processes (``infer.postprocess_processes``): started with the first chunk
    that asks for them, spawned (never forked from a process that may hold a CUDA context), shut down as the
    worker closes (``ClosePostprocessing``)."""

    def __init__(self) -> None:
        self.lock, self.pools, self.closed = threading.Lock(), {}, False

    def submit(self, processes: int, function: Callable, *args) -> Future | None:
        """``function(*args)`` in ``processes`` processes; None where there are none to ask (0, or closed)."""
        with self.lock:  # held while submitting: a pool is never used after its shutdown, nor started after close
            if not processes or self.closed:
                return None
            if processes not in self.pools:
                self.pools[processes] = ProcessPoolExecutor(processes, mp_context=_DaemonicSpawn(),
                                                            initializer=_started, initargs=(os.getpid(),))  # fmt: skip
            return self.pools[processes].submit(function, *args)

    def open(self) -> None:
        with self.lock:
            self.closed = False

    def close(self) -> None:
        """Shut every pool down once the work submitted to it is done (a few chunks at most)."""
        with self.lock:
            pools, self.pools, self.closed = list(self.pools.values()), {}, True
        for pool in pools:
            pool.shutdown(wait=True)


class _DaemonicSpawn(multiprocessing.context.SpawnContext):
    """Spawned post-processing processes, daemonic: however their worker process ends (closed, interrupted), it
    ends them as it exits instead of waiting for them."""

    class Process(multiprocessing.context.SpawnProcess):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.daemon = True


def _started(parent: int) -> None:
    """Initializer of a post-processing process: Ctrl-C is for the job, whose worker ends this process; should the
    worker be killed instead, this process exits within a second rather than linger (~300 MB)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="unet-watch-worker", daemon=True).start()


_POSTPROCESSING = _Pools()


class ClosePostprocessing(WorkerPlugin):
    """Registered by each job on every worker: shuts the worker's post-processing processes down as it closes. A
    worker process joins its children as it exits, and would wait forever on idle ones (until its Nanny kills it,
    leaving them behind); a task still running then labels in its own thread."""

    idempotent = True  # one per worker, however many jobs register it
    name = "unet-close-postprocessing"

    def setup(self, worker) -> None:
        _POSTPROCESSING.open()  # a worker in the job's own process serves the next job of that process too

    def teardown(self, worker) -> None:
        _POSTPROCESSING.close()


def dask_setup(worker) -> None:
    """Run by Dask as each worker process that a job starts itself starts (this module is one of its preloads,
    ``cluster.preloads``): the process ignores Ctrl-C, which is its job's to handle. A Ctrl-C in a terminal reaches
    every process of the job; one that reached a worker process as it closed left it for its Nanny to kill after
    4 s, its post-processing processes' semaphores leaked."""
    if threading.current_thread() is threading.main_thread():  # where Python lets a signal's handler be set
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _measured(spec: JobSpec, region, local: ChunkLabels, stored, image, tissue: ChunkTissue | None) -> Predicted:
    counts = chunk_counts(local.labels, stored, None if tissue is None else tissue.pixels())
    sums = None
    if spec.objects and local.count:  # a chunk without objects (or without tissue: never read) adds no rows
        if image is None:  # not at hand (a post-processing process, a resumed chunk): read once, its tiles uncached
            slide = _open_slide(spec.input, spec.level, spec.scale, cached=False)
            image = slide.read(region.y0, region.y1, region.x0, region.x1)
        sums = chunk_sums(local.labels, from_stored(stored), image, region.y0, region.x0, local.areas)
    return Predicted(ChunkEdges.of(local.labels, local.count, local.areas), counts, sums)


def label_chunk_globally(spec: JobSpec, key: tuple[int, int], mapping: np.ndarray) -> bool:
    """Pass 2: write the chunk's final, slide-wide instance ids (its ``mapping`` from ``merge_chunks``); returns
    whether any object lies in it."""
    local_array, labels_array, done = _arrays(spec, LOCAL, LABELS, DONE_LABELS)
    region = spec.region(key, *local_array.shape)
    final = relabel(read(local_array, region.slices), mapping)
    if not (spec.resumed and done[key]):
        write_block(labels_array, region.slices, final)
        write_block(done, _cell(key), np.ones((1, 1)))
    return bool(final.any())


def downsample_chunk(spec: JobSpec, level: int, key: tuple[int, int]) -> None:
    """Pass 3: one chunk of pyramid level ``level`` (1, 2, ...) from the level above (``unet.pyramid``)."""
    names = (probability_level(level - 1), labels_level(level - 1), probability_level(level), labels_level(level))
    source_probability, source_labels, probability, labels, done = _arrays(spec, *names, done_level(level))
    if spec.resumed and done[key]:
        return
    region = spec.region(key, *spec.levels[level])
    height, width = spec.levels[level - 1]
    source = slice(*source_window(region.y0, region.y1, height)), slice(*source_window(region.x0, region.x1, width))
    mean = mean_2x2(read(source_probability, (slice(0, 1), *source))[0], spec.rule.probability_dtype)
    write_block(probability, (slice(0, 1), *region.slices), mean[None])
    write_block(labels, region.slices, nearest_2x2(read(source_labels, source)))
    write_block(done, _cell(key), np.ones((1, 1)))


def timed(function, device: str | None, precision: str | None, *args):
    """``function(*args)``, with the seconds it took here and, for a task on ``device``, what that device is and the
    precision it computed in (``unet.devices.device_name``; None: not asked): ``(result, seconds, device name)``."""
    from unet.devices import device_name

    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started, device_name(device, precision) if device else None
