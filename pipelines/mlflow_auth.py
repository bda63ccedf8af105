"""Accounts on the team MLflow server: the server app, and the accounts a deployment needs.

The app ``unet-basic-auth`` (``mlflow server --app-name unet-basic-auth``, registered as an ``mlflow.app``
entry point in pyproject.toml) is MLflow's own ``basic-auth`` app (users and permissions in the auth
database, admin password from MLFLOW_AUTH_ADMIN_PASSWORD) with two rules added, both of which basic-auth
gives to EDIT:

* setting a protected alias (``champion``; UNET_PROTECTED_ALIASES, comma-separated, on the server
  changes the list) needs MANAGE on the registered model. The training service account has EDIT: it
  registers versions and moves ``candidate``, and only a person with MANAGE moves ``champion``.
  (Deleting any alias already needs MANAGE in basic-auth.)
* renaming a registered model needs MANAGE; with EDIT, renaming the model away and creating a new one of
  the same name (its creator gets MANAGE) would move ``champion`` by the back door.

Admins pass every check, as in basic-auth. Everything else is basic-auth unchanged.

The command sets up the accounts, as an admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), and
can be run again at any time (it changes only what differs)::

    python -m pipelines.mlflow_auth --config configs/train.yaml --passwords ~/mlflow-passwords \\
        --writer unet-train --reader alice --reader bob --manager carol

It creates the experiment ``tracking.experiment`` and the registered model ``tracking.registered_model``
(so that the service account never becomes their creator, who gets MANAGE), the accounts that do not exist
yet (each one's password read from the file PASSWORDS/NAME, or generated into it, mode 0600; never printed,
never on the command line) and grants: writers EDIT on both, readers READ, managers MANAGE on the model
and READ on the experiment.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import make_parser, run
from unet.config import Config
from unet.errors import UserError, first_line

if TYPE_CHECKING:
    from flask import Flask

APP_NAME = "unet-basic-auth"
PROG = "python -m pipelines.mlflow_auth"
PROTECTED_ALIASES_ENV = "UNET_PROTECTED_ALIASES"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
ALIAS_ROUTE, RENAME_ROUTE = "/mlflow/registered-models/alias", "/mlflow/registered-models/rename"
READ, EDIT, MANAGE = "READ", "EDIT", "MANAGE"
RANK = {READ: 1, EDIT: 2, MANAGE: 3}


# --- the server app -------------------------------------------------------------------------------------


def protected_aliases() -> frozenset[str]:
    """Aliases only MANAGE may set (lower case; the check ignores case): UNET_PROTECTED_ALIASES or champion."""
    from pipelines.registry import CHAMPION

    value = os.environ.get(PROTECTED_ALIASES_ENV, CHAMPION)
    return frozenset(alias.strip().lower() for alias in value.split(",") if alias.strip())


def create_app(app: Flask | None = None):
    """MLflow's basic-auth app with the two MANAGE rules above (the ``mlflow.app`` entry point)."""
    from mlflow.server import app as mlflow_app
    from mlflow.server import auth

    guard_routes(auth.BEFORE_REQUEST_VALIDATORS, auth.validate_can_manage_registered_model, protected_aliases())
    return auth.create_app(app or mlflow_app)


def guard_routes(validators: dict, can_manage: Callable[[], bool], protected: frozenset[str]) -> None:
    """Wrap basic-auth's validators of the set-alias and rename routes (REST and ajax paths) in place."""
    for (path, method), validator in list(validators.items()):
        if method != "POST" or getattr(validator, "unet_guarded", False):
            continue
        if path.endswith(ALIAS_ROUTE):
            validators[path, method] = _guarded(validator, lambda: _alias_in_request() in protected, can_manage)
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


def _alias_in_request() -> str:
    """The alias a set-alias request names, lower case ("" if it names none: then basic-auth rejects it)."""
    from flask import request

    body = request.get_json(silent=True) if request.method != "GET" else None
    alias = (body if isinstance(body, dict) else request.args).get("alias")
    return alias.strip().lower() if isinstance(alias, str) else ""


# --- accounts -------------------------------------------------------------------------------------------


