"""The deployment files in infra/ are valid and agree with the project: files they copy exist, the
commands they run are real entry points with valid configs, versions match the pins, servers bind to
loopback, Ray token authentication is on and Dask talks TLS only. (Building images needs Docker, which CI
does not have.)"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipelines.infer.cluster import task_resources
from tests.helpers import ROOT
from unet.config import InferConfig, load_config

INFRA = ROOT / "infra"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))
PINS = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
ALL_TEXT = {p: p.read_text() for p in [*YAML_FILES, INFRA / "docker" / "Dockerfile"]}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def test_expected_files_exist() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    assert {"docker/Dockerfile", "ray/rayjob.yaml", "ray/raycluster.yaml", "ray/cluster-launcher.yaml",
            "dask/daskcluster.yaml", "mlflow/docker-compose.yaml", "mlflow/.env.example",
            "mlflow/basic_auth.ini", "s3/jobs-policy.json", "s3/mlflow-server-policy.json"} <= names  # fmt: skip


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses(path: Path) -> None:
    assert documents(path)


def test_dockerfile_copies_existing_files_and_pins_torch() -> None:
    dockerfile = ALL_TEXT[INFRA / "docker" / "Dockerfile"]
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert f"ARG TORCH_VERSION={PINS['torch']}" in dockerfile
    assert "unet-wsi:cpu" in dockerfile and "unet-wsi:cuda" in dockerfile


def test_images_are_the_project_image() -> None:
    for path in YAML_FILES:
        for doc in documents(path):
            for image in walk(doc, "image"):
                if "unet-wsi" in str(image):
                    assert re.fullmatch(r"REGISTRY/unet-wsi:(cpu|cuda)", image), (path, image)


def pipeline_commands(text: str) -> list[list[str]]:
    """`python -m pipelines.X ...` command lines written in a file (YAML values or comments)."""
    flat = re.sub(r"\\\n\s*#?\s*", " ", text)  # join shell line continuations, also inside comments
    flat = re.sub(r"\n\s+(--set|--config)", r" \1", flat)  # and folded YAML scalars
    commands = []
    for match in re.finditer(r"python -m pipelines\.\w+[^\n&|]*", flat):
        commands.append(shlex.split(match.group(0).split("#")[0]))
    return commands


def test_commands_are_real_entry_points_with_valid_configs() -> None:
    seen = 0
    for path, text in ALL_TEXT.items():
        for command in pipeline_commands(text):
            module = command[2]
            where = ROOT / module.replace(".", "/")  # a module, or a package run by its __main__
            assert where.with_suffix(".py").is_file() or (where / "__main__.py").is_file(), (path, module)
            config = command[command.index("--config") + 1] if "--config" in command else None
            overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
            if config:
                assert (ROOT / config).is_file(), (path, config)
                load_config(ROOT / config, overrides)  # raises on an unknown key or a bad value
            seen += 1
    assert seen >= 3  # train on KubeRay and the launcher, infer on Dask


def test_ray_versions_and_token_auth() -> None:
    for name in ("rayjob.yaml", "raycluster.yaml"):
        text = ALL_TEXT[INFRA / "ray" / name]
        (doc,) = documents(INFRA / "ray" / name)
        versions = list(walk(doc, "rayVersion"))
        assert versions and all(v == PINS["ray"] for v in versions)
        assert "RAY_AUTH_MODE, value: token" in text and "RAY_AUTH_TOKEN" in text
    assert "RAY_AUTH_MODE=token" in ALL_TEXT[INFRA / "ray" / "cluster-launcher.yaml"]


def test_dask_workers_offer_the_gpu_resource_the_tasks_ask_for() -> None:
    (doc,) = documents(INFRA / "dask" / "daskcluster.yaml")
    args = next(iter(walk(doc["spec"]["worker"], "args")))
    assert "--resources" in args and args[args.index("--resources") + 1] == "GPU=1"
    tasks = InferConfig(device="cuda").tasks  # one GPU worker keeps this many chunks in flight
    assert int(args[args.index("--nthreads") + 1]) == tasks
    assert task_resources("cuda", tasks) == {"GPU": 1 / tasks} and task_resources("cpu", tasks) is None
    # non-daemonic, so that each may start its post-processing processes (on CUDA by default)
    env = {item["name"]: item.get("value") for item in next(iter(walk(doc["spec"]["worker"], "env")))}
    assert env["DASK_DISTRIBUTED__WORKER__DAEMON"] == "False"


def test_dask_talks_tls_only_with_certificates_from_a_secret() -> None:
    """Whoever reaches a Dask scheduler runs code on its workers: scheduler and workers listen and connect with
    TLS only (certificates from the secret dask-tls, encryption required, the workers given the tls:// address,
    not the operator's tcp:// one), and the documented client command passes its certificates.
    tests/test_dask_tls.py runs these flags and this environment."""
    from distributed.cli.dask_scheduler import main as dask_scheduler
    from distributed.cli.dask_worker import main as dask_worker

    path = INFRA / "dask" / "daskcluster.yaml"
    (doc,) = documents(path)
    for role, command in (("scheduler", dask_scheduler), ("worker", dask_worker)):
        pod = doc["spec"][role]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert args[:2] == ["dask", role]
        options = {option for param in command.params for option in param.opts}
        assert {arg for arg in args[2:] if arg.startswith("--")} <= options, role  # real flags of the installed CLI
        assert args[args.index("--protocol") + 1] == "tls", role
        secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        (mount,) = (m for m in container["volumeMounts"] if secrets.get(m["name"], {}).get("secretName") == "dask-tls")
        mode = secrets[mount["name"]].get("defaultMode", 0o644)
        assert mount.get("readOnly") and not mode & 0o007, (role, oct(mode))  # the key is not world-readable
        for flag, name in (("--tls-ca-file", "ca.pem"), ("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
            assert args[args.index(flag) + 1] == f"{mount['mountPath']}/{name}", (role, flag)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True", role
    (worker,) = doc["spec"]["worker"]["spec"]["containers"]
    ports = {p["name"]: p["port"] for p in doc["spec"]["scheduler"]["service"]["ports"]}
    address = {e["name"]: e.get("value") for e in worker["env"]}["DASK_SCHEDULER_ADDRESS"]
    assert address == f"tls://{doc['metadata']['name']}-scheduler:{ports['tcp-comm']}"
    (command,) = (c for c in pipeline_commands(ALL_TEXT[path]) if c[2] == "pipelines.infer")
    overrides = dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--set")
    assert overrides["infer.scheduler"].startswith("tls://")
    assert {"infer.tls_ca_file", "infer.tls_cert", "infer.tls_key"} <= set(overrides)


def test_mlflow_stack_binds_to_loopback_with_a_database_and_object_store() -> None:
    (compose,) = documents(INFRA / "mlflow" / "docker-compose.yaml")
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    command = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql+psycopg2://" in command and "--artifacts-destination s3://" in command
    assert "--allowed-hosts" in command and "--cors-allowed-origins" in command
    assert {"postgres", "minio", "mlflow"} <= set(services)
    assert "psycopg2-binary" in PINS and "boto3" in PINS


def test_mlflow_server_has_accounts_with_its_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server.auth.config import read_auth_config

    (compose,) = documents(INFRA / "mlflow" / "docker-compose.yaml")
    service = compose["services"]["mlflow"]
    command, env = service["command"], service["environment"]
    # the app is this project's entry point (basic-auth where only MANAGE moves champion)
    app = re.search(r"--app-name (\S+)", command).group(1)
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mlflow.app"][app]
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    # the file mounted where MLFLOW_AUTH_CONFIG_PATH points is basic_auth.ini, read here as the server reads it
    mounts = dict(volume.split(":")[:2] for volume in service["volumes"])
    assert mounts["./basic_auth.ini"] == env["MLFLOW_AUTH_CONFIG_PATH"]
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / "basic_auth.ini"))
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    auth = read_auth_config()
    backend = re.search(r"--backend-store-uri (\S+)", command).group(1)
    assert auth.database_uri == backend  # the accounts live in the runs' database
    assert auth.default_permission == "READ" and auth.admin_username and auth.admin_password is None
    assert urlparse(backend).password is None  # the database password is PGPASSWORD, not in the command line
    env_example = (INFRA / "mlflow" / ".env.example").read_text()
    # the server's own S3 account (infra/s3/mlflow-server-policy.json; the jobs' is another: tests/test_s3_policies.py)
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        variable = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", env[name])  # required: compose refuses to start without
        assert variable and f"\n{variable.group(1)}=" in env_example, name


def test_cluster_jobs_keep_their_data_on_object_storage_with_credentials() -> None:
    launcher = yaml.safe_load((INFRA / "ray" / "cluster-launcher.yaml").read_text())
    env_file = "--env-file /home/ubuntu/mlflow-account.env"
    assert env_file in launcher["docker"]["run_options"] and env_file.split()[-1] in launcher["file_mounts"]
    locations = 0
    for path, text in ALL_TEXT.items():
        for command in pipeline_commands(text):
            for override in (command[i + 1] for i, arg in enumerate(command) if arg == "--set"):
                key, _, value = override.partition("=")
                if key in {"data.store", "train.storage_path", "infer.input", "infer.output"}:
                    assert value.startswith("s3://"), (path, override)  # every node reaches it
                    locations += 1
    assert locations >= 6
    for path in (INFRA / "ray" / "rayjob.yaml", INFRA / "ray" / "raycluster.yaml", INFRA / "dask" / "daskcluster.yaml"):
        (doc,) = documents(path)
        containers = [c for group in walk(doc, "containers") for c in group if c["name"] != "scheduler"]
        assert containers
        for container in containers:  # each reads or writes the data: S3 credentials from the secret
            secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
            assert secrets.get("AWS_ACCESS_KEY_ID") == secrets.get("AWS_SECRET_ACCESS_KEY") == "s3-credentials"
            # and logs to (or loads models from) MLflow as the service account, never anonymously
            account = secrets.get("MLFLOW_TRACKING_USERNAME"), secrets.get("MLFLOW_TRACKING_PASSWORD")
            assert account == ("mlflow-account", "mlflow-account")
