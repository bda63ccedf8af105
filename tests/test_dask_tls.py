"""Dask over TLS: a real `dask scheduler` and `dask worker` started with the TLS flags and environment of
infra/dask/daskcluster.yaml and certificates made here (a CA, the cluster's certificate, a client's). Inference
through them equals a local run; clients without a certificate of that CA, and plain TCP, are refused; a job with
a TLS setting missing or wrong stops with one line before it writes anything, and never prints a certificate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed import Client

from pipelines.infer.cluster import client_security, start_dask
from tests.helpers import ROOT, environment, free_port
from tests.test_infer import infer, stored
from unet.config import InferConfig
from unet.errors import UserError

MANIFEST = ROOT / "infra" / "dask" / "daskcluster.yaml"
MOUNT = "/etc/dask-tls"  # where the manifest mounts the secret dask-tls
BIN = Path(sys.executable).parent
TLS_KEYS = ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert", "distributed.comm.tls.client.key",
            "distributed.comm.require-encryption")  # fmt: skip


# ---------------------------------------------------------------- certificates, as docs/operations.md makes them


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


def make_ca(folder: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA of its own: ``FOLDER/ca.pem`` (its key stays in memory, as it would stay offline)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], folder: Path, stem: str) -> None:
    """``FOLDER/STEM.crt`` and ``STEM.key`` signed by ``ca``, for 127.0.0.1 and localhost, as server and client."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"unet-dask {stem}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(names, critical=False)
        .add_extension(usage, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, folder / f"{stem}.key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FOLDER/cluster: the secret dask-tls (ca.pem, tls.crt, tls.key) and a client's client.crt and client.key;
    FOLDER/stranger: the same from another CA."""
    folder = tmp_path_factory.mktemp("certs")
    cluster = make_ca(folder / "cluster", "unet-dask test CA")
    issue(cluster, folder / "cluster", "tls")
    issue(cluster, folder / "cluster", "client")
    other = make_ca(folder / "stranger", "another CA")
    issue(other, folder / "stranger", "client")
    return folder


@pytest.fixture(autouse=True)
def no_tls_from_the_environment() -> Iterator[None]:
    """The tests choose their own TLS settings: none inherited from DASK_DISTRIBUTED__COMM__TLS__... variables."""
    with dask.config.set(dict.fromkeys(TLS_KEYS)):
        yield


def tls_settings(folder: Path) -> list[str]:
    return [f"infer.tls_ca_file={folder / 'ca.pem'}", f"infer.tls_cert={folder / 'client.crt'}",
            f"infer.tls_key={folder / 'client.key'}"]  # fmt: skip


# ---------------------------------------------------------------- a TLS cluster started as the manifest starts it


def manifest_tls(role: str, certs: Path) -> tuple[list[str], dict[str, str]]:
    """The TLS flags and Dask environment that infra/dask/daskcluster.yaml gives ``role``, with the secret's
    mount point replaced by ``certs``."""
    (doc,) = (d for d in yaml.safe_load_all(MANIFEST.read_text()) if d)
    (container,) = doc["spec"][role]["spec"]["containers"]
    args = container["args"]
    flags = [item for flag in ("--protocol", "--tls-ca-file", "--tls-cert", "--tls-key")
             for item in (flag, args[args.index(flag) + 1].replace(MOUNT, str(certs)))]  # fmt: skip
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("DASK_DISTRIBUTED__")}
    return flags, env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([str(BIN / "dask"), *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**environment(), **env}, start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def tls_cluster(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `dask scheduler` and a `dask worker` on 127.0.0.1 talking TLS only; yields the scheduler's address."""
    logs = tmp_path_factory.mktemp("dask-logs")
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    flags, env = manifest_tls("scheduler", certs / "cluster")
    assert flags[:2] == ["--protocol", "tls"] and env == {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    scheduler = start(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
                       "127.0.0.1:0", *flags], env, logs / "scheduler.log")  # fmt: skip
    flags, env = manifest_tls("worker", certs / "cluster")
    env["DASK_SCHEDULER_ADDRESS"] = address  # as the manifest gives the scheduler's address, tls://
    worker = start(["worker", "--host", "127.0.0.1", "--nthreads", "2", "--name", "tls-worker",
                    "--dashboard-address", "127.0.0.1:0", *flags], env, logs / "worker.log")  # fmt: skip
    try:
        security = client_security(InferConfig(scheduler=address, **files(certs / "cluster")))
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, security=security, timeout="5s") as client:
                    client.wait_for_workers(1, timeout=60)
                break
            except (OSError, TimeoutError):
                logs_now = "\n".join(p.read_text()[-2000:] for p in logs.iterdir())
                assert time.monotonic() < deadline and scheduler.poll() is None, logs_now
                time.sleep(1)
        yield address
    finally:
        for proc in (worker, scheduler):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def files(folder: Path) -> dict[str, str]:
    return {"tls_ca_file": str(folder / "ca.pem"), "tls_cert": str(folder / "client.crt"),
            "tls_key": str(folder / "client.key")}  # fmt: skip


# ---------------------------------------------------------------- through the cluster


