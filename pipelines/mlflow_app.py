"""The team MLflow server's app ``unet-basic-auth``: MLflow's basic-auth plus the rules that keep what a registered
model's alias points at what it was when it was registered.

``mlflow server --app-name unet-basic-auth`` (an ``mlflow.app`` entry point in pyproject.toml) is MLflow's own
``basic-auth`` app (users and permissions in the auth database, admin password from MLFLOW_AUTH_ADMIN_PASSWORD)
with four rules added:

* setting a protected alias (``champion``; UNET_PROTECTED_ALIASES, comma-separated, on the server changes the
  list) needs MANAGE on the registered model. The training service account has EDIT: it registers versions and
  moves ``candidate``; only a person with MANAGE moves ``champion``. (Deleting any alias already needs MANAGE.)
* renaming a registered model needs MANAGE; with EDIT, renaming the model away and creating a new one of the same
  name (its creator gets MANAGE) would move ``champion`` by the back door.
* **a registered version's files cannot change**: every route that writes or deletes artifacts (the proxy's
  PUT, DELETE and multipart create/complete/abort, the UI's upload, presigned upload URLs) is refused with 403,
  for every account including admins, when its path lies inside (or above) the files of a registered version
  that is not deleted. Runs and models that are not registered are written as before.
* **a version's file digests are written once**: the tag ``unet.sha256`` (``pipelines.models.DIGESTS_TAG``) is
  set when the version is created and can be neither set nor deleted afterwards, by anyone; loaders check every
  file against it (``pipelines.models.load_model``), which also catches changes made in the bucket directly.

Admins pass basic-auth's permission checks; the last two rules hold for them too (deleting the version is how a
registered model's files are let go). The app refuses to start when this MLflow serves a write route it does
not know, so a new MLflow cannot open a way around the rules unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from flask import Flask

APP_NAME = "unet-basic-auth"
PROTECTED_ALIASES_ENV = "UNET_PROTECTED_ALIASES"
ALIAS_ROUTE, RENAME_ROUTE = "/mlflow/registered-models/alias", "/mlflow/registered-models/rename"
VERSION_TAG_ROUTES = ("/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag")
# every route of this MLflow that writes or deletes artifacts, and the one artifact POST that only reads
PROXY_ROUTES = "/mlflow-artifacts/"  # PUT and DELETE artifacts/<path>, POST mpu/create|complete|abort/<path>
UPLOAD_ROUTE, PRESIGNED_UPLOAD_ROUTE = "/mlflow/upload-artifact", "/mlflow/artifacts/presigned-upload-url"
READING_POSTS = ("/mlflow/artifacts/presigned-download-url",)
NATIVE_PUT = re.compile(r"^/(?:api|ajax-api)/2\.0/mlflow-artifacts/artifacts/(?P<path>.+)$")  # served by FastAPI


# --- MANAGE rules: aliases and renaming ----------------------------------------------------------------


def protected_aliases() -> frozenset[str]:
    """Aliases only MANAGE may set (lower case; the check ignores case): UNET_PROTECTED_ALIASES or champion."""
    from pipelines.registry import CHAMPION

    value = os.environ.get(PROTECTED_ALIASES_ENV, CHAMPION)
    return frozenset(alias.strip().lower() for alias in value.split(",") if alias.strip())


def create_app(app: Flask | None = None):
    """MLflow's basic-auth app with the rules above (the ``mlflow.app`` entry point)."""
    from mlflow.server import app as mlflow_app
    from mlflow.server import auth

    flask_app = app or mlflow_app
    check_write_routes(flask_app)
    guard_routes(auth.BEFORE_REQUEST_VALIDATORS, auth.validate_can_manage_registered_model, protected_aliases())
    served = auth.create_app(flask_app)
    flask_app.before_request(refuse_changes_to_registered_versions)  # after basic-auth's: accounts are known
    if served is not flask_app:  # uvicorn: FastAPI serves artifact uploads itself, around Flask
        from starlette.middleware import Middleware

        served.user_middleware.append(Middleware(ImmutableVersionsMiddleware))  # innermost: after authentication
    return served


