"""The cluster path: a Ray head started with `ray start` on loopback with token auth, the training
job submitted with `ray job submit --working-dir .`, and the model version it registered."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.prepare import prepare
from tests.helpers import ROOT, SMALL, VENV_BIN, environment, free_port
from unet.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a Ray cluster started with `ray start`


@pytest.fixture
def ray_head(tmp_path: Path):
    """A one-node Ray cluster on 127.0.0.1 with token authentication; yields (dashboard URL, env, GCS port)."""
    env = environment()
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"  # jobs run `python` from the head's environment
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    dashboard = free_port()
    port = free_port()
    start = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
    start += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env, port
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_trains_and_registers_a_model(ray_head, tmp_path: Path) -> None:
    address, env, port = ray_head
    store = prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={tmp_path / 'he.zarr'}"]), previews=0)
    # The job runs in a copy of the working directory: everything it keeps must be an absolute path.
    overrides = [*SMALL, f"data.store={store}", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=job",
                 "train.epochs=2", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.registered_model=unet-job"]  # fmt: skip
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              "python", "-m", "pipelines.train", "--config", "configs/train.yaml"]  # fmt: skip
    result = subprocess.run(
        submit + [arg for o in overrides for arg in ("--set", o)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output and "epoch 2/2" in output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("unet-job", "champion")
    assert str(version.version) == "1" and float(version.tags["val/f1"]) >= 0.0

    # Token auth is on: a client with the wrong token is turned away.
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    listing = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=wrong,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listing.returncode != 0
    assert "auth" in (listing.stdout + listing.stderr).lower()

    # A job run on this machine without RAY_ADDRESS starts a Ray of its own: it does not join this cluster (which
    # `ray.init()` alone would do, with the cluster's resources and token); RAY_ADDRESS=auto joins it.
    probe = ("import ray; from pipelines.train.job import init_ray; init_ray(); "
             "print('gcs', ray.get_runtime_context().gcs_address); ray.shutdown()")  # fmt: skip
    alone = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
    joined = {**alone, "RAY_ADDRESS": "auto"}
    addresses = []
    for probe_env in (alone, joined):
        run = subprocess.run([str(VENV_BIN / "python"), "-c", probe], env=probe_env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        addresses.append(run.stdout.split("gcs ")[-1].strip())
    ports = [int(address.rsplit(":", 1)[1]) for address in addresses]  # the host part is the node's address
    assert ports[1] == port != ports[0]
