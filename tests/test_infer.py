"""pipelines.infer end to end on a local Dask cluster: real slide in, OME-Zarr out, seamless tiles,
seam-merged labels, resume after Ctrl-C, no silent overwrite, lineage, and clear errors."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import zarr
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import ndimage as ndi

from pipelines.infer.__main__ import cli
from pipelines.infer.cluster import dashboard, start_dask
from pipelines.infer.output import OBJECTS, QC_PICTURE
from pipelines.models import log_and_register
from pipelines.registry import connect, promote
from tests.helpers import ROOT, assert_valid_ngff, environment, free_port, in_the_foreground
from tests.test_tiling import same_partition, whole_image_probability
from unet.config import load_config
from unet.devices import compute_precision
from unet.model_files import load_weights
from unet.slides import open_slide
from unet.visualize import colorize

pytestmark = pytest.mark.slow


def infer(tmp_path: Path, model: str | Path, image: Path, output: Path, *extra: str) -> int:
    args = ["--config", str(ROOT / "configs" / "infer.yaml"), "--set", f"infer.model={model}"]
    args += ["--set", f"infer.input={image}", "--set", f"infer.output={output}"]
    args += ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for item in extra:
        args += [item] if item.startswith("--") and "=" not in item else ["--set", item]
    return cli(args)


def stored(output: Path) -> tuple[np.ndarray, np.ndarray]:
    root = zarr.open_group(output, mode="r")
    return np.asarray(root["0"])[0], np.asarray(root["labels/nuclei/0"])


def test_real_slide_in_ome_zarr_out(trained_model_dir, cmu_ome_zarr, tmp_path) -> None:
    output = tmp_path / "cmu-seg.ome.zarr"
    # holes are filled within a chunk only (unet.instances): without, labels are the whole foreground's components
    assert (
        infer(tmp_path, trained_model_dir, cmu_ome_zarr, output, "infer.chunk_size=512", "infer.fill_holes=false") == 0
    )
    probability, labels = stored(output)
    slide = open_slide(cmu_ome_zarr)
    assert probability.shape == labels.shape == (slide.height, slide.width) and probability.dtype == np.uint8
    # NGFF validators and readers see a valid image with a label image
    assert_valid_ngff(output)
    attrs = zarr.open_group(output, mode="r").attrs
    assert attrs["ome"]["version"] == "0.5" and attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "c"
    # instance ids: unique slide-wide, consecutive, one per connected object even across chunk seams
    expected, count = ndi.label(probability > round(0.5 * 255))
    assert count > 100 and labels.max() == count and same_partition(labels, expected)
    spans = ndi.find_objects(labels)
    crossing = sum(
        1 for s in spans if s[0].start // 512 != (s[0].stop - 1) // 512 or s[1].start // 512 != (s[1].stop - 1) // 512
    )
    assert crossing > 5  # there were objects on seams, and each kept one id
    # lineage in the output and in MLflow
    lineage = attrs["unet_inference"]
    assert (
        lineage["complete"] and lineage["input"] == str(cmu_ome_zarr) and lineage["model_uri"] == str(trained_model_dir)
    )
    assert lineage["config"]["infer.chunk_size"] == "512" and lineage["code_version"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(lineage["mlflow_run_id"])
    assert run.data.params["input"] == str(cmu_ome_zarr) and run.data.metrics["mpx_per_s"] > 0
    assert run.data.metrics["chunks"] == 30  # 6 x 5 chunks of 512
    # the QC picture, in the output and the run: the slide's lowest level (371 x 278) with its objects outlined,
    # beside the probability's heat map, both drawn from the output's level 3 (8 x 8 of its pixels each)
    picture = np.asarray(Image.open(output / QC_PICTURE))
    low = open_slide(cmu_ome_zarr, slide.levels - 1)
    assert picture.shape == (low.height, 2 * low.width + 4, 3)
    outlined, heat = picture[:, : low.width], picture[:, low.width + 4 :]
    assert ((outlined == [0, 255, 0]).all(axis=-1)).sum() > 500  # outlines drawn
    drawn = np.asarray(zarr.open_group(output, mode="r")["3"])[0] / 255  # its pixels: 8 of level 0 a side
    # each picture pixel shows the output pixel at its centre
    scale = slide.width / low.width / 8  # output pixels per picture pixel
    rows, cols = (np.floor((np.arange(n) + 0.5) * scale).astype(int) for n in (low.height, low.width))
    np.testing.assert_array_equal(heat, colorize(drawn[rows[:, None], cols[None, :]], vmax=1.0, cmap="magma"))
    artifacts = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(run.info.run_id)
    assert QC_PICTURE in [a.path for a in artifacts]
    stats = lineage["stats"]  # the one-off start-up apart from the segmentation's throughput
    assert 0 < stats["startup_seconds"] < stats["total_seconds"] and 0 < stats["seconds"] < stats["total_seconds"]
    assert_receipt(stats, slide, low, probability, labels, output, chunk=512)
    assert run.data.metrics["tissue_mm2"] == stats["tissue_mm2"] and run.data.params["device"] == stats["device"]
    assert run.data.tags["flags"] == (" | ".join(stats["flags"]) or "none")


def assert_receipt(stats: dict, slide, low, probability: np.ndarray, labels: np.ndarray, output: Path, chunk: int):
    """The slide's receipt against computations of its own from the slide and the output, whole (the pipeline
    counts chunk by chunk): tissue from Otsu's threshold on the lowest level, each pixel taking its mask pixel."""
    from skimage.filters import threshold_otsu

    gray = low.read(0, low.height, 0, low.width).astype(np.float32).mean(axis=0)
    mask = gray < threshold_otsu(gray)
    size = slide.pixel_size_um
    area = mask.sum() * (slide.height / low.height) * (slide.width / low.width) * size**2 / 1e6
    assert stats["tissue_from"] == "tissue mask" and stats["tissue_mm2"] == pytest.approx(area, rel=0.01)
    objects = len(pd.read_parquet(output / OBJECTS))
    assert stats["objects_per_mm2"] == pytest.approx(objects / stats["tissue_mm2"])
    shapes = zip(labels.shape, mask.shape, strict=True)
    rows, cols = (np.floor((np.arange(n) + 0.5) * m / n).astype(int) for n, m in shapes)
    tissue = mask[rows[:, None], cols[None, :]]
    assert stats["tissue_mm2"] == pytest.approx(tissue.sum() * size**2 / 1e6)
    uncertain = (probability > 0.3 * 255) & (probability < 0.7 * 255) & tissue
    assert stats["uncertain_share"] == pytest.approx(uncertain.sum() / tissue.sum())
    blocks = [(tissue[y : y + chunk, x : x + chunk].any(), labels[y : y + chunk, x : x + chunk].any())
              for y in range(0, labels.shape[0], chunk) for x in range(0, labels.shape[1], chunk)]  # fmt: skip
    empty = [not has_objects for has_tissue, has_objects in blocks if has_tissue]
    assert stats["empty_tissue_chunk_share"] == pytest.approx(sum(empty) / len(empty))
    computed_in = compute_precision("auto", "cpu")  # infer.precision's default, as this CPU computes it
    assert stats["compute_seconds"] > 0 and stats["gpu_seconds"] == 0
    assert stats["device"].endswith(f" cores), {computed_in}")