def guard_routes(validators: dict, can_manage: Callable[[], bool], protected: frozenset[str]) -> None:
    """Wrap basic-auth's validators of the set-alias and rename routes (REST and ajax paths) in place."""
    for (path, method), validator in list(validators.items()):
        if method != "POST" or getattr(validator, "unet_guarded", False):
            continue
        if path.endswith(ALIAS_ROUTE):
            validators[path, method] = _guarded(validator, lambda: _request_field("alias") in protected, can_manage)
        elif path.endswith(RENAME_ROUTE):
            validators[path, method] = _guarded(validator, lambda: True, can_manage)
    guarded = {path.rsplit("/", 1)[-1] for (path, _), v in validators.items() if getattr(v, "unet_guarded", False)}
    if guarded != {"alias", "rename"}:  # fail closed: a server that would let EDIT move champion must not start
        raise RuntimeError(f"{APP_NAME}: this MLflow has no validators of {ALIAS_ROUTE} and {RENAME_ROUTE} to guard")


def _guarded(validator: Callable[[], bool], needs_manage: Callable[[], bool], can_manage: Callable[[], bool]):
    def validate() -> bool:
        return bool(validator()) and (not needs_manage() or bool(can_manage()))

    validate.unet_guarded = True
    return validate


def _request_field(name: str, lower: bool = True) -> str:
    """A field of the request's JSON body (or query string), stripped ("" if absent)."""
    from flask import request

    body = request.get_json(silent=True) if request.method != "GET" else None
    value = (body if isinstance(body, dict) else request.args).get(name)
    value = value.strip() if isinstance(value, str) else ""
    return value.lower() if lower else value


# --- immutable registered versions -------------------------------------------------------------------------


def check_write_routes(app: Flask) -> None:
    """Refuse to start when this MLflow serves an artifact-writing route these rules do not cover."""
    unknown = []
    for rule in app.url_map.iter_rules():
        path, writes = str(rule), (rule.methods or set()) - {"GET", "HEAD", "OPTIONS"}
        if not writes or not re.search(r"artifact|upload|mpu|files", path):
            continue
        if PROXY_ROUTES in path or path.endswith((UPLOAD_ROUTE, PRESIGNED_UPLOAD_ROUTE, *READING_POSTS)):
            continue
        unknown.append(f"{'/'.join(sorted(writes))} {path}")
    if unknown:
        raise RuntimeError(f"{APP_NAME}: this MLflow writes artifacts through routes it does not guard: {unknown}")


def refuse_changes_to_registered_versions():
    """Flask ``before_request``: 403 for a write inside a registered version's files or of its digest tag."""
    from flask import request

    if request.method in {"GET", "HEAD", "OPTIONS"} or request.url_rule is None:
        return None
    rule = request.url_rule.rule
    if rule.endswith(VERSION_TAG_ROUTES) and _request_field("key", lower=False) == _digests_tag():
        return _forbidden(f"the tag {_digests_tag()} of a model version is written once, when it is registered")
    target = _flask_write_target(rule)
    refusal = None if target is None else registered_version_refusal(target)
    return None if refusal is None else _forbidden(refusal)


def _flask_write_target(rule: str) -> str | None:
    """The artifact location a write request changes (None: it writes no artifact)."""
    from flask import request

    if PROXY_ROUTES in rule:
        return proxied_location((request.view_args or {}).get("artifact_path") or request.args.get("path") or "")
    if rule.endswith(UPLOAD_ROUTE):
        return _run_location(request.args.get("run_uuid", ""), request.args.get("path", ""))
    if rule.endswith(PRESIGNED_UPLOAD_ROUTE):
        body = request.get_json(silent=True) or {}
        if body.get("model_id"):
            from mlflow.server.handlers import _get_tracking_store

            location = _get_tracking_store().get_logged_model(body["model_id"]).artifact_location
            return canonical(f"{location}/{body.get('path', '')}")
        return _run_location(body.get("run_id", ""), body.get("path", ""))
    return None


