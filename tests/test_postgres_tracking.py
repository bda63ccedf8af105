"""A real tracking database: an MLflow server on PostgreSQL (started here, on loopback), used by the
project's registry code to register a model version and load it back by alias."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipelines.models import load_model, log_and_register
from pipelines.registry import connect, promote
from tests.helpers import get_json, mlflow_server, postgres_database
from unet.model import UNet

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1; yields its SQLAlchemy URL."""
    with postgres_database() as url:
        yield url


def test_mlflow_server_on_postgres_registers_and_loads_a_model(postgres: str, tmp_path: Path) -> None:
    with mlflow_server(postgres, tmp_path, "--artifacts-destination", str(tmp_path / "artifacts")) as uri:
        client = connect(uri)
        run_id = client.create_run(client.create_experiment("pg")).info.run_id
        torch.manual_seed(0)
        model = UNet(3, 2, base_channels=4, depth=2)
        version = log_and_register(run_id, model, "unet-pg", {"val/f1": 0.7}, uri)
        assert promote(client, "unet-pg", version, wins=True)
        loaded = load_model("models:/unet-pg@champion", tracking_uri=uri)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        alias = get_json(f"{uri}/api/2.0/mlflow/registered-models/alias?name=unet-pg&alias=champion")
        assert alias["model_version"]["version"] == version
