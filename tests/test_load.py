"""Several jobs at once: inference jobs sharing one Dask cluster (two models, two settings, one worker process
serving them all), two jobs writing one output, two training jobs with one run name. Each finishes correctly or
is refused in one line; no output or MLflow run is corrupted. The locks and the per-worker model cache are also
tested directly (fast)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient

from pipelines import locks
from pipelines.checkpoints import recorded_by_ray
from pipelines.infer import tasks as infer_tasks
from pipelines.prepare import prepare
from tests.helpers import ROOT, environment, free_port, train_command
from tests.test_infer import infer
from unet.config import load_config
from unet.errors import UserError
from unet.inference import ChunkPredictor, InferenceSettings
from unet.model import UNet
from unet.model_files import load_weights, save_weights
from unet.slides import open_slide

SMALL = ("infer.chunk_size=256", "infer.tile_size=128")
BIN = Path(sys.executable).parent


# the locks, directly


HOLD = """
import sys, time
from pipelines import locks
locks.acquire(sys.argv[1], str)
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    target = str(tmp_path / "out.ome.zarr")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, target], cwd=ROOT, env=environment(), text=True,
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.Busy, match=rf"^busy: pid {holder.pid} on \S+ since \d{{4}}-"):
            locks.acquire(target, lambda who: f"busy: {who}")
        assert (tmp_path / ".out.ome.zarr.lock").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the kernel releases the lock
        holder.wait()
    lock = locks.acquire(target, lambda who: f"busy: {who}")
    assert locks.acquire(target, str) is lock  # the same process: shared
    locks.release(lock)
    assert not (tmp_path / ".out.ome.zarr.lock").exists() and lock.fd is None


def test_a_waiting_lock_gets_it_when_the_holder_releases(tmp_path: Path) -> None:
    target = str(tmp_path / "mlflow.db")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, target], cwd=ROOT, env=environment(), text=True,
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        threading.Timer(1.0, holder.send_signal, (signal.SIGKILL,)).start()
        started = time.monotonic()
        with locks.locked(target, str, wait=True) as lock:
            assert lock is not None and time.monotonic() - started >= 0.9
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / ".mlflow.db.lock").exists()


def test_a_job_refused_before_the_holder_wrote_its_name_still_names_it(tmp_path: Path) -> None:
    """The holder locks, then writes who it is: a job refused in between reads again (CI once got "holder
    unknown" when four jobs started at once)."""
    import fcntl
    import json

    target = str(tmp_path / "out.ome.zarr")
    path = locks.lock_file(target)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # locked, its name not yet written
    owner = json.dumps({"host": "node-7", "pid": 4242, "since": "2026-12-07 10:00:00"}).encode()
    threading.Timer(0.3, os.pwrite, (fd, owner, 0)).start()
    try:
        with pytest.raises(locks.Busy, match=r"^busy: pid 4242 on node-7 since 2026-12-07 10:00:00$"):
            locks.acquire(target, lambda who: f"busy: {who}")
    finally:
        os.close(fd)


def test_an_object_store_location_locks_a_file_on_this_machine() -> None:
    path = locks.lock_file("s3://bucket/out.ome.zarr/")
    assert path == locks.lock_file("s3://bucket/out.ome.zarr") and path.parent.name.startswith("unet-wsi-locks-")


# the model cache of a worker process, directly


def saved_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_weights(UNet(n_channels=3, n_classes=2, base_channels=4, depth=2).eval(), folder)


def test_jobs_sharing_a_worker_keep_their_models_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks of three jobs (two models, two settings) interleaved on four threads: each model loaded once, each
    task predicting with its own job's model; a fourth spec evicts the least recently used; a model folder
    written again is loaded again."""
    monkeypatch.setattr(infer_tasks, "_PREDICTORS", type(infer_tasks._PREDICTORS)())
    monkeypatch.setattr(infer_tasks, "LOADS", type(infer_tasks.LOADS)())
    a, b = saved_model(tmp_path / "a", 0), saved_model(tmp_path / "b", 1)
    specs = [infer_tasks.ModelSpec(str(a), None, InferenceSettings(tile=None), 0),
             infer_tasks.ModelSpec(str(b), None, InferenceSettings(tile=None), 0),
             infer_tasks.ModelSpec(str(a), None, InferenceSettings(tile=None, batch_size=2), 0)]  # fmt: skip
    image = np.random.default_rng(0).random((1, 3, 64, 64), np.float32)
    expected = []
    for spec in specs:
        with ChunkPredictor(load_weights(spec.model_uri), spec.settings) as alone:
            expected.append(alone.probabilities(image))
    errors = []

    def tasks(offset: int) -> None:
        for i in range(12):
            k = (i + offset) % 3
            got = infer_tasks._predictor(specs[k]).probabilities(image)
            if not np.array_equal(got, expected[k]):
                errors.append(k)

    threads = [threading.Thread(target=tasks, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and dict(infer_tasks.LOADS) == dict.fromkeys(specs, 1)
    fourth = infer_tasks.ModelSpec(str(b), None, InferenceSettings(tile=None, batch_size=3), 0)
    for spec in (specs[0], specs[2], specs[1]):  # whatever order the threads left: specs[0] the least recent
        infer_tasks._predictor(spec)
    infer_tasks._predictor(fourth)
    assert len(infer_tasks._PREDICTORS) == infer_tasks.MODELS_PER_WORKER
    assert infer_tasks._cached(infer_tasks._cache_key(specs[0])) is None
    saved_model(b, 2)  # trained again into the same folder
    os.utime(b / "weights.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    infer_tasks._predictor(specs[1])
    assert infer_tasks.LOADS[specs[1]] == 2


# inference jobs sharing one Dask cluster


@pytest.fixture(scope="module")
def small_slide(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 768 x 768 crop of the real slide: 9 chunks of 256."""
    path = tmp_path_factory.mktemp("load-slide") / "small.zarr"
    zarr.create_array(path, data=open_slide(cmu_slide).read(0, 768, 0, 768), chunks=(3, 256, 256), zarr_format=3)
    return path