class ImmutableVersionsMiddleware:
    """The same rule for the artifact uploads FastAPI serves natively (PUT .../mlflow-artifacts/artifacts/PATH),
    which never reach Flask. Placed inside basic-auth's middleware, so only authenticated requests get here."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        match = NATIVE_PUT.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match and scope.get("method") == "PUT":
            refusal = await asyncio.to_thread(registered_version_refusal, proxied_location(match["path"]))
            if refusal is not None:
                from starlette.responses import JSONResponse

                response = JSONResponse(_error(refusal), status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def registered_version_refusal(target: str) -> str | None:
    """Why a write at ``target`` (a canonical location) is refused, or None: it is inside a registered version's
    files (or would delete them with a folder above them)."""
    for version, location in _registered_locations():
        if overlaps(target, location):
            return (
                f"this path holds files of registered model version {version.name}/{version.version}, which cannot "
                "change: register a new version instead (or delete this one to let its files go)"
            )
    return None


def overlaps(a: str, b: str) -> bool:
    """Whether one location is, or lies inside, the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


_LOCATIONS: dict[tuple[str, str, int], str] = {}  # a version's location never changes; keyed by its creation too


def _registered_locations() -> Iterator[tuple[Any, str]]:
    """(version, canonical location of its files) of every registered version that is not deleted."""
    from mlflow.server.handlers import _get_model_registry_store

    store, token = _get_model_registry_store(), None
    while True:
        page = store.search_model_versions(max_results=1000, page_token=token)
        for version in page:
            key = (version.name, str(version.version), version.creation_timestamp)
            if key not in _LOCATIONS:
                _LOCATIONS[key] = _version_location(store, version)
            yield version, _LOCATIONS[key]
        token = page.token
        if not token:
            return


def _version_location(store, version) -> str:
    source = version.source or ""
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        return _run_location(run_id, path)
    if source.startswith("models:/"):  # a logged model or another version: the location MLflow resolved it to
        return canonical(store.get_model_version_download_uri(version.name, str(version.version)))
    return canonical(source)


def _run_location(run_id: str, path: str) -> str:
    from mlflow.server.handlers import _get_tracking_store

    return canonical(f"{_get_tracking_store().get_run(run_id).info.artifact_uri}/{path}")


def proxied_location(path: str) -> str:
    """The canonical location of a path of the artifact proxy (relative to --artifacts-destination)."""
    from mlflow.server import ARTIFACTS_DESTINATION_ENV_VAR

    destination = os.environ.get(ARTIFACTS_DESTINATION_ENV_VAR, "")
    return canonical(f"{destination.rstrip('/')}/{path.lstrip('/')}")


def canonical(uri: str) -> str:
    """One spelling per artifact location: proxied URIs as the destination they map to, local paths absolute,
    ``.`` and ``..`` resolved, no trailing slash."""
    parsed = urlparse(uri)
    if parsed.scheme == "mlflow-artifacts":
        return proxied_location(parsed.path)
    if parsed.scheme in {"http", "https"} and "/mlflow-artifacts/artifacts" in parsed.path:
        return proxied_location(parsed.path.split("/mlflow-artifacts/artifacts", 1)[1])
    if parsed.scheme in {"", "file"} or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        return posixpath.normpath(os.path.abspath(parsed.path if parsed.scheme == "file" else uri))
    path = posixpath.normpath("/" + parsed.path).rstrip("/")
    return f"{parsed.scheme}://{parsed.netloc}{'' if path == '/' else path}"


def _digests_tag() -> str:
    from pipelines.models import DIGESTS_TAG

    return DIGESTS_TAG


def _error(message: str) -> dict[str, str]:
    return {"error_code": "PERMISSION_DENIED", "message": message}


def _forbidden(message: str):
    from flask import Response

    return Response(json.dumps(_error(message)), status=403, mimetype="application/json")
