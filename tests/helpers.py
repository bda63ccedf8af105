"""Shared by the tests that run the pipelines as users do (subprocesses, servers, ports)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipelines.checkpoints import recorded_by_ray
from unet import storage

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

SMALL = [
    "model.base_channels=8",
    "data.patch_size=128",
    "train.batch_size=4",
    "train.steps_per_epoch=10",
    "train.warmup_steps=0",
    "train.lr=0.003",
    "train.num_workers=2",
]


def train_command(workspace: Path, run_name: str, epochs: int, *extra: str) -> list[str]:
    overrides = [*SMALL, f"data.store={workspace / 'he.zarr'}", f"train.run_name={run_name}", f"train.epochs={epochs}"]
    overrides += ["train.storage_path=runs", "tracking.registered_model=unet-test", *extra]
    return [sys.executable, "-m", "pipelines.train", "--config", str(ROOT / "configs" / "train.yaml")] + [
        arg for o in overrides for arg in ("--set", o)
    ]


def in_the_foreground() -> None:
    """``preexec_fn`` for a job that a test interrupts as Ctrl-C in a terminal would: SIGINT back to its default in
    the child. A test run started in the background (``make test &``) hands SIGINT down ignored, and Python keeps
    an ignored SIGINT ignored: the job would not see the Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "RAY_ADDRESS"}}
    env["PYTHONPATH"] = str(ROOT)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_until_answers(url: str, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Return once ``url`` answers an HTTP request; fail if ``process`` (the server) exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.2)


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str, cwd: Path, *extra: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port; yields its URL once /health answers. ``env``: the
    server's environment (default: this process's); ``log``: a file for its output (default: discarded)."""
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", *extra]
    with open(log, "wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as output:
        server = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_answers(f"{url}/health", server, "mlflow server")
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL server binary {name!r} not found: install the postgresql package (.ci/run does)")
    return found


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust authentication, run as user postgres when we are
    root, which PostgreSQL requires); yields the SQLAlchemy URL of its database ``postgres``."""
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    as_user = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="unet-pg-"))  # outside pytest's root-only tmp tree
    data, sockets = root / "data", root / "sockets"
    data.mkdir()
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (root, data, sockets):
            shutil.chown(path, user)
    initdb = [*as_user, postgres_binary("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"]
    subprocess.run(initdb, check=True, capture_output=True)
    port = free_port()
    command = [*as_user, postgres_binary("postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1"]
    server = subprocess.Popen([*command, "-k", str(sockets)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = [postgres_binary("pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
        deadline = time.monotonic() + 60
        while subprocess.run(ready, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


S3_BUCKET = "unet-test"


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto in server mode) on a free loopback port with the bucket S3_BUCKET.

    Yields the environment a client needs, the same variables users set for MinIO or Ceph (the credentials
    are moto's dummies). Zarr (s3fs), Ray (pyarrow) and MLflow (boto3) all read them.
    """
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        wait_until_answers(env["AWS_ENDPOINT_URL"], server, "moto server", timeout=60)
        request = urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/{S3_BUCKET}", method="PUT")  # create bucket
        urllib.request.urlopen(request, timeout=10)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def s3_bucket() -> Iterator[str]:
    """``s3://S3_BUCKET`` on a fresh s3_server(); the AWS_* variables point this process and its children at it."""
    import s3fs

    with s3_server() as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(key, raising=False)
        # fsspec caches filesystems by their arguments, not by the environment: one made for an earlier
        # module's server (another port, gone now) would be reused
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield f"s3://{S3_BUCKET}"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def objects(location: str | Path) -> list[str]:
    """Names of the files (objects) under a folder or object-store prefix, relative to it."""
    fs, root = storage.filesystem(location)
    return sorted(key[len(root.rstrip("/")) + 1 :] for key in fs.find(root))


def ray_processes(pid: int) -> list[str]:
    """The names of the processes under the job ``pid`` (a Ray actor's: ``ray::Class``, whatever method it runs)."""
    names = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()  # empty for a process that has just ended
            ray_actor = command and command[0].startswith("ray::")
            names.append(command[0].split(".")[0] if ray_actor else child.name())
    return names


def wait_for_checkpoint(run_dir: str | Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not recorded_by_ray(run_dir):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def assert_valid_ngff(output: str | Path) -> None:
    """An inference output as NGFF tools see it: every group valid NGFF 0.5 (the ome-zarr-models validator, which
    also checks each array's dimension_names), a YX label image of the probability image for ome-zarr-py's Reader
    (napari's plugin), the probability a named grey channel."""
    import ngio
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    root = zarr.open_group(output, mode="r")
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    ImageLabel.from_zarr(root["labels/nuclei"])
    labels = [node for node in Reader(parse_url(str(output)))() if any(isinstance(s, Label) for s in node.specs)]
    assert len(labels) == 1 and labels[0].data[0].ndim == 2, "one label image, YX"
    assert [c["label"] for c in root.attrs["ome"]["omero"]["channels"]] == ["foreground probability"]
    # ngio sees all three parts; its default open (read-write), which rewrote the labels group of outputs it could
    # not read with an empty list, leaves every file as it was
    metadata = {path: path.read_bytes() for path in Path(output).rglob("zarr.json")}
    container = ngio.open_ome_zarr_container(str(output))
    assert {path: path.read_bytes() for path in Path(output).rglob("zarr.json")} == metadata
    assert container.list_labels() == ["nuclei"] and container.get_label("nuclei").shape == labels[0].data[0].shape
    assert container.list_tables() == ["nuclei"]
    table = container.get_table("nuclei")
    assert table.reference_label == "nuclei" and table.dataframe.index.name == "id"
