"""One slide of an inference job: open and check it, create, resume or skip its output, and finish it.

A job segments one slide or a batch of them (``pipelines.infer.cohort``). A single slide keeps the strict rules of
one output: an existing one is replaced only with ``--overwrite`` and continued only with ``--resume``. In a
batch, re-running does only what is missing: complete outputs made with the same model, input and config are
skipped, interrupted ones are resumed, ``--overwrite`` redoes them all; a slide that cannot be segmented is
reported with its reason while the others go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.infer.cohort import Item
from pipelines.infer.output import NEW, RESUMED, SKIPPED
from unet.errors import UserError

if TYPE_CHECKING:
    from pipelines.infer.spec import JobSpec, ModelSpec
    from pipelines.locks import Lock
    from unet.config import Config
    from unet.instances import ChunkEdges
    from unet.model import UNet
    from unet.resample import Resampled
    from unet.resolution import Resolution
    from unet.slides import Slide
    from unet.storage import Staging

log = logging.getLogger("infer")
FAILED, DONE = "failed", "done"  # and the output's NEW, RESUMED, SKIPPED


@dataclass(frozen=True)
class JobContext:
    """What every slide of a job shares: the config, the loaded model and what the outputs record of them."""

    config: Config
    model: UNet
    model_spec: ModelSpec
    lineage: dict  # model, model_uri, model_version, code_version, unet_wsi, config
    batch: bool
    overwrite: bool
    resume: bool
    gpus: list[str]  # CUDA: the GPUs its local workers use
    started: float  # time.perf_counter() when the job began


@dataclass
class SlideJob:
    """One slide's progress through the job (``state`` is one of NEW, RESUMED, SKIPPED, FAILED, DONE)."""

    item: Item
    state: str = NEW
    reason: str = ""
    slide: Slide | Resampled | None = None  # the level read, at the resolution it is segmented at
    resolution: Resolution | None = None
    spec: JobSpec | None = None
    staged: Staging | None = None
    lineage: dict = field(default_factory=dict)
    keys: list[tuple[int, int]] = field(default_factory=list)
    tissue: set[tuple[int, int]] = field(default_factory=set)
    edges: dict[tuple[int, int], ChunkEdges] = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)  # the objects' partial sums, chunk by chunk
    stats: dict = field(default_factory=dict)
    started: float = 0.0  # when its first task was submitted
    stage: int = 0  # the pass under way: 0 predict, 1 label, 2... pyramid level 1...
    left: int = 0  # its tasks not yet done
    units: int = 0  # tasks done, of all passes
    resumed: bool = False  # its output was started by an earlier, interrupted run
    run_id: str | None = None
    lock: Lock | None = None  # held while the job writes the output: no other job may (pipelines.locks)

    @property
    def to_do(self) -> bool:
        return self.state in (NEW, RESUMED)

    def fail(self, reason: str) -> None:
        self.state, self.reason = FAILED, reason
        self.unlock()

    def unlock(self) -> None:
        from pipelines.locks import release

        release(self.lock)


def plan(item: Item, context: JobContext) -> SlideJob:
    """Open and check the slide and prepare its output; in a batch a problem fails this slide, not the job."""
    from pipelines.infer.output import open_output

    job = SlideJob(item)
    try:
        _open(job, context)
        job.state, job.lock, recorded = open_output(job.staged, job.slide, job.spec, job.lineage,
                                                    overwrite=context.overwrite, resume=context.resume,
                                                    batch=context.batch)  # fmt: skip
        if job.state == SKIPPED:
            job.stats = recorded  # what the complete output recorded
        job.resumed = job.state == RESUMED
        if job.to_do:
            job.keys, job.tissue = chunk_keys(context.config, job.slide, item.input)
    except UserError as exc:
        if not context.batch:
            raise
        job.fail(str(exc))
    return job


def _open(job: SlideJob, context: JobContext) -> None:
    from pipelines.infer.output import output_staging
    from pipelines.infer.spec import JobSpec
    from unet.pyramid import level_shapes
    from unet.resolution import open_at, plan_resolution
    from unet.tissue import check_lowest_level

    item, infer, model = job.item, context.config.infer, context.model
    resolution = plan_resolution(item.input, model.pixel_size_um, item.level, item.pixel_size_um, infer.resample)
    # its metadata's claims are checked (unet.slides.MAX_PIXELS, ...)
    job.slide = open_at(item.input, resolution.level, resolution.scale)
    if job.slide.channels != model.n_channels:
        raise UserError(f"{item.input} has {job.slide.channels} channels but the model expects {model.n_channels}")
    if infer.tissue_mask and job.slide.levels > 1:
        check_lowest_level(job.slide)
    job.staged = output_staging(item.output)
    shape = (job.slide.height, job.slide.width)
    config = {**context.lineage["config"], "infer.input": item.input, "infer.output": item.output}
    job.lineage = {**context.lineage, "input": item.input, "level": resolution.level, "config": config,
                   "resolution": resolution.as_dict()}  # fmt: skip
    job.resolution = resolution
    job.spec = JobSpec(
        input=item.input,
        level=resolution.level,
        scale=resolution.scale,
        output=job.staged.partial,
        model=context.model_spec,
        chunk=infer.chunk,
        threshold=infer.threshold,
        intensity_range=intensity_range(job.slide),
        probability_dtype=infer.probability_dtype,
        levels=tuple(level_shapes(*shape, infer.chunk) if infer.pyramid else [shape]),
        objects=infer.objects,
        fill_holes=infer.fill_holes,
        min_object_pixels=min_object_pixels(infer.min_object_area_um2, model, resolution, item.input),
    )


