"""Least privilege on the object store (infra/s3/*.json, made into MinIO accounts by infra/mlflow/docker-compose.yaml):
the jobs' S3 account can neither read, write nor delete the MLflow artifact bucket, where registered models live,
only the server's account can; the server's account cannot touch the jobs' data. Checked on a real S3 server that
enforces IAM policies (moto with authentication on), given the buckets, accounts and policies as compose makes
them; then an MLflow server with its own account serving a model a job registered through it."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from tests.helpers import ROOT, environment, free_port, mlflow_server, wait_until_answers

COMPOSE = ROOT / "infra" / "mlflow" / "docker-compose.yaml"


def accounts_in_compose() -> tuple[list[str], dict[str, Path]]:
    """The buckets compose makes, and for each account (by the variable holding its key id) its policy file."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    script = services["create-buckets-and-accounts"]["entrypoint"]
    buckets = re.search(r"mc mb --ignore-existing ((?:local/\S+ ?)+)", script).group(1).replace("local/", "").split()
    policies = dict(re.findall(r"mc admin policy create local (\S+) /policies/(\S+\.json)", script))
    attached = re.findall(r"mc admin policy attach local (\S+) --user \$\$\{(\w+)\}", script)
    users = {variable: ROOT / "infra" / "s3" / policies[policy] for policy, variable in attached}
    server_env = services["mlflow"]["environment"]
    assert server_env["AWS_ACCESS_KEY_ID"].startswith("${MLFLOW_S3_ACCESS_KEY_ID")  # the server's own account
    return buckets, users


@contextlib.contextmanager
def s3_with_policies() -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    """moto in server mode: compose's buckets and accounts made unauthenticated, then every request authenticated
    and authorised by the accounts' policies. Yields its URL and each account's AWS_* variables."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/moto-api/", server, "moto server", timeout=60)
        setup = {
            "endpoint_url": url,
            "region_name": "us-east-1",
            "aws_access_key_id": "x",
            "aws_secret_access_key": "x",
        }
        s3, iam = boto3.client("s3", **setup), boto3.client("iam", **setup)
        buckets, users = accounts_in_compose()
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        accounts = {}
        for variable, policy in users.items():
            name = variable.removesuffix("_ACCESS_KEY_ID").lower()
            iam.create_user(UserName=name)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            iam.put_user_policy(UserName=name, PolicyName=policy.stem, PolicyDocument=policy.read_text())
            secret = key["SecretAccessKey"]
            accounts[variable] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": secret,
                                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}  # fmt: skip
        enforce = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        urllib.request.urlopen(enforce, timeout=10)  # from now on: authenticated, and only what a policy allows
        yield url, accounts
    finally:
        server.terminate()
        server.wait(timeout=30)


def attempt(account: dict[str, str], bucket: str, operation: str) -> str:
    client = boto3.client("s3", endpoint_url=account["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=account["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=account["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    key = "artifacts/1/models/m-1/artifacts/data/unet/weights.safetensors"
    try:
        if operation == "put":
            client.put_object(Bucket=bucket, Key=key, Body=b"weights")
        elif operation == "get":
            client.get_object(Bucket=bucket, Key=key)
        elif operation == "list":
            client.list_objects_v2(Bucket=bucket)
        elif operation == "multipart":
            client.create_multipart_upload(Bucket=bucket, Key=key)
        else:
            client.delete_object(Bucket=bucket, Key=key)
    except ClientError as error:
        return error.response["Error"]["Code"]
    return "allowed"


OPERATIONS = ("put", "get", "list", "multipart", "delete")


def test_the_jobs_account_cannot_reach_the_model_registrys_artifacts() -> None:
    with s3_with_policies() as (_, accounts):
        assert set(accounts) == {"MLFLOW_S3_ACCESS_KEY_ID", "JOBS_S3_ACCESS_KEY_ID"}
        server, jobs = accounts["MLFLOW_S3_ACCESS_KEY_ID"], accounts["JOBS_S3_ACCESS_KEY_ID"]
        assert [attempt(server, "mlflow", op) for op in OPERATIONS] == ["allowed"] * 5
        assert [attempt(jobs, "unet", op) for op in OPERATIONS] == ["allowed"] * 5
        assert [attempt(jobs, "mlflow", op) for op in OPERATIONS] == ["AccessDenied"] * 5
        assert [attempt(server, "unet", op) for op in OPERATIONS] == ["AccessDenied"] * 5


def s3_as(account: dict[str, str]):
    return boto3.client("s3", endpoint_url=account["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=account["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=account["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


REGISTER = """import sys; from pipelines import registry, models; from unet.model import UNet
url = sys.argv[1]; client = registry.connect(url)
run = client.create_run(registry.experiment_id(client, 'unet', url)).info.run_id
version = models.log_and_register(run, UNet(3, 2, base_channels=4, depth=2), 'unet-s3', {}, url)
print(version, client.get_model_version_download_uri('unet-s3', version))
"""
LOAD = "import sys; from pipelines import models; models.load_model(sys.argv[2], sys.argv[1])"


@pytest.mark.slow
@pytest.mark.cluster  # an MLflow server on the object store: make test-cluster
def test_a_job_registers_through_the_server_and_cannot_touch_the_files_in_the_bucket(tmp_path: Path) -> None:
    """The deployment's shape: the server alone holds the artifact bucket's account; a job (with the jobs' S3 account
    for its data) logs, registers and loads a model through the server, and its own account is refused at the
    model's files in the bucket. Whoever does hold a key to the bucket and changes them there: the next load refuses
    the version."""
    with s3_with_policies() as (_, accounts):
        server_env = {**environment(), **accounts["MLFLOW_S3_ACCESS_KEY_ID"]}
        job_env = {**environment(), **accounts["JOBS_S3_ACCESS_KEY_ID"], "PYTHONPATH": str(ROOT)}
        backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
        with mlflow_server(backend, tmp_path, "--artifacts-destination", "s3://mlflow/artifacts", env=server_env,
                           log=tmp_path / "server.log") as url:  # fmt: skip

            def job(code: str, *args: str) -> subprocess.CompletedProcess[str]:
                command = [sys.executable, "-c", code, url, *args]
                return subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=300)

            registered = job(REGISTER)
            assert registered.returncode == 0, registered.stderr[-3000:] + (tmp_path / "server.log").read_text()[-3000:]
            version, location = registered.stdout.strip().splitlines()[-1].split()
            uri, key = f"models:/unet-s3/{version}", f"artifacts/{location.removeprefix('mlflow-artifacts:/')}"
            assert job(LOAD, uri).returncode == 0  # through the server, checked: as registered
            with pytest.raises(ClientError, match="AccessDenied"):
                s3_as(accounts["JOBS_S3_ACCESS_KEY_ID"]).put_object(Bucket="mlflow", Key=f"{key}/MLmodel", Body=b"x")
            bucket = s3_as(accounts["MLFLOW_S3_ACCESS_KEY_ID"])  # someone with the bucket's own key
            weights = bucket.get_object(Bucket="mlflow", Key=f"{key}/data/unet/weights.safetensors")["Body"].read()
            bucket.put_object(Bucket="mlflow", Key=f"{key}/data/unet/weights.safetensors", Body=weights[:-1] + b"\1")
            refused = job(LOAD, uri)
        assert refused.returncode != 0
        assert f"model version unet-s3/{version} ({uri}) is not the model that was registered: file " in refused.stderr
        assert "data/unet/weights.safetensors has changed" in refused.stderr
