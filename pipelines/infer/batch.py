"""What a batch of slides leaves behind: the summary table, the report page, the batch's MLflow run.

The summary ``OUTPUT/batch_summary.csv`` has one row per slide: slide, status (done, resumed, skipped,
failed), its flags (``unet.receipt``: its own, and where it is an outlier of the cohort), size in Mpx, objects,
its receipt's measures, wall, compute and GPU seconds, Mpx/s, device, output, model version, resolution, reason
(why it failed) and input. It is rewritten by every run of the batch, so it always describes the whole cohort, as
does ``OUTPUT/report.html`` (``pipelines.infer.report``), rewritten as slides finish. In MLflow the batch is one
run (tag ``job: inference-batch``) with both as artifacts and one nested run per slide segmented (tag ``flags``).
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
MEASURES = ("tissue_mm2", "objects_per_mm2", "object_area_um2_median", "uncertain_share", "empty_tissue_chunk_share")
COSTS = ("seconds", "compute_seconds", "gpu_seconds", "mpx_per_s")
COLUMNS = ("slide", "status", "flags", "megapixels", "objects", *MEASURES, *COSTS, "device", "output", "model_version",
           "level", "slide_um_per_px", "um_per_px", "resolution", "reason", "input")  # fmt: skip
REPORT_EVERY_S = 5.0  # while the batch runs, the report is rewritten at most this often
REPORT = "report.html"  # in the cohort's folder
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local tracking database, the report's run links


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
    """Write the summary and the report, flag the cohort's outliers in their MLflow runs, close the batch's run,
    print the report; fail (exit non-zero) naming failed slides."""
    from pipelines import registry
    from unet import storage

    rows = summary_rows(jobs, config.infer.outlier_z)
    table = to_csv(rows)
    storage.write_bytes(cohort.summary, table.encode())
    page = Report(config, cohort, jobs).write(final=True) if config.infer.report else None
    counts = {status: sum(r["status"] == status for r in rows) for status in (DONE, RESUMED, SKIPPED, FAILED)}
    flagged = sum(bool(r["flags"]) for r in rows)
    seconds = time.perf_counter() - context.started
    if run_id is not None:
        tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
        _flag_runs(tracking_uri, jobs, rows)
        megapixels = sum(job.stats.megapixels or 0 for job in jobs if job.state == DONE)
        metrics = {**{f"slides_{k}": v for k, v in counts.items()}, "slides_flagged": flagged, "seconds": seconds,
                   "megapixels": megapixels}  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            summary = Path(folder) / Path(cohort.summary).name
            summary.write_text(table)
            artifacts = (summary,) + ((_copy(page, Path(folder)),) if page else ())
            status = "FAILED" if counts[FAILED] else "FINISHED"
            registry.end_job_run(tracking_uri, run_id, metrics, artifacts, status=status)
    report(cohort, rows, counts, seconds, run_id, page)
    failed = [r for r in rows if r["status"] == FAILED]
    if failed:
        more = f"; and {len(failed) - 5} more (see {cohort.summary})" if len(failed) > 5 else ""
        named = "; ".join(r["reason"] for r in failed[:5]) + more
        raise UserError(f"{len(failed)} of {len(rows)} slides failed: {named}")
    return {**counts, "flagged": flagged, "summary": cohort.summary, "report": page, "mlflow_run_id": run_id,
            "seconds": seconds}  # fmt: skip


def _copy(location: str, folder: Path) -> Path:
    from unet import storage

    local = folder / storage.basename(location)
    local.write_bytes(storage.read_bytes(location))
    return local


def _flag_runs(tracking_uri: str, jobs: list[SlideJob], rows: list[dict]) -> None:
    """Each slide's MLflow run gets its flags, the cohort's included (its own were set when it was logged; a skipped
    slide's run may hold an earlier cohort's)."""
    from pipelines import registry
    from pipelines.infer.slide import FLAGS_TAG, flags_text

    client = registry.connect(tracking_uri)
    for job, row in zip(jobs, rows, strict=True):
        if job.run_id and (row["flags"] != job.stats.flags or job.state == SKIPPED):
            registry.set_tags(client, job.run_id, {FLAGS_TAG: flags_text(row["flags"])})


def summary_rows(jobs: list[SlideJob], outlier_z: float) -> list[dict]:
    """Every slide's summary row, its flags being its own and those it has as an outlier of the cohort (the
    slides with a receipt, skipped ones included; ``unet.receipt.cohort_flags``)."""
    from unet.receipt import NO_TISSUE, cohort_flags, flag_kind

    rows = [row(job) for job in jobs]
    compared = [i for i, job in enumerate(jobs) if job.stats.receipt
                and NO_TISSUE not in map(flag_kind, job.stats.flags)]  # fmt: skip
    outliers = cohort_flags({i: jobs[i].stats.as_dict() for i in compared}, outlier_z)
    for index, flags in outliers.items():
        rows[index]["flags"] = rows[index]["flags"] + flags
    return rows


def row(job: SlideJob) -> dict:
    """The slide's line in the summary (a skipped slide's numbers are those its output recorded); ``flags`` is a
    list (``to_csv`` joins it)."""
    stats = job.stats.as_dict()
    status = RESUMED if job.state == DONE and job.resumed else job.state
    return {
        "slide": stem(job.item.input),
        "status": status,
        "flags": list(job.stats.flags),
        "megapixels": _round(stats.get("megapixels"), 3),
        "objects": stats.get("objects", ""),
        **{key: _round(stats.get(key), 4) for key in (*MEASURES, *COSTS)},
        "device": stats.get("device", ""),
        "output": job.item.output if job.state != FAILED else "",
        "model_version": job.lineage.get("model_version") or job.lineage.get("model_uri", ""),
        **_resolution_columns(job),
        "reason": job.reason,
        "input": job.item.input,
    }


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(value, digits)


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
    from pipelines.infer.slide import flags_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "flags": flags_text(r["flags"]) if r["flags"] else ""} for r in rows)
    return buffer.getvalue()


def report(cohort: Cohort, rows: list[dict], counts: dict, seconds: float, run_id: str | None, page: str | None):
    """The batch in a few lines: counts, where the table and the report are, which slides failed or were flagged."""
    print()
    print(f"  slides          {len(rows)}: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n))
    if not counts[DONE] + counts[RESUMED]:
        print(f"  nothing to do   {counts[SKIPPED]} outputs were complete already (--overwrite redoes them)")
    print(f"  outputs         {cohort.folder}/NAME.ome.zarr")
    print(f"  summary         {cohort.summary}")
    if page:
        print(f"  report          {page}")
    print(f"  seconds         {seconds:.1f}")
    if run_id:
        print(f"  MLflow run      {run_id} (one nested run per slide)")
    for failure in (r for r in rows if r["status"] == FAILED):
        print(f"  failed          {failure['reason']}")
    for flagged in (r for r in rows if r["flags"]):
        print(f"  flagged         {flagged['slide']}: {'; '.join(flagged['flags'])}")


class Report:
    """``OUTPUT/report.html`` of a batch (``pipelines.infer.report``): ``write`` it whole; ``update``, called as
    slides finish, rewrites it at most every ``REPORT_EVERY_S`` seconds. Thumbnails are made once per output."""

    def __init__(self, config: Config, cohort: Cohort, jobs: list[SlideJob]) -> None:
        self.config, self.cohort, self.jobs = config, cohort, jobs
        self.location = f"{cohort.folder.rstrip('/')}/{REPORT}"
        self.thumbnails: dict[str, str] = {}
        self.written = 0.0
        self.runs = _run_links(config)

    def update(self) -> None:
        if time.monotonic() - self.written >= REPORT_EVERY_S:
            try:
                self.write(final=False)
            except Exception as exc:  # a report not rewritten must not stop the batch
                log.warning("%s not rewritten: %s", self.location, exc)

    def write(self, final: bool) -> str:
        """Write the page; returns where."""
        from pipelines.infer.report import render
        from unet import storage

        rows = [self._row(job, summary) for job, summary in
                zip(self.jobs, summary_rows(self.jobs, self.config.infer.outlier_z), strict=True)]  # fmt: skip
        done = sum(r["status"] in (DONE, RESUMED, SKIPPED) for r in rows)
        facts = [f"{len(rows)} slides: {done} segmented, {sum(r['status'] == FAILED for r in rows)} failed, "
                 f"{sum(bool(r['flags']) for r in rows)} flagged", f"input {self.config.infer.input}",
                 f"model {self.config.infer.model}", f"summary table {Path(self.cohort.summary).name}"]  # fmt: skip
        page = render(f"Segmentation of {self.cohort.folder}", facts, rows, final)
        storage.write_bytes(self.location, page.encode())
        self.written = time.monotonic()
        return self.location

    def _row(self, job: SlideJob, summary: dict) -> dict:
        from pipelines.infer.output import QC_PICTURE
        from unet import storage

        row = {**summary, "status": "pending" if job.to_do else summary["status"], "run_id": job.run_id}
        row["run"] = self.runs(job.run_id) if job.run_id else None
        if job.state in (DONE, SKIPPED):
            row["output"] = _relative(job.item.output, self.cohort.folder)
            picture = f"{job.item.output.rstrip('/')}/{QC_PICTURE}"
            if job.thumbnail:  # made when the slide was finished
                self.thumbnails[picture] = job.thumbnail
            elif picture not in self.thumbnails:  # a skipped slide's, read once ("": it has none)
                from pipelines.infer.report import thumbnail

                found = storage.exists(picture)
                self.thumbnails[picture] = thumbnail(storage.read_bytes(picture)) if found else ""
            if self.thumbnails[picture]:
                row |= {"thumbnail": self.thumbnails[picture], "picture": _relative(picture, self.cohort.folder)}
        return row


def _relative(location: str, folder: str) -> str:
    """``location`` as a link from a page in ``folder``: relative where it lies inside."""
    prefix = folder.rstrip("/") + "/"
    return location[len(prefix) :] if location.startswith(prefix) else location


def _run_links(config: Config):
    """A function giving an MLflow run's page (None while the experiment is not found): on the tracking server, or
    for a database or folder on ``mlflow ui``'s default address (``MLFLOW_UI``)."""
    from pipelines import registry

    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    found: dict[str, str] = {}

    def link(run_id: str) -> str | None:
        if "id" not in found:
            try:
                experiment = registry.connect(tracking_uri).get_experiment_by_name(config.tracking.experiment)
            except Exception:  # no links rather than no report
                log.debug("no MLflow experiment for the report's links", exc_info=True)
                return None
            if experiment is None:
                return None
            found["id"] = experiment.experiment_id
        return f"{base}/#/experiments/{found['id']}/runs/{run_id}"

    return link
