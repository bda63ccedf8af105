"""A real `mlflow server --app-name unet-basic-auth` with accounts set up by `python -m pipelines.mlflow_auth`, and
what the tests that talk to it share: REST calls as an account, clients as an account, environments."""

from __future__ import annotations

import base64
import configparser
import contextlib
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from pipelines.models import DIGESTS_TAG
from tests.helpers import ROOT, environment, mlflow_server

MODEL, EXPERIMENT = "unet-test", "unet"  # train_command's registered model; configs/train.yaml's experiment
ADMIN, WRITER, READER, MANAGER = "admin", "unet-train", "reader-ann", "manager-carl"


def auth_config(tmp: Path, database: str) -> Path:
    """infra/mlflow/basic_auth.ini pointed at the throw-away database (the server's in the compose file)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "infra" / "mlflow" / "basic_auth.ini")
    config["mlflow"]["database_uri"] = database
    path = tmp / "basic_auth.ini"
    with path.open("w") as handle:
        config.write(handle)
    return path


def server_environment(ini: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in environment().items() if not k.startswith(("MLFLOW_AUTH", "MLFLOW_TRACKING"))}
    return {**env, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "PYTHONUNBUFFERED": "1", **extra}


def client_environment(url: str, username: str | None, password: str | None) -> dict[str, str]:
    env = {k: v for k, v in environment().items() if not k.startswith("MLFLOW_TRACKING")}
    account = {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}
    return {**env, "MLFLOW_TRACKING_URI": url, **{k: v for k, v in account.items() if v is not None}}


def call(
    url: str,
    path: str,
    account: tuple[str, str] | None = None,
    payload: dict | None = None,
    method: str | None = None,
    data: bytes | None = None,
) -> tuple[int, str]:
    """(HTTP status, body) of a REST call: GET, or POST with a JSON payload (or ``data``, raw bytes, with another
    ``method``); ``account`` as Basic auth."""
    if payload is not None:
        data, content = json.dumps(payload).encode(), "application/json"
    else:
        content = "application/octet-stream" if data is not None else "application/json"
    headers = {"Content-Type": content}
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)
    if account:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(account).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@contextlib.contextmanager
def account(url: str, username: str, password: str):
    """An MlflowClient that talks to ``url`` as ``username`` (the standard variables, set for the block)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield MlflowClient(tracking_uri=url)


def setup_accounts(url: str, admin_password: str, passwords: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipelines.mlflow_auth", "--config", str(ROOT / "configs" / "train.yaml"),
               "--set", f"tracking.registered_model={MODEL}", "--passwords", str(passwords),
               "--writer", WRITER, "--reader", READER, "--manager", MANAGER]  # fmt: skip
    env = client_environment(url, ADMIN, admin_password)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def write_routes(version: ModelVersion, location: str, legacy: tuple[str, str] | None = None) -> list[tuple]:
    """Every route of this MLflow that writes or deletes artifacts, aimed at the files of ``version`` (whose files are
    at ``location``, a path of the artifact proxy); with ``legacy`` (run id, artifact path of a version registered
    from a run's artifacts) also the routes that write a run's artifacts. (method, path, JSON payload, raw data)."""
    weights, name = f"{location}/data/unet/weights.safetensors", "data/unet/weights.safetensors"
    model_id = version.source.removeprefix("models:/")
    upload = {"path": name, "upload_id": "an-upload"}
    tag = {"name": version.name, "version": version.version, "key": DIGESTS_TAG}
    routes = [
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{weights}", None, b"forged weights"),
        ("PUT", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{location}/MLmodel", None, b"loader_module: os"),
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{location}/code/evil.py", None, b"import os"),  # a new file
        ("DELETE", f"/api/2.0/mlflow-artifacts/artifacts/{weights}", None, None),
        ("DELETE", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{location.split('/')[0]}", None, None),  # a parent
        ("POST", f"/api/2.0/mlflow-artifacts/mpu/create/{weights}", {"path": name, "num_parts": 1}, None),
        ("POST", f"/api/2.0/mlflow-artifacts/mpu/complete/{weights}", {**upload, "parts": []}, None),
        ("POST", f"/ajax-api/2.0/mlflow-artifacts/mpu/abort/{weights}", upload, None),
        ("POST", "/api/2.0/mlflow/artifacts/presigned-upload-url", {"model_id": model_id, "path": name}, None),
        ("POST", "/api/2.0/mlflow/model-versions/set-tag", {**tag, "value": "{}"}, None),
        ("DELETE", "/ajax-api/2.0/mlflow/model-versions/delete-tag", tag, None),
    ]
    if legacy:
        run_id, path = legacy
        experiment = location.split("/")[0]
        routes += [
            ("POST", f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}&path={path}/MLmodel", None, b"x"),
            ("POST", "/api/2.0/mlflow/artifacts/presigned-upload-url", {"run_id": run_id, "path": path}, None),
            ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run_id}/artifacts/{path}/MLmodel", None, b"x"),
        ]
    return routes


def refusals(server: dict, routes: list[tuple], accounts: tuple[str, ...] = (READER, WRITER, MANAGER, ADMIN)) -> dict:
    """(status, body) of every route for every account: {(account, method, path): (status, body)}."""
    return {(name, method, path): call(server["url"], path, server[name], payload, method, data)
            for name in accounts for method, path, payload, data in routes}  # fmt: skip


@contextlib.contextmanager
def accounts_server(tmp: Path, backend: str, auth_database: str, *extra: str) -> Iterator[dict]:
    """The server on ``backend`` (runs and registry) with its accounts in ``auth_database``, artifacts proxied to
    ``tmp/artifacts``, its accounts set up (twice: the second run changes nothing); yields its URL, the accounts'
    (name, password) and what the tests check."""
    admin_password = "admin-" + secrets.token_hex(12)
    secret_key = secrets.token_hex(16)
    env = server_environment(auth_config(tmp, auth_database), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                             MLFLOW_FLASK_SERVER_SECRET_KEY=secret_key)  # fmt: skip
    options = ["--app-name", "unet-basic-auth", "--artifacts-destination", str(tmp / "artifacts"), *extra]
    with mlflow_server(backend, tmp, *options, env=env, log=tmp / "server.log") as url:
        passwords = tmp / "passwords"
        passwords.mkdir(mode=0o700)
        (passwords / READER).write_text("ann's own password, from her\n")  # given; the others generated
        first, second = (
            setup_accounts(url, admin_password, passwords),
            setup_accounts(url, admin_password, passwords),
        )
        yield {
            "url": url,
            "tmp": tmp,
            "secrets": [admin_password, secret_key],
            ADMIN: (ADMIN, admin_password),
            "setup": [first, second],
            **{name: (name, (passwords / name).read_text().strip()) for name in (WRITER, READER, MANAGER)},
        }
