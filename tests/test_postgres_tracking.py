"""A real tracking database: an MLflow server on PostgreSQL (started here, on loopback), used by the
project's registry code to register a model version and load it back by alias."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipelines.registry import connect, load_model, log_and_register, promote
from tests.helpers import free_port, get_json, mlflow_server
from unet.model import UNet

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL server binary {name!r} not found: install the postgresql package (.ci/run does)")
    return found


def as_user(user: str, command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as ``user`` when we are root."""
    return ["runuser", "-u", user, "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1; yields its SQLAlchemy URL."""
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    root = Path(tempfile.mkdtemp(prefix="unet-pg-"))  # outside pytest's root-only tmp tree
    data, sockets = root / "data", root / "sockets"
    data.mkdir()
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (root, data, sockets):
            shutil.chown(path, user)
    subprocess.run(as_user(user, [postgres_binary("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"]),
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        as_user(user, [postgres_binary("postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                       "-k", str(sockets)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = [postgres_binary("pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
        deadline = time.monotonic() + 60
        while subprocess.run(ready, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def test_mlflow_server_on_postgres_registers_and_loads_a_model(postgres: str, tmp_path: Path) -> None:
    with mlflow_server(postgres, tmp_path, "--artifacts-destination", str(tmp_path / "artifacts")) as uri:
        client = connect(uri)
        run_id = client.create_run(client.create_experiment("pg")).info.run_id
        torch.manual_seed(0)
        model = UNet(3, 2, base_channels=4, depth=2)
        version = log_and_register(run_id, model, "unet-pg", {"val/f1": 0.7}, uri)
        assert promote(client, "unet-pg", version, "val/f1", 0.7)
        loaded = load_model("models:/unet-pg@champion", tracking_uri=uri)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        alias = get_json(f"{uri}/api/2.0/mlflow/registered-models/alias?name=unet-pg&alias=champion")
        assert alias["model_version"]["version"] == version
