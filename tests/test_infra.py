"""The deployment files in infra/ are valid and agree with the project: files they copy exist, the
commands they run are real entry points with valid configs, versions match the pins, servers bind to
loopback and Ray token authentication is on. (Building images needs Docker, which CI does not have.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.dask_cluster import task_resources
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
            "dask/daskcluster.yaml", "mlflow/docker-compose.yaml", "mlflow/.env.example"} <= names  # fmt: skip


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
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), (path, module)
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


def test_cluster_jobs_keep_their_data_on_object_storage_with_credentials() -> None:
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
