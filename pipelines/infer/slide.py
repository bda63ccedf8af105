"""One slide of an inference job: open and check it, create, resume or skip its output, and finish it.

A job segments one slide or a batch of them (``pipelines.infer.cohort``). A single slide keeps the strict rules of
one output: an existing one is replaced only with ``--overwrite`` and continued only with ``--resume``. In a
batch, re-running does only what is missing: complete outputs made with the same model, input and config are
skipped, interrupted ones are resumed, ``--overwrite`` redoes them all; a slide that cannot be segmented is
reported with its reason while the others go on.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.infer.cohort import Item
from pipelines.infer.output import NEW, RESUMED, SKIPPED, Policy
from unet.errors import UserError

if TYPE_CHECKING:
    from pipelines.infer.spec import JobSpec, ModelSpec
    from pipelines.locks import Lock
    from unet.config import Config
    from unet.model import UNet
    from unet.resample import Resampled
    from unet.resolution import Resolution
    from unet.slides import Slide
    from unet.storage import Staging
    from unet.tissue import TissueMask

log = logging.getLogger("infer")
FAILED, DONE = "failed", "done"  # and the output's NEW, RESUMED, SKIPPED
FLAGS_TAG = "flags"  # a slide's MLflow run: its flags (flags_text), the cohort's included once the batch ends


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

    @property
    def policy(self) -> Policy:
        """What the job may do with existing outputs."""
        return Policy(overwrite=self.overwrite, resume=self.resume, batch=self.batch)


@dataclass(frozen=True)
class Segmented:
    """What a segmented slide's tasks found, handed to ``on_done``."""

    objects: int
    parts: list[dict]  # the objects' partial sums (``unet.objects.chunk_sums``), in grid order
    counts: list[dict[str, int]]  # each chunk's receipt counts (``unet.receipt.chunk_counts``)
    compute_seconds: float
    gpu_seconds: float
    device: str  # what predicted its chunks (several: joined by "; ")


NESTED = ("object_summary", "receipt")  # SlideStats' fields recorded flat, their keys beside the others


@dataclass
class SlideStats:
    """What a slide's segmentation measured, its receipt: recorded in its lineage (``stats``) and MLflow run, and
    read back for a skipped slide's line in the batch summary. None: not measured (e.g. by an output of an earlier
    version)."""

    chunks: int | None = None
    chunks_skipped: int | None = None  # without tissue
    objects: int | None = None
    object_summary: dict[str, float] = field(default_factory=dict)  # unet.objects.summary, but its object count
    receipt: dict[str, float] = field(default_factory=dict)  # unet.receipt.slide_measures
    megapixels: float | None = None  # of the pixels segmented
    seconds: float | None = None  # wall seconds, from its first task to its objects table written
    mpx_per_s: float | None = None
    compute_seconds: float | None = None  # its tasks' seconds in workers (this run's; several at once add up)
    gpu_seconds: float | None = None  # its predictions' seconds on a GPU (0 on CPU)
    startup_seconds: float | None = None  # a single slide's job only: model, input, output, Dask
    total_seconds: float | None = None  # a single slide's job only: the whole job
    device: str | None = None  # what predicted its chunks (GPU or CPU model)
    tissue_from: str | None = None  # "tissue mask", or "whole image" where the slide has none (unet.receipt)
    flags: list[str] = field(default_factory=list)  # unet.receipt.absolute_flags: "KIND: why"

    def as_dict(self) -> dict:
        """The measured values by name, as recorded (numbers, and the device, tissue source and flags)."""
        counts = {"chunks": self.chunks, "chunks_skipped": self.chunks_skipped, "objects": self.objects}
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in {*counts, *NESTED}}
        return {k: v for k, v in {**counts, **self.object_summary, **self.receipt, **rest}.items() if v is not None}

    def metrics(self) -> dict[str, float]:
        """The numbers of ``as_dict``: the slide's MLflow metrics."""
        return {k: v for k, v in self.as_dict().items() if isinstance(v, int | float)}

    @classmethod
    def from_dict(cls, recorded: dict) -> SlideStats:
        """The stats an output recorded (``as_dict``)."""
        from unet.receipt import MEASURES

        names = {f.name for f in fields(cls)} - set(NESTED)
        receipt = {k: v for k, v in recorded.items() if k in MEASURES}
        summary = {k: v for k, v in recorded.items() if k not in names and k not in MEASURES}
        return cls(**{k: v for k, v in recorded.items() if k in names}, object_summary=summary, receipt=receipt)