def other_model(model: Path, folder: Path) -> Path:
    """Another model: the same network with its last bias raised, so it finds more foreground."""
    network = load_weights(model)
    with torch.no_grad():
        list(network.parameters())[-1].add_(0.5)
    return save_weights(network, folder)


def dask(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dask"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=environment(), start_new_session=True)  # fmt: skip


class Job:
    """``python -m pipelines.infer`` against a scheduler, its output and errors going to files."""

    def __init__(self, folder: Path, name: str, model: Path, slide: Path, output: Path, scheduler: str, *extra: str):
        cmd = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
        for item in (f"infer.model={model}", f"infer.input={slide}", f"infer.output={output}",
                     f"infer.scheduler={scheduler}", f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
                     *SMALL, *extra):  # fmt: skip
            cmd += [item] if item.startswith("--") else ["--set", item]
        self.log, self.errors = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.log, "w") as out, open(self.errors, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=folder, env=environment(), stdout=out, stderr=err,
                                         start_new_session=True)  # fmt: skip

    def error(self) -> str:
        return self.errors.read_text()


def arrays(output: Path) -> dict[str, np.ndarray]:
    """Every array of an output store (probability and labels, all levels), by path."""
    root = zarr.open_group(output, mode="r")
    return {name: np.asarray(array) for name, array in root.arrays()} | {
        f"labels/nuclei/{name}": np.asarray(array) for name, array in root["labels/nuclei"].arrays()
    }


def wait_for(condition, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.cluster
def test_jobs_sharing_a_dask_cluster_each_equal_a_job_run_alone(trained_model_dir, small_slide, tmp_path) -> None:
    """Jobs A (model 1), B (model 2), C (model 1, other settings) and A2 (model 1, --overwrite, A's output), all
    started at once against a scheduler with no workers yet: of A and A2 exactly one holds the output, the other
    is refused in one line, and so is a job resuming that output meanwhile. Then two workers of two threads
    start and serve every job. Each output equals the same job run alone, byte for byte; each has one finished
    MLflow run with its own parameters; no worker process loaded a model twice."""
    second = other_model(trained_model_dir, tmp_path / "second")
    address = f"tcp://127.0.0.1:{free_port()}"
    plans = {"A": (trained_model_dir, "A", ()), "B": (second, "B", ()),
             "C": (trained_model_dir, "C", ("infer.tile_size=256",)),
             "A2": (trained_model_dir, "A", ("--overwrite",))}  # fmt: skip
    output = {name: tmp_path / f"{out}.ome.zarr" for name, (_, out, _) in plans.items()}
    scheduler = dask("scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                     "--dashboard-address", "127.0.0.1:0")  # fmt: skip
    jobs, workers, resume = {}, [], None
    try:
        for name, (model, _, extra) in plans.items():
            jobs[name] = Job(tmp_path, name, model, small_slide, output[name], address, *extra)
        procs = {name: job.proc for name, job in jobs.items()}
        wait_for(lambda: all((tmp_path / f".{n}.ome.zarr.partial").exists() for n in "ABC"), [procs["B"], procs["C"]])
        wait_for(lambda: procs["A"].poll() is not None or procs["A2"].poll() is not None, [])
        refused = "A" if procs["A"].poll() is not None else "A2"
        holder = procs["A2" if refused == "A" else "A"]
        resume = Job(tmp_path, "resume", trained_model_dir, small_slide, output["A"], address, "--resume")
        resume.proc.wait(timeout=120)
        workers = [dask("worker", address, "--nthreads", "2", "--host", "127.0.0.1", "--name", f"w{i}")
                   for i in range(2)]  # fmt: skip
        for proc in procs.values():
            proc.wait(timeout=300)
        from distributed import Client

        with Client(address, timeout="10s") as client:
            loads = client.run(lambda: [(s.model_uri, s.settings.tile, n) for s, n in infer_tasks.LOADS.items()])
    finally:
        for proc in (*(job.proc for job in (*jobs.values(), resume) if job), *workers, scheduler):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for name, job in jobs.items():
        if name != refused:
            assert job.proc.returncode == 0, (name, job.error()[-3000:])
    for job in (jobs[refused], resume):
        errors = job.error()
        assert job.proc.returncode == 2 and errors.strip().count("\n") == 0, errors
        assert f"{output['A']} is being written by another job (pid {holder.pid} on " in errors, errors
    loaded = [(uri, tile) for worker in loads.values() for uri, tile, count in worker if count == 1]
    assert len(loaded) == sum(len(worker) for worker in loads.values()) and len(set(loaded)) == 3, loads
    assert any(len(worker) > 1 for worker in loads.values()), loads  # a worker process served several jobs

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unet").experiment_id], "tags.job = 'inference'")
    assert sorted(r.data.params["output"] for r in runs) == [str(output[n]) for n in "ABC"]
    for run in runs:
        name = Path(run.data.params["output"]).name.removesuffix(".ome.zarr")
        assert run.info.status == "FINISHED" and run.data.params["model_uri"] == str(plans[name][0]), name
        lineage = zarr.open_group(output[name], mode="r").attrs["unet_inference"]
        assert lineage["complete"] and lineage["mlflow_run_id"] == run.info.run_id
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".*.partial"))

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in "ABC":
        model, _, extra = plans[name]
        reference = alone / f"{name}.ome.zarr"
        assert infer(alone, model, small_slide, reference, *SMALL, *extra) == 0
        got, expected = arrays(output[name]), arrays(reference)
        assert got.keys() == expected.keys() and len(got) >= 4, name
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name} {key}")
    assert not np.array_equal(arrays(output["A"])["0"], arrays(output["B"])["0"])  # two models, two results


