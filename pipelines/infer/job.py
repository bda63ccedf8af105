"""The driver of an inference job: set-up (the request checked, the slides found, the model loaded once), the
segmentation of every slide on Dask, and the report (``infer``). Its shape is set-up, loop, report; the
command line is ``pipelines.infer``'s ``__main__``, what happens to one slide ``pipelines.infer.slide``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from unet.config import Config, flatten_config
from unet.errors import UserError, first_line

if TYPE_CHECKING:
    from pipelines.infer.cohort import Cohort
    from pipelines.infer.slide import JobContext, Segmented, SlideJob, SlideStats

log = logging.getLogger("infer")


def infer(config: Config) -> dict:
    """Segment every slide ``infer.input`` names; return the single slide's stats, or the batch's counts."""
    from pipelines.infer import batch
    from pipelines.infer.slide import plan

    context, cohort = set_up(config)
    jobs = [plan(item, context) for item in cohort.items]  # opens each slide: metadata only
    to_do = [job for job in jobs if job.to_do]
    batch_run = None
    if to_do:
        start_run = (lambda: batch.start_run(config, context, cohort)) if cohort.batch else None
        watch = batch.Report(config, cohort, jobs).update if cohort.batch and config.infer.report else None
        try:
            batch_run = segment(context, to_do, start_run, watch)
        except KeyboardInterrupt as exc:  # what is kept, and how to go on
            exc.add_note(
                "complete outputs are kept: run the same command again to continue the batch (complete outputs are "
                "skipped, interrupted ones resumed)" if cohort.batch else
                f"the partial output is kept: run the same command with --resume to continue {jobs[0].item.output}"
            )  # fmt: skip
            raise
    if not cohort.batch:
        job = jobs[0]
        report(job, context)
        return {**job.stats.as_dict(), "output": job.item.output, "model_uri": job.lineage["model_uri"],
                "mlflow_run_id": job.run_id}  # fmt: skip
    return batch.finish(config, context, cohort, jobs, batch_run)


def set_up(config: Config) -> tuple[JobContext, Cohort]:
    """Check the request, find the slides and load the model once for all of them."""
    from pipelines import registry
    from pipelines.infer.cluster import client_security, worker_count
    from pipelines.infer.cohort import expand
    from pipelines.infer.output import OUTPUT_LAYOUT
    from pipelines.infer.slide import JobContext
    from pipelines.infer.spec import ModelSpec
    from pipelines.models import load_model
    from unet import __version__
    from unet.devices import check_device, usable_cores, visible_gpus
    from unet.inference import InferenceSettings

    started = time.perf_counter()
    infer = config.infer
    check_device("infer.device", infer.device, infer.precision)
    overwrite, resume = infer.overwrite, infer.resume
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if not infer.input or not infer.output:
        raise UserError("set infer.input and infer.output, e.g. --set infer.input=slide.ome.zarr")
    if infer.scheduler:
        client_security(infer, warn=False)  # a missing or wrong TLS setting fails here, before any output
    cohort = expand(infer.input, infer.output, infer.level, infer.pixel_size_um)
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    model_uri, model_version = registry.resolve_model(infer.model, tracking_uri)
    model = load_model(model_uri, tracking_uri=tracking_uri)
    if infer.tile_size and infer.tile_size % model.size_multiple:  # the config checks it against model.depth
        raise UserError(f"infer.tile_size={infer.tile_size} must be a multiple of {model.size_multiple} for this model")
    gpus = visible_gpus() if infer.device == "cuda" else []
    threads = max(1, usable_cores() // worker_count(infer, gpus)) if not infer.scheduler else 0
    lineage = {
        "model": infer.model,
        "model_uri": model_uri,
        "model_version": model_version,
        "code_version": registry.git_commit(),
        "unet_wsi": __version__,
        "layout": OUTPUT_LAYOUT,
        "config": flatten_config(config),
    }
    spec = ModelSpec(model_uri, tracking_uri, InferenceSettings.from_config(infer), threads)
    return JobContext(config, model, spec, lineage, cohort.batch, overwrite, resume, gpus, started), cohort


def segment(
    context: JobContext,
    jobs: list[SlideJob],
    start_run: Callable[[], str] | None,
    after_each: Callable[[], None] | None = None,
) -> str | None:
    """Start Dask (or use the scheduler), stream every slide's chunks, finish each slide as it completes (then
    call ``after_each``: the batch's report). ``start_run`` opens the batch's MLflow run (returning its id, which
    this returns), off the critical path."""
    from pipelines.infer.cluster import dashboard, in_process, start_dask, task_resources
    from pipelines.infer.stream import stream
    from pipelines.infer.tasks import WORKER_WARNINGS, ClosePostprocessing, use_model

    infer = context.config.infer
    client, cluster = start_dask(infer, context.gpus)
    if in_process(infer, context.gpus):
        use_model(context.model_spec, context.model)  # the worker shares this process: no second load
    finisher = Finisher(context, start_run, after_each)
    try:
        client.register_plugin(ClosePostprocessing())  # each worker shuts its post-processing processes as it closes
        client.subscribe_topic(WORKER_WARNINGS, lambda event: log.warning("Dask worker %s", event[1]))
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        log.info("Dask dashboard: %s (%d threads)", dashboard(client, cluster), threads)
        resources = task_resources(infer.device, infer.tasks)
        stream(client, jobs, max(4, 2 * threads), resources, finisher.submit, finisher.on_failed)
        finisher.close()  # the slides still being finished: a Ctrl-C meanwhile is handled below too
    except BaseException as exc:  # the batch's run ends KILLED (Ctrl-C, SIGTERM) or FAILED, not RUNNING forever
        finisher.stop(exc)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        finisher.close()
    return finisher.outcome()


class Finisher:
    """Finishes segmented slides one at a time on a thread of its own (objects table, receipt, MLflow, metadata,
    rename, then ``after_each``), off the loop that feeds the workers; it also opens the batch's MLflow run there
    (``start_run``)."""

    def __init__(
        self, context: JobContext, start_run: Callable[[], str] | None, after_each: Callable[[], None] | None = None
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.context, self.pool, self.after_each = context, ThreadPoolExecutor(1), after_each
        self.batch_run = self.pool.submit(start_run) if start_run else None
        self.finished: list = []

    def submit(self, job: SlideJob, segmented: Segmented) -> None:
        """``stream``'s ``on_done``: queue a segmented slide."""
        self.finished.append(self.pool.submit(self._finish_or_fail, job, segmented))

    def _finish_or_fail(self, job: SlideJob, segmented: Segmented) -> None:
        from pipelines.infer.slide import finish

        try:
            finish(job, self.context, segmented, self.batch_run.result() if self.batch_run else None)
        except Exception as exc:
            if not self.context.batch:
                raise
            job.fail(f"{job.item.input}: {first_line(exc)}")
            log.error("failed: %s", job.reason)
        if self.after_each:
            self.after_each()

    def on_failed(self, job: SlideJob, error: BaseException) -> None:
        """``stream``'s ``on_failed``: a single slide's error stops the job; a batch's is reported and goes on."""
        if not self.context.batch:
            raise error
        log.error("failed: %s", job.reason)
        if self.after_each:
            self.pool.submit(self.after_each)

    def close(self) -> None:
        """Wait for the slides being finished; no more can be submitted. The wait wakes every 0.25 s, so Ctrl-C and
        SIGTERM are handled at once even when the kernel hands the signal to another thread (as with MLflow's polars
        threads): a plain join would not return before every queued slide was finished."""
        from concurrent.futures import wait

        while not all(future.done() for future in self.finished):  # done() counts futures cancelled by stop(),
            wait(self.finished, timeout=0.25)  # which wait() never reports (nobody notifies their cancellation)
        self.pool.shutdown(wait=True)

    def stop(self, exc: BaseException) -> None:
        """The job stops: a slide being finished is finished, no new ones; the batch's run is marked KILLED
        (Ctrl-C, SIGTERM) or FAILED, with a note on ``exc``."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        run = self.batch_run
        if run is not None and not run.cancelled() and run.exception() is None:
            from pipelines.infer.batch import end_stopped_run

            status = end_stopped_run(self.context.config, run.result(), isinstance(exc, KeyboardInterrupt))
            exc.add_note(f"MLflow batch run {run.result()} marked {status}")

    def outcome(self) -> str | None:
        """The batch's MLflow run id, once closed; a single slide's error is raised here."""
        for future in self.finished:
            future.result()
        return self.batch_run.result() if self.batch_run else None


def report(job: SlideJob, context: JobContext) -> None:
    """What a single-slide job did."""
    from pipelines.infer.output import LABELS, OBJECTS, PROBABILITY

    stats, slide, levels = job.stats, job.slide, job.spec.levels
    print()
    print(f"  input           {job.item.input}")
    print(f"  resolution      {job.resolution.describe()}; segmented at {slide.width} x {slide.height} px")
    print(f"  model           {job.lineage['model_uri']}")
    print(f"  output          {job.item.output}  (probability: /{PROBABILITY}, instance labels: /{LABELS})")
    print(f"  chunks          {stats.chunks} ({stats.chunks_skipped} without tissue), {stats.objects} objects")
    if (median := stats.object_summary.get("object_area_um2_median")) is not None:
        print(f"  object area     median {median:.1f} um2" + _training_areas(context))
    print(_receipt_line(stats))
    print(f"  levels          {len(levels)} (the smallest {levels[-1][1]} x {levels[-1][0]} px)")
    if job.spec.objects:
        print(f"  objects table   {job.item.output}/{OBJECTS}")
    print(f"  throughput      {stats.mpx_per_s:.2f} Mpx/s ({stats.seconds:.1f} s segmenting)")
    print(f"  compute         {stats.compute_seconds:.1f} s in tasks, {stats.gpu_seconds:.1f} GPU-s on {stats.device}")
    print(f"  start-up        {stats.startup_seconds:.1f} s (model, input, output, Dask)")
    total = stats.total_seconds
    print(f"  end to end      {total:.1f} s ({stats.megapixels / total:.2f} Mpx/s)")
    print(f"  MLflow run      {job.run_id}")
    for flag in stats.flags:
        print(f"  flagged         {flag}")
    print(f"  view            napari --plugin napari-ome-zarr {job.item.output}")
    print(f"  QuPath          python -m pipelines.export {job.item.output} --format qupath")


def _receipt_line(stats: SlideStats) -> str:
    """The slide's tissue and what lies in it (``unet.receipt``)."""
    receipt = stats.receipt
    tissue = f"{receipt['tissue_mm2']:.3g} mm2" if "tissue_mm2" in receipt else f"{receipt['tissue_share']:.0%}"
    line = f"  tissue          {tissue} ({stats.tissue_from})"
    if "objects_per_mm2" in receipt:
        line += f", {receipt['objects_per_mm2']:,.0f} objects per mm2"
    if "uncertain_share" in receipt:
        line += f"; uncertain {receipt['uncertain_share']:.1%} of it"
        line += f"; {receipt['empty_tissue_chunk_share']:.0%} of its chunks without objects"
    return line


def _training_areas(context: JobContext) -> str:
    areas = context.model.object_area_um2
    return f" (the model's training objects: median {areas['p50']:.1f} um2)" if areas else ""