@pytest.mark.parametrize(
    ("chunk", "extra"),
    [
        (100, ("infer.precision=fp32",)),  # the default: one pass per chunk; 100 is not a multiple of 16
        (128, ("infer.precision=fp32", "infer.tile_size=64", "infer.batch_size=3")),
        (100, ("infer.precision=bf16", "infer.workers=2")),  # two worker processes instead of one in the job
    ],
)
def test_pipeline_output_equals_whole_image_inference(trained_model_dir, cmu_slide, tmp_path, chunk, extra) -> None:
    rgb = open_slide(cmu_slide).read(1000, 1210, 700, 893)  # 210 x 193: not multiples of 16
    zarr.create_array(tmp_path / "crop.zarr", data=np.moveaxis(rgb, 0, -1), chunks=(64, 64, 3), zarr_format=2)
    output = tmp_path / "crop-seg.zarr"
    code = infer(tmp_path, trained_model_dir, tmp_path / "crop.zarr", output, f"infer.chunk_size={chunk}",
                 "infer.probability_dtype=float16", *extra)  # fmt: skip
    assert code == 0
    probability, _ = stored(output)
    precision = extra[0].split("=")[1]
    expected = whole_image_probability(load_weights(trained_model_dir), rgb.astype(np.float32) / 255, precision)
    np.testing.assert_allclose(probability.astype(np.float32), expected, atol=2e-3)  # float16 storage