@dataclass
class SlideJob:
    """One slide's progress through the job (``state`` is one of NEW, RESUMED, SKIPPED, FAILED, DONE); its
    passes through the stream are ``pipelines.infer.stream``'s."""

    item: Item
    state: str = NEW
    reason: str = ""
    slide: Slide | Resampled | None = None  # the level read, at the resolution it is segmented at
    resolution: Resolution | None = None
    spec: JobSpec | None = None
    staged: Staging | None = None
    lineage: dict = field(default_factory=dict)
    keys: list[tuple[int, int]] = field(default_factory=list)
    tissue: set[tuple[int, int]] = field(default_factory=set)  # the chunks to predict
    tissue_mask: TissueMask | None = None  # for its receipt (``tissue_mask_for``); None: the whole image counts
    stats: SlideStats = field(default_factory=SlideStats)
    started: float = 0.0  # when its first task was submitted
    resumed: bool = False  # its output was started by an earlier, interrupted run
    run_id: str | None = None
    lock: Lock | None = None  # held while the job writes the output: no other job may (pipelines.locks)
    thumbnail: str | None = None  # of its QC picture, for the report (pipelines.infer.report.thumbnail)

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
        job.state, job.lock, recorded = open_output(job.staged, job.slide, job.spec, job.lineage, context.policy)
        if job.state == SKIPPED:  # what the complete output recorded
            job.stats, job.run_id = SlideStats.from_dict(recorded.get("stats", {})), recorded.get("mlflow_run_id")
        job.resumed = job.state == RESUMED
        job.spec = replace(job.spec, resumed=job.resumed)
        if job.to_do:
            job.tissue_mask = tissue_mask_for(context.config, job.slide, item.input)
            job.keys, job.tissue = chunk_keys(context.config, job.slide, job.tissue_mask)
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
    from unet.segmentation import ObjectRule
    from unet.slides import check_chunk_size
    from unet.tissue import check_lowest_level

    item, infer, model = job.item, context.config.infer, context.model
    resolution = plan_resolution(item.input, model.pixel_size_um, item.level, item.pixel_size_um, infer.resample)
    # its metadata's claims are checked (unet.slides.MAX_PIXELS, ...)
    job.slide = open_at(item.input, resolution.level, resolution.scale)
    check_chunk_size(getattr(job.slide, "source", job.slide))  # a Resampled view reads its source's chunks
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
        intensity_range=intensity_range(job.slide),
        levels=tuple(level_shapes(*shape, infer.chunk) if infer.pyramid else [shape]),
        objects=infer.objects,
        rule=ObjectRule.from_config(infer, model, resolution.pixel_size_um, item.input),
        postprocess_processes=infer.postprocess_processes,
        read_cache_mb=infer.read_cache_mb,
    )


def intensity_range(slide: Slide | Resampled) -> tuple[tuple[float, float], ...]:
    """Per-channel normalisation range, by the training rule, from the lowest-resolution level (one small
    read, identical for every chunk; none at all for 8-bit images). 32/64-bit integers whose histogram would be too
    long are refused first, NaN or infinite pixels once they reach the range (``unet.intensity.check_intensity``)."""
    import numpy as np

    from unet.intensity import check_intensity, intensity_bounds, intensity_ranges
    from unet.slides import SlideError, open_slide

    lowest = open_slide(slide.path, slide.levels - 1)
    dtype = np.dtype(lowest.dtype)
    if dtype.kind in "iu" and dtype.itemsize > 2:  # lazy: a single-level slide's lowest level is large
        import dask

        bounds = dask.compute(*intensity_bounds(lowest.to_dask(chunk=2048)))
        check_intensity(slide.path, dtype, *bounds, SlideError)
    ranges = intensity_ranges(lowest)
    lows, highs = np.array(ranges, np.float64).T
    check_intensity(slide.path, dtype, lows.min(), highs.max(), SlideError)  # NaN: propagated by min and max
    return ranges


def tissue_mask_for(config: Config, slide: Slide | Resampled, input: str) -> TissueMask | None:
    """The slide's tissue mask (``unet.tissue``), where one can be had cheaply or ``infer.tissue_mask`` asks for it:
    a brightfield (RGB) slide's lowest level, or a thumbnail of a small slide without a pyramid. None (the receipt
    then counts the whole image as tissue): fluorescence, or a large slide without a pyramid."""
    from unet.slides import open_slide
    from unet.tissue import MAX_WHOLE_LEVEL_PIXELS, slide_tissue

    infer = config.infer
    if infer.tissue_mask:
        return slide_tissue(input, slide, infer.chunk)
    if slide.channels != 3:
        return None
    with open_slide(input, slide.levels - 1 if slide.levels > 1 else slide.level) as read_whole:
        if read_whole.height * read_whole.width > MAX_WHOLE_LEVEL_PIXELS:
            return None
    return slide_tissue(input, slide, infer.chunk)


def chunk_keys(
    config: Config, slide: Slide | Resampled, tissue: TissueMask | None
) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    """Every chunk's (row, col), and those to predict (all, or with ``infer.tissue_mask`` those with tissue)."""
    from unet.tiling import grid

    keys = [key for key, _ in grid(slide.height, slide.width, config.infer.chunk)]
    if not config.infer.tissue_mask:
        return keys, set(keys)
    return keys, tissue.chunks(config.infer.chunk)


