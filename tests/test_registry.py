"""Model logging, registration, aliases and loading against a real MLflow sqlite store (no Ray)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch

from pipelines.infer.spec import ModelSpec
from pipelines.infer.tasks import _predictor
from pipelines.models import DIGESTS_TAG, OBJECT_AREA_TAG, PIXEL_SIZE_TAG, load_model, log_and_register
from pipelines.registry import connect, promote, resolve_tracking_uri, using_tracking_uri
from tests.helpers import free_port, mlflow_server
from unet.config import InferConfig
from unet.errors import UserError
from unet.inference import ChunkPredictor, InferenceSettings, predict_image
from unet.model import UNet
from unet.model_files import file_digests, save_weights


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


def test_champion_moves_only_on_a_win_against_the_champion_still_in_place(tracking_uri: str) -> None:
    """``promote`` crowns a winner only if the champion it was compared with is still the champion."""
    client = connect(tracking_uri)

    def register() -> str:
        return log_and_register(new_run(tracking_uri), UNet(3, 2, base_channels=4, depth=2), "unet-reg", {},
                                tracking_uri)  # fmt: skip

    first, second, third = register(), register(), register()
    assert promote(client, "unet-reg", first, wins=True)  # no champion yet, none compared with
    assert not promote(client, "unet-reg", second, wins=False, scored_champion=first)
    assert client.get_model_version_by_alias("unet-reg", "candidate").version == int(second)
    assert client.get_model_version_by_alias("unet-reg", "champion").version == int(first)
    assert not promote(client, "unet-reg", third, wins=True, scored_champion=None)  # it was compared with no one
    assert client.get_model_version_by_alias("unet-reg", "champion").version == int(first)
    assert promote(client, "unet-reg", third, wins=True, scored_champion=first)
    assert client.get_model_version_by_alias("unet-reg", "champion").version == int(third)


def test_versions_load_back_identically_without_unpickling(tracking_uri: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = UNet(1, 3, bilinear=True, base_channels=4, depth=3)
    version = log_and_register(new_run(tracking_uri), model, "unet-load", {}, tracking_uri)
    promote(connect(tracking_uri), "unet-load", version, wins=True)
    for uri in (f"models:/unet-load/{version}", "models:/unet-load@champion", "models:/unet-load@candidate"):
        loaded = load_model(uri, tracking_uri=tracking_uri)
        assert loaded.architecture() == model.architecture()
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
        )
    with using_tracking_uri(tracking_uri):
        predictor = mlflow.pyfunc.load_model("models:/unet-load@champion")
    images = np.random.rand(2, 1, 32, 32).astype(np.float32)
    probabilities = predictor.predict(images)  # the one prediction path: what pipelines.infer would give
    with ChunkPredictor(model, InferenceSettings.from_config(InferConfig())) as reference:
        expected = [predict_image(reference, image, None, InferConfig().chunk) for image in images]
    assert probabilities.shape == (2, 32, 32)
    np.testing.assert_array_equal(probabilities, np.stack(expected))
    # a plain folder written by save_weights loads too
    assert load_model(str(save_weights(model, tmp_path / "local"))).architecture() == model.architecture()


def test_pyfunc_models_take_the_documented_model_config(tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    """``mlflow.pyfunc.load_model(uri, model_config={...})`` predicts with those settings (MLflow only passes keys the
    model was logged with: the infer section's prediction settings, those its validation used by default)."""
    torch.manual_seed(2)
    model = UNet(1, 2, base_channels=4, depth=2)
    trained_with = InferConfig(tta=True)
    version = log_and_register(new_run(tracking_uri), model, "unet-config", {}, tracking_uri, trained_with)
    images = np.random.rand(1, 1, 48, 40).astype(np.float32)

    def expected(infer: InferConfig) -> np.ndarray:
        with ChunkPredictor(model, InferenceSettings.from_config(infer)) as reference:
            return np.stack([predict_image(reference, image, None, infer.chunk) for image in images])

    asked = {"device": "cpu", "precision": "fp32", "tta": False, "chunk_size": 32}
    with using_tracking_uri(tracking_uri), caplog.at_level("WARNING"):
        as_logged = mlflow.pyfunc.load_model(f"models:/unet-config/{version}").predict(images)
        as_asked = mlflow.pyfunc.load_model(f"models:/unet-config/{version}", model_config=asked).predict(images)
    assert not [r for r in caplog.records if "ignored" in r.getMessage()], caplog.text  # nothing MLflow dropped
    np.testing.assert_array_equal(as_logged, expected(trained_with))
    np.testing.assert_array_equal(as_asked, expected(InferConfig(**asked)))
    assert not np.array_equal(as_logged, as_asked)  # fp32 without mirroring: another prediction


def test_a_version_is_tagged_with_what_its_model_records_of_its_training_data(tracking_uri: str) -> None:
    """The pixel size and object areas in a model's model.json are also its version's tags (searchable); a model
    that records none gets none."""
    objects = {"count": 125, "p1": 9.5, "p5": 14.0, "p25": 31.25, "p50": 45.5, "p75": 60.0, "p95": 88.5, "p99": 110.0}
    model = UNet(3, 2, base_channels=4, depth=2, pixel_size_um=0.25, object_area_um2=objects)
    version = log_and_register(new_run(tracking_uri), model, "unet-sizes", {}, tracking_uri)
    tags = connect(tracking_uri).get_model_version("unet-sizes", version).tags
    assert tags[PIXEL_SIZE_TAG] == "0.25" and json.loads(tags[OBJECT_AREA_TAG]) == objects
    assert " " not in tags[OBJECT_AREA_TAG]  # compact
    loaded = load_model(f"models:/unet-sizes/{version}", tracking_uri=tracking_uri)
    assert (loaded.pixel_size_um, loaded.object_area_um2) == (0.25, objects)
    plain = log_and_register(new_run(tracking_uri), UNet(3, 2, base_channels=4, depth=2), "unet-sizes", {},
                             tracking_uri)  # fmt: skip
    untagged = connect(tracking_uri).get_model_version("unet-sizes", plain).tags
    assert not {PIXEL_SIZE_TAG, OBJECT_AREA_TAG} & set(untagged)


def test_every_loader_refuses_a_version_changed_on_disk(tracking_uri: str, tmp_path: Path) -> None:
    """The registry's files changed behind its back (here the local artifact folder; in a team, the bucket):
    refused in one line naming the version and the file, before anything is read."""
    run_id = new_run(tracking_uri)
    version = log_and_register(run_id, UNet(3, 2, base_channels=4, depth=2), "unet-forged", {}, tracking_uri)
    client = connect(tracking_uri)
    location = Path(client.get_model_version_download_uri("unet-forged", version).removeprefix("file://"))
    recorded = json.loads(client.get_model_version("unet-forged", version).tags[DIGESTS_TAG])
    assert recorded == file_digests(location)  # every file, as stored
    weights = location / "data" / "unet" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    uri = f"models:/unet-forged/{version}"
    message = rf"^model version unet-forged/{version} \({{}}\) is not the model that was registered: file "
    message += r"data/unet/weights\.safetensors has changed \(its sha256 is \w+\.\.\., was \w+\.\.\.\); not loaded$"
    for name in (uri, f"runs:/{run_id}/model"):
        with pytest.raises(UserError, match=message.format(re.escape(name))):
            load_model(name, tracking_uri=tracking_uri)
    with using_tracking_uri(tracking_uri), pytest.raises(UserError, match=message.format(re.escape(uri))):
        mlflow.pyfunc.load_model(uri)
    with pytest.raises(UserError, match=message.format(re.escape(uri))):  # a Dask worker's first task
        _predictor(ModelSpec(uri, tracking_uri, InferenceSettings.from_config(InferConfig()), 1))
    weights.unlink()
    with pytest.raises(UserError, match=r"file data/unet/weights\.safetensors is missing; not loaded$"):
        load_model(uri, tracking_uri=tracking_uri)


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


@contextlib.contextmanager
def failing_proxy(upstream: str, failing: str) -> Iterator[str]:
    """An HTTP proxy to ``upstream`` that answers 503 to GET requests whose path contains ``failing`` (a server
    having a bad moment) and passes every other request through."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            if self.command == "GET" and failing in self.path:
                self.send_response(503)
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command)
            request.add_header("Content-Type", self.headers.get("Content-Type", "application/json"))
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, payload = response.status, response.read()
            except urllib.error.HTTPError as error:
                status, payload = error.code, error.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.cluster  # a real MLflow server process behind a failing proxy: make test-cluster
def test_a_server_error_is_not_read_as_no_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only "alias not found" means there is no champion; a 503 while reading it must not crown a worse model."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the 503 is for good here: no need to wait
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as url:
        client = connect(url)
        first = log_and_register(new_run(url), UNet(3, 2, base_channels=4, depth=2), "unet-503", {"val/f1": 0.9}, url)
        assert promote(client, "unet-503", first, wins=True)
        worse = log_and_register(new_run(url), UNet(3, 2, base_channels=4, depth=2), "unet-503", {"val/f1": 0.1}, url)
        failure = pytest.raises(UserError, match=r"cannot read the champion of unet-503 .*nothing promoted")
        with failing_proxy(url, "/registered-models/alias") as proxy, failure:
            promote(connect(proxy), "unet-503", worse, wins=True, scored_champion=first)
        assert str(client.get_model_version_by_alias("unet-503", "champion").version) == str(first)


def test_connect_leaves_the_environment_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    with pytest.raises(UserError, match="unreachable"):
        connect(f"http://127.0.0.1:{free_port()}")
    assert dict(os.environ) == before
