"""Beyond one process: inference on a Dask cluster of separate `dask scheduler` / `dask worker`
processes that survives losing a worker mid-job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers import ROOT, environment, free_port
from tests.test_infer import infer, stored

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # several servers: `make test-cluster`
BIN = Path(sys.executable).parent


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dask"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=environment(), start_new_session=True)  # fmt: skip


def test_inference_survives_a_killed_dask_worker(trained_model_dir, cmu_ome_zarr, tmp_path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0")
    workers = [start("worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--name", f"w{i}") for i in range(2)]
    output = tmp_path / "cluster.ome.zarr"
    cmd = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    for item in (f"infer.model={trained_model_dir}", f"infer.input={cmu_ome_zarr}", f"infer.output={output}",
                 "infer.chunk_size=256", "infer.tile_size=128", f"infer.scheduler={address}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"):  # fmt: skip
        cmd += ["--set", item]
    try:
        job = subprocess.Popen(cmd, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
        done = tmp_path / ".cluster.ome.zarr.partial" / "_work" / "done_predict"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if done.exists() and np.asarray(zarr.open_array(done, mode="r")).sum() >= 10:
                break
            time.sleep(0.1)
        os.killpg(workers[0].pid, signal.SIGKILL)  # the nanny and its worker: their chunks must be redone elsewhere
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, log[-3000:]
    finally:
        for proc in (*workers, scheduler):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    reference = tmp_path / "local.ome.zarr"
    assert infer(tmp_path, trained_model_dir, cmu_ome_zarr, reference, "infer.chunk_size=256",
                 "infer.tile_size=128") == 0  # fmt: skip
    for a, b in zip(stored(output), stored(reference), strict=True):
        np.testing.assert_array_equal(a, b)
