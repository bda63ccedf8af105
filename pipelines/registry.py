"""MLflow: tracking-URI resolution, runs (training and job runs, their tags), aliases and promotion.

Logging, registering and loading models: ``pipelines.models``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from unet import __version__
from unet.config import Config
from unet.errors import UserError, first_line

if TYPE_CHECKING:  # MLflow (about a second to import) is imported by the functions that use it
    from mlflow.tracking import MlflowClient


log = logging.getLogger(__name__)
RUN_NAME_TAG, STORAGE_TAG = "ray.run_name", "ray.storage_path"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"  # a server's account
CHAMPION, CANDIDATE = "champion", "candidate"  # the registered model's aliases
# tags of a training run (and of the versions it registers)
STORE_SHA_TAG, GIT_COMMIT_TAG, WORKER_NODES_TAG = "data.store_sha256", "git_commit", "ray.worker_nodes"
REGISTERED_MODEL_TAG, REGISTERED_VERSION_TAG, REGISTERED_EPOCH_TAG = (
    "registered_model",
    "registered_version",
    "registered_epoch",
)
JOB_TAG = "job"  # inference, inference-batch, evaluation
CHECKPOINTS_TAG = "checkpoint.sha256"  # the digests of a training run's latest checkpoints (pipelines.checkpoints)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block only.

    ``mlflow.set_tracking_uri`` also sets the MLFLOW_TRACKING_URI environment variable, which would
    then override every later config in this process; this restores both.
    """
    import mlflow

    previous_env, previous = os.environ.get(TRACKING_ENV), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = previous_env


def resolve_tracking_uri(configured: str) -> str:
    """The configured URI (``load_config`` has applied MLFLOW_TRACKING_URI, and ``--set`` over it), refused if it
    holds credentials; relative sqlite/file paths made absolute (Ray workers and jobs run in other directories)."""
    refuse_credentials(configured)
    uri = configured
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def refuse_credentials(uri: str | None) -> None:
    """A password in a tracking URI would be written to logs, run parameters and lineage: refuse it (the
    message does not repeat the URI)."""
    try:
        parsed = urlparse(uri or "")
        found = parsed.password is not None or (parsed.scheme in {"http", "https"} and bool(parsed.username))
    except ValueError:  # not a URL at all: nothing to find in it
        return
    if found:
        raise UserError(
            "the tracking URI (MLFLOW_TRACKING_URI or tracking.tracking_uri) holds credentials, which would be "
            f"recorded in logs, run parameters and lineage: give the server's account in {USERNAME_ENV} and "
            f"{PASSWORD_ENV} instead (a database's password in PGPASSWORD or ~/.pgpass)"
        )


def connect(uri: str) -> MlflowClient:
    """A client for ``uri``, checked to answer now: a clear error instead of a hang later."""
    from mlflow.tracking import MlflowClient

    with _sqlite_created_once(uri):
        client = MlflowClient(tracking_uri=uri)
    # fail fast on this one check only: later calls keep MLflow's retries for transient errors
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    with environment(fast if urlparse(uri).scheme in {"http", "https"} else {}):
        try:
            client.search_experiments(max_results=1)
        except Exception as exc:  # any failure to talk to the store means we cannot track
            if refused := _refusal(getattr(exc, "error_code", None), uri, os.environ.get(USERNAME_ENV)):
                raise UserError(refused) from None
            raise UserError(f"MLflow tracking server unreachable at {uri}: {first_line(exc)[:200]}") from None
    return client


@contextlib.contextmanager
def _sqlite_created_once(uri: str) -> Iterator[None]:
    """One process at a time opens a sqlite tracking database: MLflow creates and migrates a new one on first use,
    and jobs started at once on a fresh ``mlflow.db`` would all migrate it and fail (``pipelines.locks``)."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        yield
        return
    from pipelines.locks import locked

    with locked(uri.removeprefix("sqlite:///"), lambda holder: holder, wait=True):
        yield


def _refusal(error_code: str | None, uri: str, account: str | None) -> str | None:
    """What to tell the user when a server with accounts refuses the connection check (None: it did not)."""
    if error_code == "PERMISSION_DENIED":
        return f"the account {account!r} may not read the experiments of {uri}: ask an admin of the server for READ"
    if error_code not in {"UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"}:
        return None
    if account:
        return f"MLflow tracking server at {uri} refused the account {account!r}: no such account, or wrong password"
    return f"MLflow tracking server at {uri} needs an account: set {USERNAME_ENV} and {PASSWORD_ENV}"


@contextlib.contextmanager
def environment(defaults: dict[str, str]) -> Iterator[None]:
    """Environment variables set (where the user has not set them) for the block only."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it; local stores keep artifacts next to the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = Path(tracking_uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def ray_run_runs(client: MlflowClient, experiment: str, run_name: str, storage_path: str, max_results: int = 100):
    """MLflow runs recorded for the Ray run ``run_name`` in ``storage_path`` (tags set by start_or_resume_run)."""
    return client.search_runs(
        [experiment],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage_path}'",
        max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )


