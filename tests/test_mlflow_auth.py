"""The team MLflow server with accounts: a real `mlflow server --app-name unet-basic-auth` on a throw-away
PostgreSQL (runs, registry and accounts in one database), set up by `python -m pipelines.mlflow_auth`,
written to by a real training job with the service account; nobody unauthenticated gets in, a reader
cannot move an alias, only MANAGE moves `champion`, and no password ends up in logs, parameters, tags or
errors."""

from __future__ import annotations

import base64
import configparser
import contextlib
import json
import secrets
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.mlflow_auth import setup_accounts as setup_accounts_here
from pipelines.prepare import prepare
from pipelines.registry import CANDIDATE, CHAMPION, current_champion, promote
from tests.helpers import ROOT, environment, mlflow_server, postgres_database, train_command
from unet.config import load_config


def on_the_server(test):
    """A test that starts PostgreSQL and the server (`make test-cluster`); the app's own tests, at the end of this
    file, run in `make test`."""
    return pytest.mark.slow(pytest.mark.cluster(test))


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
    url: str, path: str, account: tuple[str, str] | None = None, payload: dict | None = None, method: str | None = None
) -> tuple[int, str]:
    """(HTTP status, body) of a REST call: GET, or POST with a JSON payload; ``account`` as Basic auth."""
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json"}
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The server, its accounts set up (twice: the second run changes nothing) and their passwords."""
    tmp = tmp_path_factory.mktemp("auth")
    admin_password = "admin-" + secrets.token_hex(12)
    secret_key = secrets.token_hex(16)
    with postgres_database() as database:
        env = server_environment(auth_config(tmp, database), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                                 MLFLOW_FLASK_SERVER_SECRET_KEY=secret_key)  # fmt: skip
        extra = ["--app-name", "unet-basic-auth", "--artifacts-destination", str(tmp / "artifacts")]
        with mlflow_server(database, tmp, *extra, env=env, log=tmp / "server.log") as url:
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
                "admin": (ADMIN, admin_password),
                "setup": [first, second],
                **{name: (name, (passwords / name).read_text().strip()) for name in (WRITER, READER, MANAGER)},
            }


def passwords_in(folder: Path) -> list[str]:
    return [p.read_text().strip() for p in folder.iterdir()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a training store of the real H&E sample (train_command's data.store)."""
    folder = tmp_path_factory.mktemp("train")
    prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}"]), previews=0)
    return folder


@pytest.fixture(scope="module")
def trained(server: dict, workspace: Path) -> subprocess.CompletedProcess[str]:
    """A real (tiny) `python -m pipelines.train` run, as the service account from the standard variables."""
    command = train_command(workspace, "auth", 1, "train.steps_per_epoch=2", "train.num_workers=1")
    env = client_environment(server["url"], *server[WRITER])
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@on_the_server
def test_accounts_are_set_up_idempotently_without_showing_a_password(server: dict) -> None:
    first, second = server["setup"]
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert f"created account {WRITER!r}" in first.stdout and f"created registered model {MODEL!r}" in first.stdout
    assert f"account {WRITER!r} exists" in second.stdout and "created" not in second.stdout
    passwords = server["tmp"] / "passwords"
    assert stat.S_IMODE((passwords / WRITER).stat().st_mode) == 0o600  # generated, for the operator to hand over
    for text in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert not [p for p in [*server["secrets"], *passwords_in(passwords)] if p in text]


@on_the_server
def test_anonymous_and_wrong_password_get_401(server: dict) -> None:
    url, search = server["url"], "/api/2.0/mlflow/experiments/search?max_results=5"
    assert call(url, search)[0] == 401
    assert call(url, search, (READER, "not-the-password-at-all"))[0] == 401
    assert call(url, search, (WRITER, server[READER][1]))[0] == 401  # another account's password
    assert call(url, search, server[READER])[0] == 200