def wanted_grants(writers: list[str], readers: list[str], managers: list[str]) -> dict[str, dict[str, str]]:
    """Per account, its permission on the ``experiment`` and on the ``registered_model`` (the highest role wins)."""
    roles = [(writers, EDIT, EDIT), (readers, READ, READ), (managers, READ, MANAGE)]
    grants: dict[str, dict[str, str]] = {}
    for names, on_experiment, on_model in roles:
        for name in names:
            current = grants.setdefault(name, {"experiment": on_experiment, "registered_model": on_model})
            for kind, level in (("experiment", on_experiment), ("registered_model", on_model)):
                if RANK[level] > RANK[current[kind]]:
                    current[kind] = level
    return grants


def account_password(folder: Path, username: str) -> tuple[str, bool]:
    """The password in ``folder/username``, or a new one written there (0600); True if it was made here."""
    path = folder / username
    if path.is_file():
        password = path.read_text().strip()
        if len(password) < 12:
            raise UserError(f"{path}: MLflow needs a password of at least 12 characters")
        return password, False
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password + "\n")
    return password, True


def setup_accounts(config: Config, writers: list[str], readers: list[str], managers: list[str],
                   passwords: Path) -> dict[str, dict[str, str]]:  # fmt: skip
    """Create the experiment, the registered model and the accounts, and grant the permissions; idempotent."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from pipelines import registry

    admin = os.environ.get(USERNAME_ENV)
    if not admin or not os.environ.get(PASSWORD_ENV):
        raise UserError(f"set {USERNAME_ENV} and {PASSWORD_ENV} to an admin account of the MLflow server")
    uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"accounts live on an MLflow server (http:// or https://), not {uri}; set MLFLOW_TRACKING_URI")
    grants = wanted_grants(writers, readers, managers)
    if not grants:
        raise UserError("name at least one account: --writer, --reader or --manager")
    client = registry.connect(uri)
    accounts = AuthServiceClient(uri)
    try:
        if not accounts.get_user(admin).is_admin:
            raise UserError(f"{USERNAME_ENV}={admin} is not an admin of {uri}; only an admin manages accounts")
        experiment = registry.experiment_id(client, config.tracking.experiment, uri)
        model = config.tracking.registered_model
        if not _exists(lambda: client.get_registered_model(model)):
            client.create_registered_model(model, description="U-Net for whole-slide segmentation (unet-wsi)")
            print(f"created registered model {model!r}")
        for username, wanted in grants.items():
            if _exists(lambda name=username: accounts.get_user(name)):
                print(f"account {username!r} exists (password unchanged)")
            else:
                password, made = account_password(passwords, username)
                accounts.create_user(username, password)
                source = "new, written to" if made else "from"
                print(f"created account {username!r} (password {source} {passwords / username})")
            _grant(accounts, username, "experiment", experiment, wanted["experiment"])
            _grant(accounts, username, "registered_model", model, wanted["registered_model"])
            print(f"  {username}: {wanted['experiment']} on experiment {config.tracking.experiment!r}, "
                  f"{wanted['registered_model']} on registered model {model!r}")  # fmt: skip
    except MlflowException as exc:
        raise UserError(f"setting up accounts on {uri} failed: {first_line(exc)[:300]}") from None
    return grants


def _exists(get: Callable[[], object]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        get()
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _grant(accounts, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Exactly ``permission`` (a creator's MANAGE, for one, is lowered to it)."""
    from mlflow.exceptions import MlflowException

    try:
        accounts.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if accounts.get_user_permission(username, resource_type, resource_id).permission != permission:
            accounts.revoke_user_permission(username, resource_type, resource_id)
            accounts.grant_user_permission(username, resource_type, resource_id, permission)


def main(config: Config, args: argparse.Namespace) -> dict:
    if args.passwords is None:
        raise UserError("--passwords DIR is required: the folder of the accounts' password files")
    return setup_accounts(config, args.writer, args.reader, args.manager, args.passwords)


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser(PROG, __doc__.splitlines()[0], default_config="configs/train.yaml")
    roles = parser.add_argument_group("accounts (each option repeatable)")
    roles.add_argument(
        "--writer", action="append", default=[], metavar="NAME", help=f"a job: {EDIT} on experiment and model"
    )
    roles.add_argument(
        "--reader", action="append", default=[], metavar="NAME", help=f"a person: {READ} on experiment and model"
    )
    roles.add_argument(
        "--manager", action="append", default=[], metavar="NAME", help=f"moves champion: {MANAGE} on the model"
    )
    parser.add_argument(
        "--passwords",
        type=Path,
        metavar="DIR",
        help="(required) password files, one per account, named after it; a new account's missing file is generated",
    )
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
