"""A registered model cannot change behind its alias. A real `mlflow server --app-name unet-basic-auth` (runs, registry
and accounts in sqlite; artifacts proxied to a folder, as infra/mlflow proxies them to S3) with the accounts
`python -m pipelines.mlflow_auth` sets up: every route that writes artifacts is refused, for every account, inside a
registered version's files, and the digests it was registered with cannot be rewritten; what is not registered is
written as before; a version whose files were changed behind the server (on its disk, as in a bucket) is refused
by every loader in one line. (The same routes on PostgreSQL, after a real training job: tests/test_mlflow_auth.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest

from pipelines import registry
from pipelines.infer.spec import ModelSpec
from pipelines.infer.tasks import _predictor
from pipelines.mlflow_app import check_write_routes
from pipelines.models import DIGESTS_TAG, LOADER_MODULE, load_model, log_and_register
from pipelines.prepare import prepare
from tests.accounts import (
    ADMIN,
    EXPERIMENT,
    MANAGER,
    MODEL,
    WRITER,
    account,
    accounts_server,
    call,
    client_environment,
    refusals,
    write_routes,
)
from tests.helpers import ROOT
from unet.config import InferConfig, load_config
from unet.errors import UserError
from unet.inference import InferenceSettings
from unet.model import UNet
from unet.model_files import file_digests, save_weights

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a server and its accounts: about two minutes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("immutable")
    with accounts_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}", f"sqlite:///{tmp / 'auth.db'}") as server:
        yield server


def register(server: dict, alias: str | None = None) -> tuple[str, str, str]:
    """A small model registered by the service account as training registers it: (version, run id, the proxy path
    of its files); ``alias`` set by the service account (``champion`` by a manager)."""
    url = server["url"]
    with account(url, *server[WRITER]) as writer:
        run_id = writer.create_run(registry.experiment_id(writer, EXPERIMENT, url)).info.run_id
        version = log_and_register(run_id, UNet(3, 2, base_channels=4, depth=2), MODEL, {"val/f1": 0.5}, url)
        location = writer.get_model_version_download_uri(MODEL, version).removeprefix("mlflow-artifacts:/")
        if alias and alias != registry.CHAMPION:
            writer.set_registered_model_alias(MODEL, alias, version)
    if alias == registry.CHAMPION:
        with account(url, *server[MANAGER]) as manager:
            manager.set_registered_model_alias(MODEL, alias, version)
    return version, run_id, location


@pytest.fixture(scope="module")
def champion(server: dict) -> dict:
    """The champion, and a version registered from a run's artifacts (as MLflow 2 registered models)."""
    version, run_id, location = register(server, registry.CHAMPION)
    with account(server["url"], *server[WRITER]) as writer, tempfile.TemporaryDirectory() as tmp:
        writer.log_artifacts(run_id, str(save_weights(UNet(3, 2, base_channels=4, depth=2), Path(tmp))), "legacy")
        legacy = writer.create_model_version(MODEL, f"runs:/{run_id}/legacy", run_id=run_id).version
        info = writer.get_model_version(MODEL, version)
    return {"version": info, "run_id": run_id, "location": location, "legacy": legacy}


def files_of(server: dict, location: str) -> dict[str, str]:
    return file_digests(server["tmp"] / "artifacts" / location)


def test_no_account_can_change_a_registered_versions_files(server: dict, champion: dict) -> None:
    """Each write route x each account. Basic-auth refuses some already (a reader anything, the service account a
    deletion, a manager writes to the experiment); every refusal an admin gets, and the service account's forged
    weights (what the issue found), come from the rule."""
    location, run_id = champion["location"], champion["run_id"]
    before = files_of(server, location), files_of(server, f"1/{run_id}/artifacts/legacy")
    routes = write_routes(champion["version"], location, legacy=(run_id, "legacy"))
    assert len(routes) == 14
    results = refusals(server, routes)
    for (name, method, path), (status, body) in results.items():
        assert status == 403, (name, method, path, status, body)
        if name == ADMIN:  # past every permission: refused by the rule, which says why
            assert "which cannot change" in body or "is written once" in body, (method, path, body)
    forged = results[WRITER, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{location}/data/unet/weights.safetensors"]
    assert forged[1] == json.dumps(
        {"error_code": "PERMISSION_DENIED", "message": f"this path holds files of registered model version "
         f"{MODEL}/{champion['version'].version}, which cannot change: register a new version instead (or delete "
         "this one to let its files go)"}, separators=(",", ":"))  # fmt: skip
    assert (files_of(server, location), files_of(server, f"1/{run_id}/artifacts/legacy")) == before
    with account(server["url"], *server[ADMIN]) as admin:
        recorded = json.loads(admin.get_model_version(MODEL, champion["version"].version).tags[DIGESTS_TAG])
    assert recorded == before[0] and "data/unet/weights.safetensors" in recorded and "MLmodel" in recorded


def test_what_is_not_registered_is_written_as_before(server: dict, champion: dict) -> None:
    url, run_id, writer = server["url"], champion["run_id"], server[WRITER]
    assert call(url, f"/api/2.0/mlflow-artifacts/artifacts/1/{run_id}/artifacts/notes.txt", writer, method="PUT",
                data=b"a run's own artifact")[0] == 200  # fmt: skip
    assert call(url, f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}&path=more/notes.txt", writer,
                method="POST", data=b"from the UI")[0] == 200  # fmt: skip
    tag = {"name": MODEL, "version": champion["version"].version, "key": "reviewed_by", "value": "carl"}
    assert call(url, "/api/2.0/mlflow/model-versions/set-tag", writer, tag)[0] == 200  # other tags as before
    with account(url, *writer), registry.using_tracking_uri(url), mlflow.start_run(run_id=run_id):
        data = save_weights(UNet(3, 2, base_channels=4, depth=2), server["tmp"] / "spare")
        spare = mlflow.pyfunc.log_model(name="spare", loader_module=LOADER_MODULE, data_path=str(data))
    spare_location = spare.artifact_path.removeprefix("mlflow-artifacts:/")  # logged, never registered
    assert call(url, f"/api/2.0/mlflow-artifacts/artifacts/{spare_location}/MLmodel", writer, method="PUT",
                data=b"rewritten")[0] == 200  # fmt: skip