def finish(job: SlideJob, context: JobContext, segmented: Segmented, parent_run_id: str | None = None) -> None:
    """Write its objects table (from the objects' partial sums), its receipt and QC picture, record its MLflow run
    (nested in the batch's), write its metadata and move it into place."""
    from pipelines.infer.output import finalize_output

    summary = _write_objects(job, segmented.objects, segmented.parts) if job.spec.objects else {}
    job.stats = _measured(job, context, segmented, summary)
    with tempfile.TemporaryDirectory() as folder:
        picture = _write_qc_picture(job, Path(folder))
        job.run_id = _track(job, context.config, parent_run_id, (picture,) if picture else ())
    lineage = {**job.lineage, "stats": job.stats.as_dict(), "mlflow_run_id": job.run_id}
    if parent_run_id:
        lineage["mlflow_batch_run_id"] = parent_run_id
    finalize_output(job.staged, job.resolution, len(job.spec.levels), lineage, overwrite=context.overwrite)
    job.state = DONE
    job.unlock()


def _measured(job: SlideJob, context: JobContext, segmented: Segmented, summary: dict[str, float]) -> SlideStats:
    """The slide's receipt (``unet.receipt``), its time counted until now (its objects table written)."""
    from unet.receipt import absolute_flags, slide_measures

    now = time.perf_counter()
    seconds, megapixels = now - job.started, job.slide.height * job.slide.width / 1e6
    measures = slide_measures(segmented.counts, segmented.objects, job.resolution.pixel_size_um)
    stats = SlideStats(
        chunks=len(job.keys),
        chunks_skipped=len(job.keys) - len(job.tissue),
        objects=segmented.objects,
        object_summary=summary,
        receipt=measures,
        megapixels=megapixels,
        seconds=seconds,
        mpx_per_s=megapixels / seconds,
        compute_seconds=segmented.compute_seconds,
        gpu_seconds=segmented.gpu_seconds,
        device=segmented.device or None,
        tissue_from="tissue mask" if job.tissue_mask is not None else "whole image",
        flags=absolute_flags(measures, segmented.objects, job.resolution),
    )
    if not context.batch:  # a single slide: its one-off start-up apart, and the whole job
        stats.startup_seconds, stats.total_seconds = job.started - context.started, now - context.started
    return stats


def _write_objects(job: SlideJob, objects: int, parts: list[dict]) -> dict[str, float]:
    """Add up the objects' partial sums into the table and write it; return its summary (``unet.objects.summary``,
    less the count)."""
    from pipelines.infer.output import write_objects
    from unet.objects import objects_table, summary

    resolution = job.resolution
    table = objects_table(parts, resolution.pixel_size_um, job.slide.channels, resolution.to_level0)
    if len(table) != objects:  # both count the merged objects: a difference is a bug, not bad input
        raise RuntimeError(f"{job.item.input}: {len(table)} objects measured but {objects} labelled")
    write_objects(job.staged.partial, table)
    return {k: v for k, v in summary(table).items() if k != "objects"}


def _write_qc_picture(job: SlideJob, folder: Path) -> Path | None:
    """The slide's QC picture (``pipelines.infer.qc``, where it draws one) into its output and ``folder`` (for its
    MLflow run)."""
    from pipelines.infer.output import QC_PICTURE
    from pipelines.infer.qc import qc_picture
    from pipelines.infer.report import thumbnail
    from unet import storage
    from unet.io import write_png

    spec = job.spec
    picture = qc_picture(job.item.input, job.staged.partial, spec.levels, spec.chunk, job.resolution.to_level0)
    if picture is None:
        log.info("%s: no QC picture (no pyramid, or a slide level too large to read whole)", job.item.input)
        return None
    local = Path(write_png(folder / QC_PICTURE, picture))
    storage.write_bytes(f"{job.staged.partial.rstrip('/')}/{QC_PICTURE}", local.read_bytes())
    job.thumbnail = thumbnail(picture)  # for the cohort's report, made while the picture is at hand
    return local


def _track(job: SlideJob, config: Config, parent_run_id: str | None, artifacts: tuple[Path, ...] = ()) -> str:
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
    params |= {"device": job.stats.device or "", "tissue_from": job.stats.tissue_from}
    tags = {FLAGS_TAG: flags_text(job.stats.flags)}
    return registry.log_job_run(tracking_uri, experiment, "inference", name, params, job.stats.metrics(), artifacts,
                                parent=parent_run_id, tags=tags)  # fmt: skip


def flags_text(flags: list[str]) -> str:
    """A slide's flags in one line (the MLflow tag, a summary cell): "none", or each "KIND: why" joined by " | "."""
    return " | ".join(flags) or "none"
