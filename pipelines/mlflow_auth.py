"""Accounts on the team MLflow server (the app ``unet-basic-auth``, ``pipelines.mlflow_app``): who may read,
write and crown.

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

from pipelines.cli import make_parser, run
from pipelines.registry import PASSWORD_ENV, USERNAME_ENV
from unet.config import Config
from unet.errors import UserError, first_line

PROG = "python -m pipelines.mlflow_auth"
READ, EDIT, MANAGE = "READ", "EDIT", "MANAGE"
RANK = {READ: 1, EDIT: 2, MANAGE: 3}


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
