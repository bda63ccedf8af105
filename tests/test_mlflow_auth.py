"""The team MLflow server with accounts: a real `mlflow server --app-name unet-basic-auth` on a throw-away
PostgreSQL (runs, registry and accounts in one database), set up by `python -m pipelines.mlflow_auth`,
written to by a real training job with the service account; nobody unauthenticated gets in, a reader
cannot move an alias, only MANAGE moves `champion`, and no password ends up in logs, parameters, tags or
errors."""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from pipelines.mlflow_auth import setup_accounts as setup_accounts_here
from pipelines.models import DIGESTS_TAG, load_model
from pipelines.prepare import prepare
from pipelines.registry import CANDIDATE, CHAMPION, current_champion, promote
from tests.accounts import (
    ADMIN,
    EXPERIMENT,
    MANAGER,
    MODEL,
    READER,
    WRITER,
    account,
    accounts_server,
    auth_config,
    call,
    client_environment,
    refusals,
    server_environment,
    write_routes,
)
from tests.helpers import ROOT, postgres_database, train_command
from unet.config import load_config
from unet.model_files import file_digests


def on_the_server(test):
    """A test that starts PostgreSQL and the server (`make test-cluster`); the app's own tests, at the end of this
    file, run in `make test`."""
    return pytest.mark.slow(pytest.mark.cluster(test))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The server on PostgreSQL (runs, registry and accounts in one database, as infra/mlflow runs it)."""
    tmp = tmp_path_factory.mktemp("auth")
    with postgres_database() as database, accounts_server(tmp, database, database) as server:
        yield server


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
        promote(reader, MODEL, version, wins=True)
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
        assert not promote(writer, MODEL, version, wins=True)  # candidate moved, champion refused
    with account(url, *server[MANAGER]) as manager:
        assert promote(manager, MODEL, version, wins=True)
        assert manager.get_model_version_by_alias(MODEL, CHAMPION).version == version


@on_the_server
def test_no_account_can_change_the_files_the_training_job_registered(server: dict, trained) -> None:
    """The issue this rule answers: the service account (EDIT) replaced a registered version's weights through the
    artifact proxy. Every write route, every account, on PostgreSQL (the same on sqlite with more cases:
    tests/test_immutable_versions.py)."""
    with account(server["url"], *server[ADMIN]) as admin:
        version = admin.get_model_version_by_alias(MODEL, CANDIDATE)
        location = admin.get_model_version_download_uri(MODEL, version.version).removeprefix("mlflow-artifacts:/")
    stored = server["tmp"] / "artifacts" / location
    before = file_digests(stored)
    assert json.loads(version.tags[DIGESTS_TAG]) == before  # recorded when the job registered it
    for (name, method, path), (status, body) in refusals(server, write_routes(version, location)).items():
        assert status == 403, (name, method, path, status, body)
    assert file_digests(stored) == before
    with account(server["url"], *server[READER]):  # and it loads, checked, as any reader would load it
        assert load_model(f"models:/{MODEL}@{CANDIDATE}", server["url"]).n_channels == 3


@on_the_server
def test_setting_up_again_takes_a_service_account_back_to_edit_on_a_model_it_made(server: dict) -> None:
    """Had the service account created the model itself (its creator gets MANAGE), it could move champion."""
    own = "unet-made-by-the-job"
    with account(server["url"], *server[WRITER]) as writer:
        writer.create_registered_model(own)
    permission = "/api/3.0/mlflow/users/permissions/get?username={}&resource_type=registered_model&resource_id={}"
    check = permission.format(WRITER, own)
    assert json.loads(call(server["url"], check, server["admin"])[1])["permission"] == "MANAGE"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in client_environment(server["url"], *server["admin"]).items():
            if key.startswith("MLFLOW_TRACKING"):
                patch.setenv(key, value)
        config = load_config(ROOT / "configs" / "train.yaml", [f"tracking.registered_model={own}"])  # the URI too
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
    start = "from pipelines.mlflow_app import create_app; create_app()"  # what a server worker does first
    result = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "needs a password to create the admin user 'admin'" in result.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr


def test_the_app_guards_the_alias_and_rename_routes_of_this_mlflow() -> None:
    """The rules wrap basic-auth's validators of these routes; were they gone, the app would not start."""
    from mlflow.server import auth

    from pipelines.mlflow_app import guard_routes

    validators = dict(auth.BEFORE_REQUEST_VALIDATORS)
    guard_routes(validators, lambda: False, frozenset({CHAMPION}))
    guarded = {path for (path, method), v in validators.items() if getattr(v, "unet_guarded", False)}
    assert guarded == {p for p, _ in validators if p.endswith(("/registered-models/alias", "/registered-models/rename"))
                       and (p, "POST") in validators}  # fmt: skip
    assert len(guarded) >= 4  # REST and ajax paths of both
    with pytest.raises(RuntimeError, match="no validators"):
        guard_routes({}, lambda: False, frozenset({CHAMPION}))