def start_or_resume_run(
    client: MlflowClient,
    config: Config,
    tracking_uri: str,
    flat_params: dict[str, str],
    tags: dict[str, str],
    checkpointed: bool,
) -> tuple[str, bool]:
    """The MLflow run of this Ray run (same name and storage path) when Ray Train resumes it (``checkpointed``: its
    folder holds checkpoints), else a new one: a run started over after its folder was deleted is a new run, and its
    earlier MLflow run is left as it ended (one left RUNNING by a killed job is marked KILLED)."""
    from mlflow.entities import Param

    exp_id = experiment_id(client, config.tracking.experiment, tracking_uri)
    name, storage = config.train.run_name, config.train.storage_path
    if found := ray_run_runs(client, exp_id, name, storage, max_results=1):
        run_id = found[0].info.run_id
        if checkpointed:
            client.update_run(run_id, status="RUNNING")
            return run_id, True
        if found[0].info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
        log.info("%s/%s has no checkpoint: training run %r starts over in a new MLflow run (the earlier one, %s, "
                 "is kept as it was)", storage, name, name, run_id)  # fmt: skip
    run = client.create_run(exp_id, run_name=name, tags={RUN_NAME_TAG: name, STORAGE_TAG: storage, **tags})
    params = [Param(k, v[:6000]) for k, v in flat_params.items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id, False


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, synchronous: bool = True):
    """Log ``metrics`` at ``step``; ``synchronous=False`` returns at once with an operation to ``wait()`` on."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    return client.log_batch(run_id, metrics=batch, synchronous=synchronous)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_job_run(
    tracking_uri: str,
    experiment: str,
    job: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: tuple[str | Path, ...] = (),
    parent: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """A finished MLflow run recording one job (inference, evaluation): what went in, what came out; nested
    under run ``parent`` (a batch) if given. Few round trips: a batch logs one per slide."""
    client = connect(tracking_uri)
    run_id = _create_job_run(client, tracking_uri, experiment, job, run_name, parent)
    _close_job_run(client, run_id, params, metrics, artifacts, "FINISHED", tags)
    return run_id


def start_job_run(
    tracking_uri: str, experiment: str, job: str, run_name: str, params: dict[str, Any], parent: str | None = None
) -> str:
    """Open an MLflow run for a job that takes a while, recording its parameters; ``end_job_run`` closes it."""
    client = connect(tracking_uri)
    run_id = _create_job_run(client, tracking_uri, experiment, job, run_name, parent)
    _log(client, run_id, params=params)
    return run_id


def end_job_run(
    tracking_uri: str,
    run_id: str,
    metrics: dict[str, float],
    artifacts: tuple[str | Path, ...] = (),
    status: str = "FINISHED",
) -> None:
    """Record a job's results and artifacts and mark its run ``status`` (FINISHED or FAILED)."""
    _close_job_run(connect(tracking_uri), run_id, {}, metrics, artifacts, status)


def _create_job_run(
    client: MlflowClient, tracking_uri: str, experiment: str, job: str, run_name: str, parent: str | None
) -> str:
    tags = {JOB_TAG: job} | ({"mlflow.parentRunId": parent} if parent else {})
    return client.create_run(experiment_id(client, experiment, tracking_uri), run_name=run_name, tags=tags).info.run_id


def _close_job_run(client: MlflowClient, run_id: str, params: dict, metrics: dict, artifacts: tuple, status: str,
                   tags: dict | None = None) -> None:  # fmt: skip
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    finished = {"finished": datetime.now(UTC).isoformat(timespec="seconds")}
    _log(client, run_id, params=params, metrics=metrics, tags={**(tags or {}), **finished})
    client.set_terminated(run_id, status=status)