@pytest.mark.slow
@pytest.mark.cluster
def test_inference_over_tls_equals_a_local_run(trained_model_dir, cmu_ome_zarr, certs, tls_cluster, tmp_path,
                                               capsys, caplog) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    small = ["infer.level=1", "infer.chunk_size=256", "infer.tile_size=128"]
    remote = tmp_path / "remote.ome.zarr"
    code = infer(tmp_path, trained_model_dir, cmu_ome_zarr, remote, *small, f"infer.scheduler={tls_cluster}",
                 *tls_settings(certs / "cluster"))  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    log = printed.out + printed.err + caplog.text
    assert f"Dask scheduler {tls_cluster} over TLS (CA {certs / 'cluster' / 'ca.pem'}" in log  # paths are shown
    assert "BEGIN" not in log and "PRIVATE KEY" not in log  # certificates and keys never
    local = tmp_path / "local.ome.zarr"
    assert infer(tmp_path, trained_model_dir, cmu_ome_zarr, local, *small) == 0
    for a, b in zip(stored(remote), stored(local), strict=True):
        assert a.size and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.cluster
def test_the_certificates_can_come_from_the_dask_config(certs, tls_cluster) -> None:
    """infer.tls_* null: the usual Dask keys (DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...) are used."""
    folder = certs / "cluster"
    with dask.config.set({"distributed.comm.tls.ca-file": str(folder / "ca.pem"),
                          "distributed.comm.tls.client.cert": str(folder / "client.crt"),
                          "distributed.comm.tls.client.key": str(folder / "client.key")}):  # fmt: skip
        client, cluster = start_dask(InferConfig(scheduler=tls_cluster))
    try:
        assert cluster is None and client.submit(sum, [20, 22]).result(timeout=30) == 42
    finally:
        client.close()


def refused_by_the_scheduler(address: str, context: ssl.SSLContext) -> bool:
    """Whether the scheduler refuses a Dask connection made with ``context``: it ends the connection (a certificate
    it does not accept) instead of answering the ``identity`` request."""
    from distributed.comm import CommClosedError, connect

    async def identity() -> dict:
        comm = await connect(address, timeout=10, ssl_context=context)
        try:
            await comm.write({"op": "identity"})
            return await asyncio.wait_for(comm.read(), 10)
        finally:
            comm.abort()

    try:
        asyncio.run(identity())
    except (CommClosedError, OSError):
        return True
    return False


def connected(dask_scheduler) -> list[str]:
    """The clients a scheduler knows (run on the scheduler)."""
    return [name for name in dask_scheduler.clients if name != "fire-and-forget"]


@pytest.mark.slow
@pytest.mark.cluster
def test_clients_without_a_certificate_of_the_cluster_ca_are_refused(certs, tls_cluster) -> None:
    cluster, stranger = certs / "cluster", certs / "stranger"

    def context(ca: Path, cert: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.check_hostname = False  # as Dask does: the cluster's own CA is the identity, not host names
        if cert:
            ctx.load_cert_chain(cert.with_suffix(".crt"), cert.with_suffix(".key"))
        return ctx

    # the scheduler itself refuses: no certificate, or one from another CA (the scheduler is trusted either way)
    assert refused_by_the_scheduler(tls_cluster, context(cluster / "ca.pem"))
    assert refused_by_the_scheduler(tls_cluster, context(cluster / "ca.pem", stranger / "client"))
    assert not refused_by_the_scheduler(tls_cluster, context(cluster / "ca.pem", cluster / "client"))  # the control
    started = time.monotonic()
    attempts = {
        "no certificate": {},
        "another CA's certificate": {
            "security": client_security(InferConfig(scheduler=tls_cluster, **files(stranger)))
        },
        "plain TCP to the TLS port": {"address": tls_cluster.replace("tls://", "tcp://")},
    }
    for name, attempt in attempts.items():
        with pytest.raises((OSError, TimeoutError, TypeError)):  # TypeError: Dask's client has no TLS context
            Client(
                attempt.get("address", tls_cluster),
                security=attempt.get("security"),
                timeout="10s",
                set_as_default=False,
            )  # a refused one stays the default otherwise: later computations go to it
            pytest.fail(f"connected with {name}")
    assert time.monotonic() - started < 60  # refused, not hanging until some long timeout
    # and none of them got in: the scheduler knows one client, this one
    with Client(tls_cluster, security=client_security(InferConfig(scheduler=tls_cluster, **files(cluster)))) as good:
        deadline = time.monotonic() + 30  # clients closed by earlier tests leave the scheduler's list shortly
        while (clients := good.run_on_scheduler(connected)) != [good.id] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert clients == [good.id]
    # what pipelines.infer says to a scheduler that refuses its certificate
    other_cert = {"tls_cert": str(stranger / "client.crt"), "tls_key": str(stranger / "client.key")}
    with pytest.raises(UserError, match=f"Dask scheduler at {tls_cluster} refused the TLS connection") as error:
        start_dask(InferConfig(scheduler=tls_cluster, tls_ca_file=str(cluster / "ca.pem"), **other_cert))
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- settings checked before anything is written


def test_a_missing_or_wrong_tls_setting_stops_the_job_in_one_line(certs, tmp_path, capsys) -> None:
    folder = certs / "cluster"
    image, output = tmp_path / "slide.zarr", tmp_path / "out.ome.zarr"  # never opened: the settings fail first
    address = f"tls://127.0.0.1:{free_port()}"
    cases = [
        (
            [f"infer.scheduler={address}"],
            f"infer.scheduler={address} needs TLS certificates; not set: infer.tls_ca_file (or "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE), infer.tls_cert (or DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT)",
        ),
        (
            [f"infer.scheduler={address}", f"infer.tls_ca_file={folder / 'ca.pem'}"],
            "not set: infer.tls_cert (or DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT)",
        ),
        (
            [f"infer.scheduler={address}", *tls_settings(folder), f"infer.tls_cert={tmp_path / 'nowhere.crt'}"],
            f"infer.tls_cert: no such file: {tmp_path / 'nowhere.crt'}",
        ),
        (
            [f"infer.scheduler={address}", *tls_settings(folder), f"infer.tls_key={certs / 'stranger' / 'client.key'}"],
            f"cannot load the Dask TLS files (CA {folder / 'ca.pem'}, certificate {folder / 'client.crt'}, key "
            f"{certs / 'stranger' / 'client.key'}): [",
        ),
        (
            [f"infer.scheduler={address.replace('tls', 'tcp')}", *tls_settings(folder)],
            f"infer.scheduler={address.replace('tls', 'tcp')} is unencrypted but TLS is configured (infer.tls_ca_file, "
            "infer.tls_cert, infer.tls_key): use tls://HOST:PORT",
        ),
        (
            [f"infer.scheduler={address.replace('tls://', '')}", "infer.require_encryption=true"],
            "is unencrypted but infer.require_encryption is true: use tls://HOST:PORT",
        ),
    ]
    for overrides, message in cases:
        assert infer(tmp_path, "models:/none@champion", image, output, *overrides) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing is written"


