"""Training on a two-node Ray cluster (ray.cluster_utils.Cluster: a head and a second node, each its
own raylet): workers spread over both nodes, checkpoints on storage both reach, and losing the second
node mid-training still finishes the run with the right number of epochs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from pipelines.prepare import prepare
from tests.helpers import ROOT, environment, train_command, wait_for_checkpoint
from unet.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # several servers: `make test-cluster`


def test_two_node_training_survives_losing_a_node(tmp_path: Path) -> None:
    prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={tmp_path / 'he.zarr'}"]), previews=0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        cmd = train_command(tmp_path, "two-nodes", 4, "train.placement_strategy=SPREAD", "train.max_failures=3")
        env = {**environment(), "RAY_ADDRESS": cluster.address}
        job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_checkpoint(tmp_path / "runs" / "two-nodes", job)
        cluster.remove_node(second, allow_graceful=False)  # the second machine dies
        output, _ = job.communicate(timeout=900)
    finally:
        cluster.shutdown()
    assert job.returncode == 0, output[-4000:]
    assert "epochs          4" in output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("unet").experiment_id])[0]
    placements = [m.value for m in client.get_metric_history(run.info.run_id, "ray/worker_nodes")]
    assert placements[0] == 2  # the first attempt ran on both nodes
    assert placements[-1] == 1  # after the loss, the head alone finished the run
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == {0, 1, 2, 3}
