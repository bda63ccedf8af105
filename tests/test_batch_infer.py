"""pipelines.infer over a cohort: slides of several formats made from the real sample data, a store with a
corrupt chunk, one with the wrong channel count and one with a NaN pixel. Killed mid-batch and re-run, every
good output equals a single-slide run byte for byte, the bad ones are reported with their reasons, a third run
does nothing; MLflow nests a run per slide."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from mlflow.tracking import MlflowClient

from pipelines.convert import convert
from tests.helpers import ROOT, environment, in_the_foreground
from tests.test_infer import chunk_files, infer
from unet.samples import fetch_samples
from unet.slides import open_slide

pytestmark = pytest.mark.slow
SMALL = ("infer.chunk_size=256", "infer.tile_size=128")
GOOD = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def cohort(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Zarr v2 (YXC), Zarr v3 (CYX), OME-Zarr 0.4 and 0.5, a TIFF; bad: a store with a corrupt chunk, a 1-channel
    TIFF, a float store with a NaN pixel."""
    work = tmp_path_factory.mktemp("cohort")
    folder = work / "slides"
    folder.mkdir()
    cmu = open_slide(cmu_slide)
    he = fetch_samples(["he_nuclei", "fluo_nuclei"])
    yxc = np.moveaxis(cmu.read(0, 600, 0, 700), 0, -1)
    zarr.create_array(folder / "a.zarr", data=yxc, chunks=(256, 256, 3), zarr_format=2)
    zarr.create_array(folder / "b.zarr", data=cmu.read(600, 1624, 0, 768), chunks=(3, 256, 256), zarr_format=3)
    tifffile.imwrite(work / "c.tif", np.moveaxis(cmu.read(1000, 1500, 800, 1500), 0, -1))
    convert(work / "c.tif", folder / "c.ome.zarr", chunk=256, ngff="0.4")
    convert(he["he_nuclei"] / "images" / "crop01.tif", folder / "d.ome.zarr", chunk=128, ngff="0.5")
    shutil.copy(he["he_nuclei"] / "images" / "crop03.tif", folder / "e.tif")
    zarr.create_array(folder / "f.zarr", data=cmu.read(0, 512, 0, 512), chunks=(3, 256, 256))
    next(p for p in (folder / "f.zarr" / "c").rglob("*") if p.is_file()).write_bytes(b"not a chunk")
    shutil.copy(he["fluo_nuclei"] / "images" / "dsb2018_0.tif", folder / "g.tif")
    values = cmu.read(0, 256, 0, 256).astype(np.float32) / 255
    values[1, 100, 100] = np.nan
    zarr.create_array(folder / "h.zarr", data=values, chunks=(3, 128, 128))
    return folder