def min_object_pixels(area_um2: float | None, model: UNet, resolution: Resolution, input: str) -> int:
    """The smallest object kept, in output pixels: ``infer.min_object_area_um2``, or by default half the
    1st-percentile area of the model's training objects; 0 where either that or the pixel size is unknown."""
    import math

    if area_um2 is None:
        area_um2 = 0.5 * model.object_area_um2["p1"] if model.object_area_um2 else 0.0
    if not area_um2:
        return 0
    if resolution.pixel_size_um is None:
        log.warning("%s: its pixel size is unknown, so no minimum object area applies", input)
        return 0
    return math.ceil(area_um2 / resolution.pixel_size_um**2)


def intensity_range(slide: Slide | Resampled) -> tuple[tuple[float, float], ...]:
    """Per-channel normalisation range, by the training rule, from the lowest-resolution level (one small
    read, identical for every chunk; none at all for 8-bit images)."""
    import math

    import numpy as np

    from unet.intensity import MAX_INTENSITY_SPAN, intensity_ranges
    from unet.slides import SlideError, open_slide

    lowest = open_slide(slide.path, slide.levels - 1)
    if lowest.dtype.kind in "iu" and lowest.dtype.itemsize > 2:  # 32/64-bit: the histogram must stay small
        import dask

        pixels = lowest.to_dask(chunk=2048).astype(np.float64)
        low, high = dask.compute(pixels.min(), pixels.max())
        if high - low > MAX_INTENSITY_SPAN:
            raise SlideError(
                f"{slide.path}: {lowest.dtype} values from {low:.0f} to {high:.0f} span more than "
                f"{MAX_INTENSITY_SPAN:,}, too many for the intensity histogram; convert it to float32 or 16 bits"
            )
    ranges = intensity_ranges(lowest)
    if not all(math.isfinite(v) for pair in ranges for v in pair):
        raise SlideError(f"{slide.path}: NaN or infinite pixels (its intensity range is {ranges})")
    return ranges


def chunk_keys(
    config: Config, slide: Slide | Resampled, input: str
) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    """Every chunk's (row, col), and those to predict (all, or those with tissue)."""
    from unet.tiling import grid
    from unet.tissue import chunks_with_tissue

    keys = [key for key, _ in grid(slide.height, slide.width, config.infer.chunk)]
    if not config.infer.tissue_mask:
        return keys, set(keys)
    return keys, chunks_with_tissue(input, slide, config.infer.chunk)


def finish(job: SlideJob, context: JobContext, parent_run_id: str | None = None) -> None:
    """Write its objects table, record its MLflow run (nested in the batch's), write its metadata and move it
    into place."""
    from pipelines.infer.output import finalize_output

    if job.spec.objects:
        _write_objects(job)
    now = time.perf_counter()
    seconds = now - job.started
    megapixels = job.slide.height * job.slide.width / 1e6
    job.stats |= {"megapixels": megapixels, "seconds": seconds, "mpx_per_s": megapixels / seconds}
    if not context.batch:  # a single slide: its one-off start-up apart, and the whole job
        job.stats |= {"startup_seconds": job.started - context.started, "total_seconds": now - context.started}
    job.run_id = _track(job, context.config, parent_run_id)
    lineage = {**job.lineage, "stats": job.stats, "mlflow_run_id": job.run_id}
    if parent_run_id:
        lineage["mlflow_batch_run_id"] = parent_run_id
    finalize_output(job.staged, job.resolution, len(job.spec.levels), lineage, overwrite=context.overwrite)
    job.state = DONE
    job.unlock()


def _write_objects(job: SlideJob) -> None:
    """Add up the objects' partial sums into the table, write it, and keep its summary in the stats."""
    from pipelines.infer.output import write_objects
    from unet.objects import objects_table, summary

    resolution = job.resolution
    table = objects_table(job.parts, resolution.pixel_size_um, job.slide.channels, resolution.to_level0)
    job.parts = []
    if len(table) != job.stats["objects"]:  # both count the merged objects: a difference is a bug, not bad input
        raise RuntimeError(f"{job.item.input}: {len(table)} objects measured but {job.stats['objects']} labelled")
    write_objects(job.staged.partial, table)
    job.stats |= summary(table)


def _track(job: SlideJob, config: Config, parent_run_id: str | None) -> str:
    """An MLflow run recording one slide's inference: what went in, what came out, how fast."""
    from pipelines import registry
    from unet import storage

    params = {k: job.lineage[k] for k in ("model_uri", "model_version", "input", "level", "code_version")}
    params |= {"output": job.item.output, "chunk_size": config.infer.chunk, "resolution": job.resolution.describe()}
    resolution = job.resolution.as_dict()
    params |= {key: resolution[key] for key in ("pixel_size_um", "slide_pixel_size_um", "scale")}
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    name = f"infer {storage.basename(job.item.output)}"
    experiment = config.tracking.experiment
    return registry.log_job_run(tracking_uri, experiment, "inference", name, params, job.stats, parent=parent_run_id)
