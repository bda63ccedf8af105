"""Training against object storage, as on a cluster: the training store read from s3://, Ray Train
checkpoints written to and resumed from s3:// after the whole job is killed, and the model logged through
an `mlflow server` whose artifact store is s3:// (all on a real local S3-compatible server)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from pipelines.models import load_model
from pipelines.prepare import prepare
from pipelines.registry import connect
from tests.helpers import ROOT, environment, mlflow_server, objects, train_command, wait_for_checkpoint
from tests.test_train import stop_ray_leftovers
from unet.config import load_config
from unet.model_files import ARCHITECTURE_FILE, WEIGHTS_FILE, load_weights
from unet.storage import filesystem

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_training_with_store_checkpoints_and_artifacts_on_s3(s3: str, tmp_path: Path) -> None:
    store, runs = f"{s3}/stores/he.zarr", f"{s3}/runs"
    prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={store}"]), previews=0)
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_server(backend, tmp_path, "--artifacts-destination", f"{s3}/mlflow") as url:
        # the server and the job inherit the AWS_* variables, as pods would get them from a secret
        cmd = train_command(tmp_path, "s3run", 3, f"data.store={store}", f"train.storage_path={runs}",
                            f"tracking.tracking_uri={url}")  # fmt: skip
        first = subprocess.Popen(cmd, cwd=tmp_path, env=environment(), start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        wait_for_checkpoint(f"{runs}/s3run", first)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        stop_ray_leftovers()
        second = subprocess.run(cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-3000:]
        assert "resuming MLflow run" in output and "epoch 1/3" not in output and "epoch 3/3" in output

        checkpoints = sorted({key.split("/")[0] for key in objects(f"{runs}/s3run") if key.endswith(WEIGHTS_FILE)})
        assert len(checkpoints) >= 2 and not (tmp_path / "runs").exists()  # nothing went to a local folder
        mlflow_objects = objects(f"{s3}/mlflow")
        for name in (WEIGHTS_FILE, ARCHITECTURE_FILE, "MLmodel", "config.yaml"):
            assert any(key.endswith(f"/{name}") for key in mlflow_objects), (name, mlflow_objects)

        client = connect(url)
        version = client.get_model_version_by_alias("unet-test", "champion")
        assert version.tags["data.store_sha256"]
        model = load_model("models:/unet-test@champion", tracking_uri=url)  # artifacts come back from S3
        fs, root = filesystem(f"{runs}/s3run/{checkpoints[-1]}/best_model")
        local = tmp_path / "best_model"
        fs.get(root, str(local), recursive=True)
        best = load_weights(local)
        for (name, a), b in zip(model.state_dict().items(), best.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