def batch_process(tmp_path: Path, model: Path, cohort: Path, output: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    for item in (f"infer.model={model}", f"infer.input={cohort}", f"infer.output={output}", *SMALL,
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"):  # fmt: skip
        cmd += ["--set", item]
    return subprocess.Popen(cmd, cwd=tmp_path, env=environment(), start_new_session=True, preexec_fn=in_the_foreground,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def complete_outputs(output: Path) -> list[str]:
    return sorted(p.name.removesuffix(".ome.zarr") for p in output.glob("[!.]*.ome.zarr"))


def summary(output: Path) -> dict[str, dict]:
    with open(output / "batch_summary.csv") as handle:
        return {row["slide"]: row for row in csv.DictReader(handle)}


def modified(output: Path) -> dict[Path, int]:
    """When each file of the outputs was last written (the summary and the report are rewritten by every run)."""
    rewritten = {"batch_summary.csv", "report.html"}
    return {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file() and p.name not in rewritten}


def test_killed_batch_resumes_equal_to_single_runs(trained_model_dir, cohort, tmp_path, capsys) -> None:
    output = tmp_path / "out"
    proc = batch_process(tmp_path, trained_model_dir, cohort, output)
    deadline = time.monotonic() + 300
    page = output / "report.html"  # written as soon as a slide is finished, to be watched during the run
    while time.monotonic() < deadline and proc.poll() is None and not page.exists():
        time.sleep(0.02)
    during = page.read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = complete_outputs(output)
    assert 1 <= len(finished_before) < len(GOOD), finished_before  # killed mid-batch
    assert 'http-equiv="refresh"' in during and 'class="status-pending"' in during  # reloads; slides to come

    # the re-run does what is missing; the bad slides are reported and the job fails at the end naming them
    assert infer(tmp_path, trained_model_dir, cohort, output, *SMALL) == 2
    err = capsys.readouterr()
    assert "3 of 8 slides failed" in err.err.splitlines()[-1]
    assert "f.zarr" in err.err and "g.tif has 1 channels but the model expects 3" in err.err
    assert "h.zarr: NaN or infinite pixels" in err.err
    table = summary(output)
    assert {name: table[name]["status"] for name in finished_before} == dict.fromkeys(finished_before, "skipped")
    assert {table[name]["status"] for name in GOOD if name not in finished_before} <= {"done", "resumed"}
    assert {table[name]["status"] for name in "fgh"} == {"failed"} and "f.zarr" in table["f"]["reason"]
    assert complete_outputs(output) == list(GOOD)

    # every output equals a single-slide run of the same slide, byte for byte
    for name in GOOD:
        source = next(cohort.glob(f"{name}.*"))
        reference = tmp_path / "single" / f"{name}.ome.zarr"
        assert infer(tmp_path, trained_model_dir, source, reference, *SMALL) == 0
        assert chunk_files(output / f"{name}.ome.zarr") == chunk_files(reference), name
        assert int(table[name]["objects"]) == zarr.open_group(reference).attrs["unet_inference"]["stats"]["objects"]

    # MLflow: the batch's run, one nested run per slide segmented by it, each output's lineage pointing there
    batch_run = next(line.split()[2] for line in err.out.splitlines() if line.strip().startswith("MLflow run"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    nested = client.search_runs(
        [client.get_run(batch_run).info.experiment_id], f"tags.mlflow.parentRunId = '{batch_run}'"
    )
    assert len(nested) == len(GOOD) - len(finished_before)
    assert client.get_run(batch_run).info.status == "FAILED"  # three slides failed
    # the killed job could not end its run: the re-run found it RUNNING without a live job and ended it
    batches = client.search_runs([client.get_run(batch_run).info.experiment_id], "tags.job = 'inference-batch'")
    assert sorted(run.info.status for run in batches) == ["FAILED", "KILLED"]
    resumed = next(name for name in GOOD if name not in finished_before)
    lineage = zarr.open_group(output / f"{resumed}.ome.zarr").attrs["unet_inference"]
    assert lineage["mlflow_batch_run_id"] == batch_run and lineage["mlflow_run_id"] in {r.info.run_id for r in nested}

    # a third run does nothing and says so; outputs are untouched
    before = modified(output)
    assert infer(tmp_path, trained_model_dir, cohort, output, *SMALL) == 2
    out = capsys.readouterr().out
    assert "nothing to do   5 outputs were complete already" in out
    assert modified(output) == before
    assert {row["status"] for name, row in summary(output).items() if name in GOOD} == {"skipped"}


def test_ctrl_c_stops_a_batch_and_ends_its_mlflow_run(trained_model_dir, cohort, tmp_path) -> None:
    slides, output = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    for name in ("a.zarr", "b.zarr", "c.ome.zarr"):
        (slides / name).symlink_to(cohort / name)
    proc = batch_process(tmp_path, trained_model_dir, slides, output)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not complete_outputs(output):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("python -m pipelines.infer: interrupted; MLflow batch run ") and " marked KILLED; " in last
    assert last.endswith("run the same command again to continue the batch (complete outputs are skipped, "
                         "interrupted ones resumed)")  # fmt: skip
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unet").experiment_id], "tags.job = 'inference-batch'")
    assert run.info.status == "KILLED" and run.info.run_id in last
    assert 1 <= len(complete_outputs(output)) < 3


def test_overwrite_redoes_every_slide(trained_model_dir, cohort, tmp_path, capsys) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for name in ("d.ome.zarr", "e.tif"):
        (shutil.copytree if name.endswith("zarr") else shutil.copy)(cohort / name, good / name)
    output = tmp_path / "out"
    assert infer(tmp_path, trained_model_dir, good, output, *SMALL) == 0
    first = {name: chunk_files(output / f"{name}.ome.zarr") for name in ("d", "e")}
    assert infer(tmp_path, trained_model_dir, good, output, *SMALL, "--overwrite") == 0
    assert {row["status"] for row in summary(output).values()} == {"done"}
    assert {name: chunk_files(output / f"{name}.ome.zarr") for name in ("d", "e")} == first
    # a changed config is not mistaken for a complete output: it is refused, naming the way out
    assert infer(tmp_path, trained_model_dir, good, output, *SMALL, "infer.threshold=0.6") == 2
    assert "--overwrite replaces it" in capsys.readouterr().err


def test_the_stream_keeps_a_bounded_number_of_tasks(trained_model_dir, cohort, tmp_path) -> None:
    """However many chunks a cohort has, the scheduler holds a bounded number of tasks: no giant graph is built
    up front."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    from pipelines.infer.cluster import start_dask
    from pipelines.infer.job import set_up
    from pipelines.infer.slide import finish, plan
    from pipelines.infer.stream import stream
    from pipelines.infer.tasks import use_model
    from unet.config import load_config

    class PeakTasks(SchedulerPlugin):
        def __init__(self, scheduler) -> None:
            self.scheduler, self.peak = scheduler, 0

        def transition(self, key, start, finish, *args, **kwargs) -> None:
            self.peak = max(self.peak, len(self.scheduler.tasks))

    good = tmp_path / "good"
    good.mkdir()
    shutil.copytree(cohort / "b.zarr", good / "b.zarr")  # 4 x 3 chunks
    shutil.copytree(cohort / "c.ome.zarr", good / "c.ome.zarr")  # 2 x 3 chunks
    overrides = [f"infer.model={trained_model_dir}", f"infer.input={good}", f"infer.output={tmp_path / 'out'}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *SMALL]  # fmt: skip
    config = load_config(ROOT / "configs" / "infer.yaml", overrides)
    context, cohort_ = set_up(config)
    jobs = [plan(item, context) for item in cohort_.items]
    chunks = sum(len(job.keys) for job in jobs)
    client, cluster = start_dask(config.infer)
    use_model(context.model_spec, context.model)
    peak = PeakTasks(cluster.scheduler)
    cluster.scheduler.add_plugin(peak)

    def on_done(job, segmented) -> None:
        # the objects' partial sums come in grid order, whatever order their tasks finished in: they are added up in
        # the same order on every run (the objects table is the same to the last bit)
        origins = [(part["bbox_y0"].min() // job.spec.chunk, part["bbox_x0"].min() // job.spec.chunk)
                   for part in segmented.parts if len(part["id"])]  # fmt: skip
        assert len(origins) > 1 and origins == sorted(origins)
        finish(job, context, segmented)

    try:
        stream(client, jobs, 3, None, on_done, lambda job, error: pytest.fail(str(error)))
    finally:
        client.close()
        cluster.close()
    # 36 tasks in all; known to the scheduler at once: the 3 in flight, a slide's seam mapping, and finished
    # tasks whose release is still on its way
    assert chunks == 18 and 0 < peak.peak <= 2 * 3, peak.peak
    assert complete_outputs(tmp_path / "out") == ["b", "c"]