@on_the_server
def test_the_training_job_registers_a_model_with_the_service_account(server: dict, trained) -> None:
    with account(server["url"], *server["admin"]) as admin:
        run = admin.search_runs([admin.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
        assert run.info.status == "FINISHED" and run.data.tags["registered_model"] == MODEL
        version = admin.get_model_version_by_alias(MODEL, CANDIDATE)  # set by the job
        assert version.run_id == run.info.run_id and version.version == run.data.tags["registered_version"]
        # the job tried to crown its version (there was no champion) and was refused: a warning, not a failure
        assert current_champion(admin, MODEL) is None
    assert "would be the new champion, but this account may not move that alias" in trained.stderr


@on_the_server
def test_a_reader_reads_but_cannot_move_an_alias(server: dict, trained) -> None:
    url = server["url"]
    status, body = call(url, f"/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias={CANDIDATE}", server[READER])
    assert status == 200
    version = json.loads(body)["model_version"]["version"]
    alias = {"name": MODEL, "alias": "staging", "version": version}
    assert call(url, "/api/2.0/mlflow/registered-models/alias", server[READER], alias)[0] == 403
    with account(url, *server[READER]) as reader, pytest.raises(MlflowException) as raised:
        promote(reader, MODEL, version, "val/f1", 1.0)
    assert raised.value.error_code == "PERMISSION_DENIED"


@on_the_server
def test_only_manage_moves_champion(server: dict, trained) -> None:
    url, path = server["url"], "/api/2.0/mlflow/registered-models/alias"
    with account(url, *server["admin"]) as admin:
        version = admin.get_model_version_by_alias(MODEL, CANDIDATE).version
    for alias, status in [("staging", 200), (CHAMPION, 403), ("Champion", 403)]:  # the service account: EDIT
        assert call(url, path, server[WRITER], {"name": MODEL, "alias": alias, "version": version})[0] == status
    delete = {"name": MODEL, "alias": "staging"}  # deleting any alias needs MANAGE (basic-auth's own rule)
    assert call(url, path, server[WRITER], delete, method="DELETE")[0] == 403
    rename = {"name": MODEL, "new_name": "unet-elsewhere"}  # then a new model of the old name would be its own
    assert call(url, "/api/2.0/mlflow/registered-models/rename", server[WRITER], rename)[0] == 403
    with account(url, *server[WRITER]) as writer:
        assert not promote(writer, MODEL, version, "val/f1", 1.0)  # candidate moved, champion refused
    with account(url, *server[MANAGER]) as manager:
        assert promote(manager, MODEL, version, "val/f1", 1.0)
        assert manager.get_model_version_by_alias(MODEL, CHAMPION).version == version


@on_the_server
def test_setting_up_again_takes_a_service_account_back_to_edit_on_a_model_it_made(server: dict) -> None:
    """Had the service account created the model itself (its creator gets MANAGE), it could move champion."""
    own = "unet-made-by-the-job"
    with account(server["url"], *server[WRITER]) as writer:
        writer.create_registered_model(own)
    permission = "/api/3.0/mlflow/users/permissions/get?username={}&resource_type=registered_model&resource_id={}"
    check = permission.format(WRITER, own)
    assert json.loads(call(server["url"], check, server["admin"])[1])["permission"] == "MANAGE"
    config = load_config(ROOT / "configs" / "train.yaml", [f"tracking.registered_model={own}"])
    with pytest.MonkeyPatch.context() as patch:
        for key, value in client_environment(server["url"], *server["admin"]).items():
            if key.startswith("MLFLOW_TRACKING"):
                patch.setenv(key, value)
        setup_accounts_here(config, [WRITER], [], [], server["tmp"] / "passwords")
    assert json.loads(call(server["url"], check, server["admin"])[1])["permission"] == "EDIT"


@on_the_server
def test_no_password_in_logs_params_tags_or_artifacts(server: dict, trained) -> None:
    password = server[WRITER][1]
    assert password not in trained.stdout + trained.stderr
    server_log = (server["tmp"] / "server.log").read_text()
    assert not [s for s in [*server["secrets"], *passwords_in(server["tmp"] / "passwords")] if s in server_log]
    with account(server["url"], *server["admin"]) as admin:
        experiment = admin.get_experiment_by_name(EXPERIMENT).experiment_id
        for run in admin.search_runs([experiment]):
            recorded = json.dumps([run.data.params, run.data.tags, run.info.run_name])
            assert password not in recorded and server["url"] in run.data.params["tracking.tracking_uri"]
            config = Path(admin.download_artifacts(run.info.run_id, "config.yaml", str(server["tmp"])))
            assert password not in config.read_text()
        model = admin.get_registered_model(MODEL)
        versions = admin.search_model_versions(f"name = '{MODEL}'")
        recorded = json.dumps([model.description, model.tags, [[v.description, v.tags, v.source] for v in versions]])
        assert password not in recorded


@on_the_server
@pytest.mark.parametrize("how", ["wrong password", "in the URI"])
def test_refused_credentials_are_one_line_without_the_password(
    server: dict, workspace: Path, tmp_path: Path, how: str
) -> None:
    password = "wrong-" + secrets.token_hex(8) if how == "wrong password" else server[WRITER][1]
    if how == "wrong password":
        env = client_environment(server["url"], WRITER, password)
    else:  # the credentials would be recorded with the URI, so they are refused before any use
        env = client_environment(server["url"].replace("://", f"://{WRITER}:{password}@"), None, None)
    command = train_command(workspace, "refused", 1)  # the server is asked before Ray starts
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and password not in result.stdout + result.stderr, result.stderr
    assert ("refused the account 'unet-train'" if how == "wrong password" else "MLFLOW_TRACKING_PASSWORD") in lines[0]


def test_the_app_does_not_start_without_an_admin_password(tmp_path: Path) -> None:
    """MLflow ships no default admin password: on an empty account store the app refuses to start without one.
    (`mlflow server` checks this itself before starting workers for basic-auth only; for this app each worker
    does, then stops, and `mlflow server` exits with the message.)"""
    env = server_environment(auth_config(tmp_path, f"sqlite:///{tmp_path / 'auth.db'}"),
                             MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))  # fmt: skip
    start = "from pipelines.mlflow_auth import create_app; create_app()"  # what a server worker does first
    result = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "needs a password to create the admin user 'admin'" in result.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr


def test_the_app_guards_the_alias_and_rename_routes_of_this_mlflow() -> None:
    """The rules wrap basic-auth's validators of these routes; were they gone, the app would not start."""
    from mlflow.server import auth

    from pipelines.mlflow_auth import guard_routes

    validators = dict(auth.BEFORE_REQUEST_VALIDATORS)
    guard_routes(validators, lambda: False, frozenset({CHAMPION}))
    guarded = {path for (path, method), v in validators.items() if getattr(v, "unet_guarded", False)}
    assert guarded == {p for p, _ in validators if p.endswith(("/registered-models/alias", "/registered-models/rename"))
                       and (p, "POST") in validators}  # fmt: skip
    assert len(guarded) >= 4  # REST and ajax paths of both
    with pytest.raises(RuntimeError, match="no validators"):
        guard_routes({}, lambda: False, frozenset({CHAMPION}))