def test_deleting_a_version_lets_its_files_go(server: dict, champion: dict) -> None:
    version, _, location = register(server)
    path = f"/api/2.0/mlflow-artifacts/artifacts/{location}/MLmodel"
    assert call(server["url"], path, server[WRITER], method="PUT", data=b"x")[0] == 403
    assert call(server["url"], path, server[ADMIN], method="PUT", data=b"x")[0] == 403
    with account(server["url"], *server[MANAGER]) as manager:  # deleting a version needs MANAGE
        manager.delete_model_version(MODEL, version)
    assert call(server["url"], path, server[WRITER], method="PUT", data=b"x")[0] == 200


def test_the_app_knows_every_route_that_writes_artifacts() -> None:
    """The rules cover this MLflow's write routes; a server whose MLflow added one would not start."""
    from flask import Flask
    from mlflow.server import app

    check_write_routes(app)
    newer = Flask("newer")
    newer.add_url_rule("/api/3.0/mlflow/artifacts/upload-batch", "upload_batch", lambda: "", methods=["POST"])
    with pytest.raises(RuntimeError, match="upload-batch"):
        check_write_routes(newer)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    return Path(prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}"]),
                        previews=0))  # fmt: skip


def run_job(server: dict, module: str, config: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE`` with ``configs/CONFIG`` as the service account, against the server."""
    command = [sys.executable, "-m", module, "--config", str(ROOT / "configs" / config)]
    command += [arg for override in overrides for arg in ("--set", override)]
    env = {**client_environment(server["url"], *server[WRITER]), "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_version_changed_behind_the_server_is_refused_by_every_loader(
    server: dict, champion: dict, store: Path, cmu_ome_zarr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version, run_id, location = register(server, alias="staging")
    url, uri = server["url"], f"models:/{MODEL}/{version}"
    for key, value in client_environment(url, *server[WRITER]).items():
        if key.startswith("MLFLOW_TRACKING"):
            monkeypatch.setenv(key, value)
    assert load_model(uri, url).architecture()["base_channels"] == 4  # as registered: loads

    weights = server["tmp"] / "artifacts" / location / "data" / "unet" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # changed where the server keeps it
    for name in (uri, f"models:/{MODEL}@staging", f"runs:/{run_id}/model"):
        changed = rf"^model version {MODEL}/{version} \({re.escape(name)}\) is not the model that was registered: "
        with pytest.raises(UserError, match=changed + r"file data/unet/weights\.safetensors has changed \(.*\); not"):
            load_model(name, url)
    refused = pytest.raises(UserError, match=r"is not the model that was registered: file data/unet/weights")
    with registry.using_tracking_uri(url), refused:
        mlflow.pyfunc.load_model(f"models:/{MODEL}@staging")  # MLflow's own loader: our loader_module checks
    settings = InferenceSettings.from_config(InferConfig())
    with pytest.raises(UserError, match=r"is not the model that was registered"):
        _predictor(ModelSpec(uri, url, settings, 1))  # what a Dask worker loads once for its tasks
    output = tmp_path / "out.ome.zarr"
    infer = [f"infer.model=models:/{MODEL}@staging", f"infer.input={cmu_ome_zarr}", f"infer.output={output}"]
    evaluate = [f"evaluate.model={uri}", f"data.store={store}"]
    jobs = [run_job(server, "pipelines.infer", "infer.yaml", *infer),
            run_job(server, "pipelines.evaluate", "train.yaml", *evaluate)]  # fmt: skip
    for job in jobs:
        assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
        assert len(job.stderr.strip().splitlines()) == 1, job.stderr
        assert f"model version {MODEL}/{version}" in job.stderr and "file data/unet/weights" in job.stderr
    assert not output.exists() and not list(tmp_path.glob(".out.ome.zarr*"))

    other, _, other_location = register(server)  # a file added (say, code for MLmodel to import), none changed
    added = server["tmp"] / "artifacts" / other_location / "code" / "evil.py"
    added.parent.mkdir()
    added.write_text("import os\n")
    with pytest.raises(UserError, match=r"is not the model that was registered: file code/evil\.py was added; not"):
        load_model(f"models:/{MODEL}/{other}", url)