def _log(client: MlflowClient, run_id: str, params: dict | None = None, metrics: dict | None = None,
         tags: dict | None = None) -> None:  # fmt: skip
    """Parameters, metrics (at step 0) and tags in one round trip."""
    params, metrics, tags = params or {}, metrics or {}, tags or {}
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )


def record_registration(client: MlflowClient, run_id: str, name: str, version: str, epoch: int) -> None:
    """Tag a training run with the model version it registered (and after which epoch)."""
    tags = {REGISTERED_MODEL_TAG: name, REGISTERED_VERSION_TAG: version, REGISTERED_EPOCH_TAG: epoch}
    set_tags(client, run_id, tags)


def registered_model_uri(tags: dict[str, str]) -> str | None:
    """``models:/NAME/VERSION`` a training run registered, from its tags (None if it registered none)."""
    if not tags.get(REGISTERED_VERSION_TAG):
        return None
    return f"models:/{tags[REGISTERED_MODEL_TAG]}/{tags[REGISTERED_VERSION_TAG]}"


def git_commit() -> str:
    """The code version: ``UNET_GIT_COMMIT`` if set, else ``git rev-parse HEAD``, else the package version."""
    if commit := os.environ.get("UNET_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"unknown (unet-wsi {__version__}, no git checkout)"


def promote(client: MlflowClient, name: str, version: str, wins: bool, scored_champion: str | None = None) -> bool:
    """Alias ``candidate`` -> ``version``; ``champion`` too when it ``wins`` against the champion it was scored
    against (``scored_champion``, None: there was none), provided that is still the champion (a champion moved
    meanwhile was not compared: nothing is crowned) and the account may move the alias (on a server with accounts
    only MANAGE on the model may: else a warning and False). Returns whether ``version`` is now the champion."""
    client.set_registered_model_alias(name, CANDIDATE, version)
    if not wins:
        return False
    champion = current_champion(client, name)
    now = None if champion is None else str(champion.version)
    if now != scored_champion:
        log.warning("the %s of %s is version %s now, not the version %s this job compared with: %s stays",
                    CHAMPION, name, now, scored_champion, CHAMPION)  # fmt: skip
        return False
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException as exc:
        if exc.error_code != "PERMISSION_DENIED":
            raise
        log.warning(  # a service account (EDIT) registers; a person with MANAGE on the model crowns
            "version %s of %s would be the new %s, but this account may not move that alias (it needs MANAGE on "
            "the registered model): someone who has it sets the alias",
            version,
            name,
            CHAMPION,
        )
        return False
    return True


def current_champion(client: MlflowClient, name: str):
    """The version ``champion`` points to, or None when no version has the alias yet. Any other failure (a
    server error, a lost connection) raises: it must never be read as "no champion" and crown a worse model."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE" and f"alias {CHAMPION} not found" in str(exc):
            return None
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" and f"name={name} not found" in str(exc):
            return None  # no version registered yet
        raise UserError(f"cannot read the champion of {name} ({first_line(exc)[:200]}); nothing promoted") from None


def resolve_model(uri: str, tracking_uri: str) -> tuple[str, str | None]:
    """(URI pinned to a version or an absolute folder, version or None); clear errors if missing."""
    from unet.model_files import ARCHITECTURE_FILE, BEST_MODEL_DIR

    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri.removeprefix("models:/").split("@", 1)
        client = connect(tracking_uri)
        try:
            version = client.get_model_version_by_alias(name, alias).version
        except Exception as exc:
            raise UserError(f"cannot resolve model {uri}: {first_line(exc)}") from None
        return f"models:/{name}/{version}", str(version)
    if uri.startswith(("models:/", "runs:/")):
        return uri, uri.rstrip("/").rsplit("/", 1)[-1] if uri.startswith("models:/") else None
    path = Path(uri).expanduser().resolve()
    if (path / BEST_MODEL_DIR).is_dir():  # a Ray Train checkpoint folder
        path = path / BEST_MODEL_DIR
    if not (path / ARCHITECTURE_FILE).is_file():
        raise UserError(f"model not found: {uri} (expected models:/NAME@ALIAS, models:/NAME/VERSION or a folder)")
    return str(path), None