def test_certificates_given_inline_are_never_printed(certs) -> None:
    """The Dask config may hold the PEM text itself: messages name it '(inline PEM)'."""
    folder = certs / "cluster"
    inline = {"distributed.comm.tls.ca-file": str(folder / "ca.pem"),
              "distributed.comm.tls.client.cert": (folder / "client.crt").read_text()}  # fmt: skip
    wrong_key = {"distributed.comm.tls.client.key": (certs / "stranger" / "client.key").read_text()}
    with dask.config.set({**inline, **wrong_key}), pytest.raises(UserError) as error:
        client_security(InferConfig(scheduler="tls://127.0.0.1:8786"))
    message = str(error.value)
    assert "certificate (inline PEM), key (inline PEM)" in message and "BEGIN" not in message, message
    with dask.config.set({**inline, "distributed.comm.tls.client.key": (folder / "client.key").read_text()}):
        security = client_security(InferConfig(scheduler="tls://127.0.0.1:8786"))
    assert security.require_encryption and "BEGIN" not in repr(security)


def test_tcp_with_certificates_needs_an_explicit_opt_out(certs, caplog) -> None:
    """A tcp:// scheduler while certificates are configured is refused; require_encryption=false accepts it with a
    warning (the certificates unused); a tcp:// scheduler without certificates is as before."""
    folder, address = certs / "cluster", "tcp://127.0.0.1:8786"
    with pytest.raises(UserError, match="is unencrypted but TLS is configured"):
        client_security(InferConfig(scheduler=address, **files(folder)))
    security = client_security(InferConfig(scheduler=address, require_encryption=False, **files(folder)))
    assert not security.require_encryption and "are not used" in caplog.text and "BEGIN" not in caplog.text
    assert not client_security(InferConfig(scheduler=address)).require_encryption
    required = dask.config.set({"distributed.comm.require-encryption": True})  # its environment variable's effect
    with required, pytest.raises(UserError, match=r"but distributed.comm.require-encryption \(DASK_DISTRIBUTED__COMM"):
        client_security(InferConfig(scheduler=address))


def test_how_the_job_reaches_dask_is_not_part_of_what_an_output_is(certs) -> None:
    """An output started on a local cluster is resumed through a TLS scheduler, and the other way round, and
    outputs written before these settings existed still match."""
    from pipelines.infer.output import lineage_matches
    from unet.config import Config, flatten_config

    def lineage(**infer) -> dict:
        config = Config(infer=InferConfig(**infer))
        return {"model_uri": "m", "input": "i", "level": 0, "config": flatten_config(config)}

    local = lineage()
    remote = lineage(scheduler="tls://127.0.0.1:8786", require_encryption=True, **files(certs / "cluster"))
    assert lineage_matches(local, remote) and lineage_matches(remote, local)
    older = {**local, "config": {k: v for k, v in local["config"].items() if "tls" not in k and "encryption" not in k}}
    assert lineage_matches(older, remote)
    assert not lineage_matches(local, lineage(threshold=0.6))  # the control: a setting that changes the output