def run_infer_process(tmp_path, model, image, output, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    for item in (f"infer.model={model}", f"infer.input={image}", f"infer.output={output}", "infer.chunk_size=256",
                 "infer.tile_size=128", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"):  # fmt: skip
        cmd += ["--set", item]
    return subprocess.Popen(cmd + list(extra), cwd=tmp_path, env=environment(), start_new_session=True,
                            preexec_fn=in_the_foreground, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def chunk_files(output: Path) -> dict[str, bytes]:
    """Every file of an output but its metadata (which records its own run): all levels, the objects table."""
    files = (p for p in output.rglob("*") if p.is_file() and p.name != "zarr.json")
    return {str(p.relative_to(output)): p.read_bytes() for p in files}


def test_interrupted_job_resumes_and_matches_an_uninterrupted_run(trained_model_dir, cmu_slide, tmp_path) -> None:
    """Ctrl-C mid-slide: the job stops at once, says how to go on, and ``--resume`` finishes the same output as an
    uninterrupted run. (A batch killed with SIGKILL resumes too: tests/test_batch_infer.py.) On a 1536-px square of
    the real slide's tissue: 36 chunks of 256 px."""
    image = tmp_path / "tissue.zarr"
    zarr.create_array(image, data=open_slide(cmu_slide).read(700, 2236, 340, 1876), chunks=(3, 512, 512))
    output = tmp_path / "resumed.ome.zarr"
    partial = tmp_path / ".resumed.ome.zarr.partial"
    proc = run_infer_process(tmp_path, trained_model_dir, image, output)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = partial / "_work" / "done_predict"
        if done.exists() and int(np.asarray(zarr.open_array(done, mode="r")).sum()) >= 8:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole job
    interrupted = time.monotonic()
    stopped, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.monotonic() - interrupted < 30, stopped[-2000:]
    assert stopped.strip().splitlines()[-1] == (
        "python -m pipelines.infer: interrupted; the partial output is kept: run the same command with --resume to "
        f"continue {output}"
    )
    finished_before = int(np.asarray(zarr.open_array(partial / "_work" / "done_predict", mode="r")).sum())
    assert 8 <= finished_before < 36 and not output.exists()

    again = run_infer_process(tmp_path, trained_model_dir, image, output)
    message, _ = again.communicate(timeout=300)
    assert again.returncode == 2 and "pass --resume to continue" in message

    resumed = run_infer_process(tmp_path, trained_model_dir, image, output, "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    reference = tmp_path / "uninterrupted.ome.zarr"
    fresh = run_infer_process(tmp_path, trained_model_dir, image, reference)
    assert fresh.wait(timeout=600) == 0
    assert chunk_files(output) == chunk_files(reference)  # byte for byte
    assert not partial.exists()


def spawned_since(started: float) -> list[psutil.Process]:
    """Processes started by multiprocessing's spawn (Dask's worker processes, post-processing processes) since
    ``started`` (a time.time()) that are still alive."""
    found = []
    for process in psutil.process_iter(["cmdline", "create_time"]):
        if process.info["create_time"] >= started and "spawn_main" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_post_processing_processes_write_the_same_output(
    trained_model_dir, cmu_slide, tmp_path, capfd, monkeypatch, workers
):
    """``infer.postprocess_processes`` (a GPU worker's default: its chunks labelled and measured in processes of their
    own, off the model's GIL): the same output, byte for byte, as labelling in the chunk's own task; in the job's
    process (1 worker) and in worker processes (2), which start them too and shut them down as they close. No pixels
    are sent to them (pickled, they held the GIL): they read the chunk back."""
    from pipelines.infer import tasks

    image = tmp_path / "crop.zarr"
    zarr.create_array(image, data=open_slide(cmu_slide).read(300, 900, 200, 1100), chunks=(3, 256, 256))
    outputs = {n: tmp_path / f"out{n}.ome.zarr" for n in (0, 2)}
    sent, submit = [], tasks._POSTPROCESSING.submit  # seen where the tasks run in this process (1 worker)
    monkeypatch.setattr(
        tasks._POSTPROCESSING, "submit", lambda n, f, *a: sent.append(len(pickle.dumps(a))) or submit(n, f, *a)
    )
    started = time.time()
    for processes, output in outputs.items():
        assert infer(tmp_path, trained_model_dir, image, output, "infer.chunk_size=256", f"infer.workers={workers}",
                     f"infer.postprocess_processes={processes}") == 0  # fmt: skip
    in_tasks, in_processes = chunk_files(outputs[0]), chunk_files(outputs[2])
    assert in_processes == in_tasks and any("tables" in name for name in in_tasks)
    assert stored(outputs[2])[1].max() > 10  # objects across the 256-px seams
    assert "daemonic" not in capfd.readouterr().err  # they did start their own processes (no fallback)
    assert workers > 1 or 0 < max(sent) < 256 * 256, sent  # less than one chunk's probability: no pixels
    if workers > 1:  # every worker process and its post-processing processes gone (none orphaned)
        _, alive = psutil.wait_procs(spawned_since(started), timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]


@pytest.mark.parametrize(("stop", "workers"), [("ctrl-c", 2), ("kill", 1), ("kill", 2)])
def test_a_stopped_job_leaves_no_process_behind(trained_model_dir, cmu_slide, tmp_path, stop, workers) -> None:
    """Ctrl-C or SIGKILL mid-slide, with post-processing processes in the job's process (1 worker, a GPU node's
    layout) or in worker processes (2): the job stops at once and every process it started ends with it."""
    image = tmp_path / "tissue.zarr"
    zarr.create_array(image, data=open_slide(cmu_slide).read(700, 2236, 340, 1876), chunks=(3, 512, 512))
    proc = run_infer_process(tmp_path, trained_model_dir, image, tmp_path / "out.ome.zarr", "--set",
                             f"infer.workers={workers}", "--set", "infer.postprocess_processes=1")  # fmt: skip
    done, started = tmp_path / ".out.ome.zarr.partial" / "_work" / "done_predict", []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # until chunks were labelled in those processes
        started = psutil.Process(proc.pid).children(recursive=True)
        if done.exists() and np.asarray(zarr.open_array(done, mode="r")).sum() >= 2 and len(started) > workers:
            break
        time.sleep(0.1)
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole job
    else:
        proc.kill()
    signalled = time.monotonic()
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == (130 if stop == "ctrl-c" else -signal.SIGKILL) and time.monotonic() - signalled < 30
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    assert "still alive" not in printed, printed  # no worker had to be killed by its Nanny


def test_existing_output_is_not_overwritten_silently(trained_model_dir, cmu_slide, tmp_path) -> None:
    image = tmp_path / "small.zarr"
    zarr.create_array(image, data=open_slide(cmu_slide).read(0, 96, 0, 128), chunks=(3, 64, 64))
    output = tmp_path / "out.zarr"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    assert infer(tmp_path, trained_model_dir, image, output, "infer.chunk_size=64", "infer.tile_size=64") == 2
    assert (output / "precious.txt").read_text() == "keep me"
    assert infer(tmp_path, trained_model_dir, image, output, "infer.chunk_size=64", "infer.tile_size=64",
                 "--overwrite") == 0  # fmt: skip
    assert not (output / "precious.txt").exists() and stored(output)[0].shape == (96, 128)


def test_level_choice_options_and_tissue_mask(trained_model_dir, cmu_ome_zarr, tmp_path) -> None:
    output = tmp_path / "level1.ome.zarr"
    code = infer(tmp_path, trained_model_dir, cmu_ome_zarr, output, "infer.level=1", "infer.chunk_size=256",
                 "infer.tile_size=128", "infer.tta=true", "infer.blend=gaussian", "infer.tissue_mask=true")  # fmt: skip
    assert code == 0
    level1 = open_slide(cmu_ome_zarr, level=1)
    probability, labels = stored(output)
    assert probability.shape == (level1.height, level1.width)
    stats = zarr.open_group(output, mode="r").attrs["unet_inference"]["stats"]
    assert stats["chunks"] == 30 and stats["chunks_skipped"] >= 1  # white background skipped
    assert labels.max() > 0


def registered(tmp_path: Path, trained_model_dir: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = connect(uri)
    run = client.create_run(client.create_experiment("reg")).info.run_id
    version = log_and_register(run, load_weights(trained_model_dir), "unet-infer", {"val/f1": 0.5}, uri)
    promote(client, "unet-infer", version, wins=True)
    return version


def test_registered_model_by_alias_and_bad_inputs(trained_model_dir, cmu_slide, tmp_path, capsys) -> None:
    version = registered(tmp_path, trained_model_dir)
    rgb = open_slide(cmu_slide).read(0, 64, 0, 64)
    zarr.create_array(tmp_path / "rgb.zarr", data=rgb, chunks=(3, 64, 64))
    small = ["infer.chunk_size=64", "infer.tile_size=64"]
    assert infer(tmp_path, "models:/unet-infer@champion", tmp_path / "rgb.zarr", tmp_path / "a.zarr", *small) == 0
    lineage = zarr.open_group(tmp_path / "a.zarr", mode="r").attrs["unet_inference"]
    assert lineage["model_uri"] == f"models:/unet-infer/{version}" and lineage["model"] == "models:/unet-infer@champion"

    gray = tmp_path / "gray.zarr"
    zarr.create_array(gray, data=rgb[0], chunks=(64, 64))
    nan = tmp_path / "nan.zarr"
    values = rgb.astype(np.float32) / 255
    values[1, 30, 30] = np.nan
    zarr.create_array(nan, data=values, chunks=(3, 64, 64))
    cases = [
        ("models:/unet-infer@champion", tmp_path / "missing.zarr", "missing.zarr"),
        ("models:/unet-infer@champion", gray, "has 1 channels but the model expects 3"),
        ("models:/unet-infer@nope", tmp_path / "rgb.zarr", "cannot resolve model models:/unet-infer@nope"),
        ("models:/unet-infer@champion", nan, "NaN or infinite pixels"),
    ]
    capsys.readouterr()
    for model, image, message in cases:
        assert infer(tmp_path, model, image, tmp_path / "bad.zarr", *small) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_local_dask_cluster_listens_on_loopback_only(workers: int) -> None:
    config = load_config(ROOT / "configs" / "infer.yaml", [f"infer.workers={workers}"])
    client, cluster = start_dask(config.infer)
    try:
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = {c.laddr.ip for p in processes for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening and listening <= {"127.0.0.1"}, listening
        assert len(client.scheduler_info()["workers"]) == workers
        assert dashboard(client, cluster).startswith("http://127.0.0.1:")
    finally:
        client.close()
        cluster.close()


def test_unreachable_scheduler_is_a_clear_error(trained_model_dir, cmu_slide, tmp_path, capsys) -> None:
    zarr.create_array(tmp_path / "rgb.zarr", data=open_slide(cmu_slide).read(0, 64, 0, 64), chunks=(3, 64, 64))
    code = infer(tmp_path, trained_model_dir, tmp_path / "rgb.zarr", tmp_path / "o.zarr", "infer.chunk_size=64",
                 "infer.tile_size=64", "infer.scheduler=tcp://127.0.0.1:9")  # fmt: skip
    assert code == 2 and "Dask scheduler unreachable at tcp://127.0.0.1:9" in capsys.readouterr().err


def test_the_jobs_client_is_not_the_processs_default_scheduler() -> None:
    """The job's chunk tasks go to its client by name; the library's other Dask computations in the same process
    (``pipelines.prepare``'s, say, whose graphs need not pickle) still run on local threads."""
    import dask
    import dask.array as da

    from pipelines.infer.cluster import start_dask
    from unet.config import InferConfig

    client, cluster = start_dask(InferConfig())
    try:
        assert client.submit(sum, [20, 22]).result(timeout=30) == 42
        assert dask.config.get("scheduler", None) is None
        lock = threading.Lock()  # in the graph: it cannot be pickled, so it is computed here, not sent anywhere
        lazy = da.from_delayed(dask.delayed(lambda held: np.full(3, 7))(lock), (3,), int)
        assert dask.compute(lazy.sum()) == (21,)
    finally:
        client.close()
        cluster.close()


def test_existing_dask_cluster_by_scheduler_address(trained_model_dir, cmu_slide, tmp_path, caplog) -> None:
    """`--set infer.scheduler=tcp://...` sends the chunks to a cluster started apart from the job."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=environment())  # fmt: skip
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:  # `dask worker` runs its worker in a daemonic process (Dask's default)
        worker = subprocess.Popen([str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                   "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=log,
                                  env=environment())  # fmt: skip
    try:
        image = tmp_path / "rgb.zarr"
        zarr.create_array(image, data=open_slide(cmu_slide).read(0, 200, 0, 300), chunks=(3, 64, 64))
        code = infer(tmp_path, trained_model_dir, image, tmp_path / "remote.zarr", "infer.chunk_size=128",
                     "infer.tile_size=64", f"infer.scheduler=tcp://127.0.0.1:{port}",
                     "infer.postprocess_processes=1")  # fmt: skip
        assert code == 0  # a daemonic worker cannot start them: it labels in its threads, and says so once
        assert worker_log.read_text().count("DASK_DISTRIBUTED__WORKER__DAEMON=False") == 1
        # and the job says so too, where its user reads
        said = [r.getMessage() for r in caplog.records if r.name == "infer" and "daemonic" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("Dask worker tcp://127.0.0.1:"), said
        caplog.clear()
        local = tmp_path / "local.zarr"
        assert infer(tmp_path, trained_model_dir, image, local, "infer.chunk_size=128", "infer.tile_size=64") == 0
        assert "daemonic" not in caplog.text  # no post-processing processes asked for (the CPU's default)
        for a, b in zip(stored(tmp_path / "remote.zarr"), stored(local), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            proc.wait(timeout=30)