# two training jobs with one run name


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("load-train")
    prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}"]), previews=0)
    return folder


def test_a_run_driven_from_another_machine_is_recognised_by_its_heartbeat(tmp_path: Path) -> None:
    """What a job checks in MLflow before it starts or resumes a run (``pipelines.train.job.not_running_elsewhere``)."""
    from pipelines import liveness, registry
    from pipelines.train import job as train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(ROOT / "configs" / "train.yaml", ["train.run_name=shared", f"tracking.tracking_uri={uri}"])
    config.train.storage_path = str(tmp_path / "runs")
    client = registry.connect(uri)
    train.not_running_elsewhere(config, client)  # no experiment yet
    run_id, _ = registry.start_or_resume_run(client, config, uri, {}, {}, checkpointed=False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for driver, age, status, refused in [
            ("elsewhere 12", 10, "RUNNING", True),
            ("elsewhere 12", liveness.STALE_S + 5, "RUNNING", False),  # killed there: its heartbeat stopped
            ("elsewhere 12", 10, "FINISHED", False),
            (f"{socket.gethostname()} {sleeper.pid}", 10, "RUNNING", True),
            (f"{socket.gethostname()} 999999999", 10, "RUNNING", False),  # killed here: no such process
        ]:
            registry.set_tags(client, run_id, {liveness.DRIVER_TAG: driver, liveness.HEARTBEAT_TAG: time.time() - age})
            client.update_run(run_id, status=status)
            if refused:
                with pytest.raises(UserError, match=r"^training run 'shared' is already running \(pid \d+ on "):
                    train.not_running_elsewhere(config, client)
            else:
                train.not_running_elsewhere(config, client)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
@pytest.mark.cluster
def test_two_training_jobs_with_one_run_name(workspace: Path) -> None:
    """Started at once on a fresh MLflow database: one trains and registers, the other is refused in one line
    before it starts Ray or touches MLflow; one FINISHED run, one model version, one checkpoint. Run again after,
    the command finds the run finished, as it always did."""
    cmd = train_command(workspace, "twin", 1, "tracking.promote=false")
    procs = [subprocess.Popen(cmd, cwd=workspace, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]  # fmt: skip
    try:
        results = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 2], [r[1][-3000:] for r in results]
    winner = next(i for i, proc in enumerate(procs) if proc.returncode == 0)
    errors = results[1 - winner][1]
    assert errors.strip().count("\n") == 0, errors
    assert f"training run 'twin' is already running (pid {procs[winner].pid} on " in errors, errors
    assert "epochs          1" in results[winner][0]

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("unet").experiment_id
    (run,) = client.search_runs([experiment], "tags.`ray.run_name` = 'twin'")
    assert run.info.status == "FINISHED" and run.data.tags["driver"].endswith(f" {procs[winner].pid}")
    (version,) = client.search_model_versions("name = 'unet-test'")
    assert version.run_id == run.info.run_id and run.data.tags["registered_version"] == str(version.version)
    assert recorded_by_ray(workspace / "runs" / "twin") == 1
    assert not (workspace / "runs" / ".twin.lock").exists()

    again = subprocess.run(cmd, cwd=workspace, env=environment(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run 'twin' already finished; its model is models:/unet-test/1" in again.stdout
    (run,) = client.search_runs([experiment], "tags.`ray.run_name` = 'twin'")
    assert run.info.status == "FINISHED" and len(client.search_model_versions("name = 'unet-test'")) == 1
