"""What a batch of slides leaves behind: the summary table, the batch's MLflow run, the report.

The summary ``OUTPUT/batch_summary.csv`` has one row per slide: slide, status (done, resumed, skipped,
failed), size in Mpx, objects, seconds, output, model version, reason (why it failed) and input. It is
rewritten by every run of the batch, so it always describes the whole cohort. In MLflow the batch is one
run (tag ``job: inference-batch``) with the table as an artifact and one nested run per slide segmented.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.infer.slide import DONE, FAILED, RESUMED, SKIPPED
from unet.errors import UserError
from unet.io import stem

if TYPE_CHECKING:
    from pipelines.infer.cohort import Cohort
    from pipelines.infer.slide import JobContext, SlideJob
    from unet.config import Config

log = logging.getLogger("infer")
BATCH_JOB = "inference-batch"  # the JOB_TAG of a batch's run
COLUMNS = ("slide", "status", "megapixels", "objects", "seconds", "output", "model_version", "level",
           "slide_um_per_px", "um_per_px", "resolution", "reason", "input")  # fmt: skip


def start_run(config: Config, context: JobContext, cohort: Cohort) -> str:
    """The batch's MLflow run, kept alive by a heartbeat; each slide's run is nested in it. Earlier runs of this
    batch left RUNNING by a job that is gone (killed) are marked KILLED first."""
    from pipelines import registry
    from pipelines.liveness import heartbeat
    from unet import storage

    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    end_abandoned_runs(tracking_uri, config.tracking.experiment, cohort.folder)
    params = {
        "input": config.infer.input,
        "output": cohort.folder,
        "slides": len(cohort.items),
        "model_uri": context.lineage["model_uri"],
        "model_version": context.lineage["model_version"],
        "code_version": context.lineage["code_version"],
    }
    name = f"infer batch {storage.basename(cohort.folder)}"
    run_id = registry.start_job_run(tracking_uri, config.tracking.experiment, BATCH_JOB, name, params)
    heartbeat(registry.connect(tracking_uri), run_id)  # stops when the run ends
    return run_id


def end_abandoned_runs(tracking_uri: str, experiment: str, folder: str) -> None:
    """Mark KILLED, saying so, the runs of the batch writing ``folder`` that are RUNNING with no live job behind
    them (a job killed with SIGKILL, or on a node that was lost, cannot end its own run)."""
    from pipelines import registry
    from pipelines.liveness import live_driver

    client = registry.connect(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    query = f"tags.`{registry.JOB_TAG}` = '{BATCH_JOB}' and params.output = '{folder}'"
    for run in client.search_runs([found.experiment_id], f"{query} and attributes.status = 'RUNNING'"):
        if live_driver(run.data.tags) is None:
            registry.end_job_run(tracking_uri, run.info.run_id, {}, status="KILLED")
            log.warning("MLflow run %s of the batch writing %s was left RUNNING by a job that is gone (killed?): "
                        "marked KILLED", run.info.run_id, folder)  # fmt: skip


def end_stopped_run(config: Config, run_id: str, interrupted: bool) -> str:
    """Mark the batch's run KILLED (interrupted: Ctrl-C, SIGTERM) or FAILED; returns the status."""
    from pipelines import registry

    status = "KILLED" if interrupted else "FAILED"
    registry.end_job_run(registry.resolve_tracking_uri(config.tracking.tracking_uri), run_id, {}, status=status)
    return status


def finish(config: Config, context: JobContext, cohort: Cohort, jobs: list[SlideJob], run_id: str | None) -> dict:
    """Write the summary, close the batch's run, print the report; fail (exit non-zero) naming failed slides."""
    from pipelines import registry
    from unet import storage

    rows = [row(job) for job in jobs]
    table = to_csv(rows)
    storage.write_bytes(cohort.summary, table.encode())
    counts = {status: sum(r["status"] == status for r in rows) for status in (DONE, RESUMED, SKIPPED, FAILED)}
    seconds = time.perf_counter() - context.started
    if run_id is not None:
        megapixels = sum(job.stats.megapixels or 0 for job in jobs if job.state == DONE)
        metrics = {**{f"slides_{k}": v for k, v in counts.items()}, "seconds": seconds, "megapixels": megapixels}
        with tempfile.TemporaryDirectory() as folder:
            summary = Path(folder) / Path(cohort.summary).name
            summary.write_text(table)
            tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
            status = "FAILED" if counts[FAILED] else "FINISHED"
            registry.end_job_run(tracking_uri, run_id, metrics, (summary,), status=status)
    report(cohort, rows, counts, seconds, run_id)
    failed = [r for r in rows if r["status"] == FAILED]
    if failed:
        more = f"; and {len(failed) - 5} more (see {cohort.summary})" if len(failed) > 5 else ""
        named = "; ".join(r["reason"] for r in failed[:5]) + more
        raise UserError(f"{len(failed)} of {len(rows)} slides failed: {named}")
    return {**counts, "summary": cohort.summary, "mlflow_run_id": run_id, "seconds": seconds}


def row(job: SlideJob) -> dict:
    """The slide's line in the summary (a skipped slide's numbers are those its output recorded)."""
    stats = job.stats
    status = RESUMED if job.state == DONE and job.resumed else job.state
    return {
        "slide": stem(job.item.input),
        "status": status,
        "megapixels": "" if stats.megapixels is None else round(stats.megapixels, 3),
        "objects": "" if stats.objects is None else stats.objects,
        "seconds": "" if stats.seconds is None else round(stats.seconds, 2),
        "output": job.item.output if job.state != FAILED else "",
        "model_version": job.lineage.get("model_version") or job.lineage.get("model_uri", ""),
        **_resolution_columns(job),
        "reason": job.reason,
        "input": job.item.input,
    }


def _resolution_columns(job: SlideJob) -> dict:
    """Which level was read, the slide's and the output's pixel sizes, and how (empty where the slide failed
    before it was opened)."""
    resolution = job.resolution
    if resolution is None:
        return {"level": "", "slide_um_per_px": "", "um_per_px": "", "resolution": ""}
    sizes = (resolution.slide_pixel_size_um, resolution.pixel_size_um)
    slide, output = ("" if size is None else round(size, 5) for size in sizes)
    return {"level": resolution.level, "slide_um_per_px": slide, "um_per_px": output,
            "resolution": resolution.describe()}  # fmt: skip


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report(cohort: Cohort, rows: list[dict], counts: dict, seconds: float, run_id: str | None) -> None:
    """The batch in a few lines: counts, where the table is, which slides failed and why."""
    print()
    print(f"  slides          {len(rows)}: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n))
    if not counts[DONE] + counts[RESUMED]:
        print(f"  nothing to do   {counts[SKIPPED]} outputs were complete already (--overwrite redoes them)")
    print(f"  outputs         {cohort.folder}/NAME.ome.zarr")
    print(f"  summary         {cohort.summary}")
    print(f"  seconds         {seconds:.1f}")
    if run_id:
        print(f"  MLflow run      {run_id} (one nested run per slide)")
    for failure in (r for r in rows if r["status"] == FAILED):
        print(f"  failed          {failure['reason']}")
