"""Model logging, registration, aliases and loading against a real MLflow sqlite store (no Ray)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch

from pipelines.registry import (
    connect,
    load_model,
    log_and_register,
    promote,
    resolve_tracking_uri,
    using_tracking_uri,
)
from unet.errors import UserError
from unet.model import UNet
from unet.training import save_weights


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return resolve_tracking_uri("sqlite:///mlflow.db")


def new_run(uri: str) -> str:
    client = connect(uri)
    experiment = (
        client.create_experiment("registry-test")
        if not client.get_experiment_by_name("registry-test")
        else (client.get_experiment_by_name("registry-test").experiment_id)
    )
    return client.create_run(experiment).info.run_id


def test_relative_sqlite_uri_is_made_absolute(tracking_uri: str, tmp_path: Path) -> None:
    assert tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_champion_moves_only_when_the_metric_improves(tracking_uri: str) -> None:
    client = connect(tracking_uri)
    champions = []
    for score in (0.5, 0.4, 0.6, 0.6):
        model = UNet(3, 2, base_channels=4, depth=2)
        version = log_and_register(new_run(tracking_uri), model, "unet-reg", {"val/f1": score}, tracking_uri)
        promote(client, "unet-reg", version, "val/f1", score)
        assert client.get_model_version_by_alias("unet-reg", "candidate").version == int(version)
        champions.append(int(client.get_model_version_by_alias("unet-reg", "champion").version))
    assert champions == [1, 1, 3, 3]  # ties do not move the champion


def test_versions_load_back_identically_without_unpickling(tracking_uri: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = UNet(1, 3, bilinear=True, base_channels=4, depth=3)
    version = log_and_register(new_run(tracking_uri), model, "unet-load", {}, tracking_uri)
    promote(connect(tracking_uri), "unet-load", version, "val/f1", 0.1)
    for uri in (f"models:/unet-load/{version}", "models:/unet-load@champion", "models:/unet-load@candidate"):
        loaded = load_model(uri, tracking_uri=tracking_uri)
        assert loaded.architecture() == model.architecture()
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
        )
    with using_tracking_uri(tracking_uri):
        predictor = mlflow.pyfunc.load_model("models:/unet-load@champion")
    probabilities = predictor.predict(np.random.rand(2, 1, 32, 32).astype(np.float32))
    assert probabilities.shape == (2, 3, 32, 32) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    # a plain folder written by save_weights loads too
    assert load_model(str(save_weights(model, tmp_path / "local"))).architecture() == model.architecture()


def test_unknown_models_are_clear_errors(tracking_uri: str) -> None:
    with pytest.raises(UserError, match=r"cannot load model models:/nothing@champion"):
        load_model("models:/nothing@champion", tracking_uri=tracking_uri)
    with pytest.raises(UserError, match=r"MLflow tracking server unreachable at http://127\.0\.0\.1:9"):
        connect("http://127.0.0.1:9")


def test_registry_calls_leave_no_global_tracking_uri_behind(tracking_uri: str) -> None:
    """Loading or registering with one tracking URI must not redirect later jobs of the process."""
    import os

    log_and_register(new_run(tracking_uri), UNet(3, 2, base_channels=4, depth=2), "unet-env", {}, tracking_uri)
    load_model("models:/unet-env/1", tracking_uri=tracking_uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ
