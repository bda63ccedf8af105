"""Where ``pipelines.infer`` runs its chunk tasks: an existing Dask cluster, or a local one it starts.

Local clusters listen on 127.0.0.1 only. On CPU, one worker runs inside the job's process by default
(nothing to start, the model loaded once); ``infer.workers: N`` starts N worker processes instead. On
CUDA there is one worker per GPU, each seeing only its own GPU through ``CUDA_VISIBLE_DEVICES`` and
offering the Dask resource ``GPU=1`` (as dask-cuda's ``LocalCUDACluster`` does); a single GPU is
driven from the job's own process. Every chunk task asks for ``1 / infer.tasks_per_worker`` of a GPU,
so each GPU worker keeps that many chunks in flight: one in the model, the others being read or
written. A remote GPU worker is started the same way:
``CUDA_VISIBLE_DEVICES=0 dask worker tls://HOST:8786 --nthreads 8 --resources GPU=1 --tls-ca-file ca.pem
--tls-cert tls.crt --tls-key tls.key`` (docs/operations.md, "Dask over TLS").

Security: whoever can talk to a Dask scheduler can run code on every worker. A cluster's scheduler is reached over
TLS (``tls://``) with certificates signed by the cluster's own CA, and a job refuses a ``tcp://`` scheduler once
certificates are configured (``client_security``). A local cluster of worker processes talks TLS too, with a
throw-away certificate that only the job and its workers hold in memory: its ports are on 127.0.0.1, but other
users of a shared machine reach those as well. A single in-process worker needs no port at all (``inproc://``).

The job's client is never the process's default Dask scheduler: its chunk tasks are submitted to it by name, and
every other Dask computation of the library in the same process (a slide's intensity bounds, ``pipelines.prepare``
run afterwards) stays on local threads, as designed, instead of going to a client made the default (``prepare``'s
graphs cannot be pickled for a remote scheduler).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unet.config import InferConfig
from unet.errors import UserError, first_line

if TYPE_CHECKING:
    from distributed import Client, Security, SpecCluster

log = logging.getLogger("infer")
LOOPBACK = "127.0.0.1"
ENCRYPTED = ("tls", "wss")  # the Dask protocols that run over TLS
# the job's TLS files: (InferConfig field, the Dask config key used when the field is null)
TLS_FILES = (
    ("tls_ca_file", "distributed.comm.tls.ca-file"),
    ("tls_cert", "distributed.comm.tls.client.cert"),
    ("tls_key", "distributed.comm.tls.client.key"),
)


def task_resources(device: str, tasks_per_worker: int = 1) -> dict[str, float] | None:
    """The Dask resources each chunk task asks for: on CUDA a share of one GPU (workers offer ``GPU=1``)."""
    return {"GPU": 1.0 / tasks_per_worker} if device == "cuda" else None


def worker_count(infer: InferConfig, gpus: list[str]) -> int:
    """Local workers: ``infer.workers``, or 1 on CPU and one per visible GPU on CUDA."""
    if infer.device != "cuda":
        return infer.workers or 1
    count = infer.workers or len(gpus)
    if count > len(gpus):
        raise UserError(f"infer.workers={count} but {len(gpus)} GPU(s) are visible; one worker drives one GPU")
    return count


def in_process(infer: InferConfig, gpus: list[str]) -> bool:
    """Whether the job starts a local cluster whose one worker runs inside the job's own process."""
    return not infer.scheduler and worker_count(infer, gpus) == 1


def start_dask(infer: InferConfig, gpus: list[str] | None = None) -> tuple[Client, SpecCluster | None]:
    """Connect to ``infer.scheduler``, or start the local cluster described above; ``gpus`` are the GPUs to
    use on CUDA (``unet.devices.visible_gpus()``)."""
    from distributed import Client, LocalCluster, Security

    if not log.isEnabledFor(logging.DEBUG):  # distributed sets its own levels when imported; -v shows its chatter
        logging.getLogger("distributed").setLevel(logging.WARNING)
        # a failed task is reported in one line by the job, and the tasks cancelled with its slide are expected
        logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)
    if infer.scheduler:
        security = client_security(infer)
        client = connect(infer.scheduler, security)
        if protocol(infer.scheduler) in ENCRYPTED:
            files = tls_files(security.tls_ca_file, security.tls_client_cert, security.tls_client_key)
            log.info("Dask scheduler %s over TLS (%s)", infer.scheduler, files)
        return client, None
    gpus = gpus or []
    workers = worker_count(infer, gpus)
    if not in_process(infer, gpus):
        _non_daemonic_workers()
    if infer.device == "cuda" and workers > 1:
        cluster = gpu_cluster(gpus[:workers], infer.tasks)
        return Client(cluster, set_as_default=False), cluster
    options: dict[str, Any]
    if in_process(infer, gpus):  # no port: Dask's encryption requirement, if configured, has nothing to apply to
        options = {"processes": False, "security": Security(require_encryption=False)}
    else:
        options = {"processes": True, "host": LOOPBACK, "security": Security.temporary(), "preload": preloads()}
    if infer.device == "cuda":
        options["resources"] = {"GPU": 1}
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=infer.tasks,
        dashboard_address=f"{LOOPBACK}:0",
        worker_dashboard_address=f"{LOOPBACK}:0",
        **options,
    )
    return Client(cluster, set_as_default=False), cluster


def _non_daemonic_workers() -> None:
    """Start the local worker processes non-daemonic (``distributed.worker.daemon``, for this process, where their
    Nannies start and restart them): a daemonic process may not start processes of its own, and each worker starts
    its post-processing processes (``infer.postprocess_processes``, by default on CUDA). The job closes them as it
    ends."""
    import dask

    dask.config.set({"distributed.worker.daemon": False})


def gpu_cluster(gpus: list[str], tasks_per_worker: int) -> SpecCluster:
    """One worker process per GPU in ``gpus``, each seeing only that GPU and offering ``GPU=1``."""
    from distributed import Nanny, Scheduler, Security, SpecCluster

    security = Security.temporary()  # TLS with a throw-away certificate held in memory (module docstring)
    tls = {"host": LOOPBACK, "protocol": "tls", "security": security}
    scheduler = {"cls": Scheduler, "options": {**tls, "dashboard_address": f"{LOOPBACK}:0"}}
    workers = {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {
                **tls,
                "nthreads": tasks_per_worker,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": gpu},
                "dashboard_address": f"{LOOPBACK}:0",
                "preload": preloads(),
            },
        }
        for gpu in gpus
    }
    return SpecCluster(scheduler=scheduler, workers=workers, security=security)


def preloads() -> list[str]:
    """What a local worker process imports as it starts, before its first task: Dask's own preloads
    (``distributed.worker.preload``) and the chunk tasks' module, with PyTorch, Zarr and SciPy. Imported by the
    first task instead, they took ~3 s of a worker's first chunk, counted in the slide's time (docs/benchmarks.md,
    "The pipeline around the model")."""
    import dask

    return [*dask.config.get("distributed.worker.preload", []), "pipelines.infer.tasks"]


def protocol(address: str) -> str:
    """The protocol of a Dask address (``tcp``, Dask's default, when it names none)."""
    return address.split("://", 1)[0].lower() if "://" in address else "tcp"


def env_name(key: str) -> str:
    """The environment variable that sets the Dask config ``key``."""
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


def shown(value: str | None) -> str:
    """A TLS setting as it may be printed: its path, never a certificate or key given inline."""
    return "(inline PEM)" if value and "\n" in value else str(value)


def _truthy(value: Any) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"} if isinstance(value, str) else bool(value)


def client_security(infer: InferConfig, warn: bool = True) -> Security:
    """How the job talks to ``infer.scheduler``: over TLS with its CA, certificate and key (``infer.tls_*``, each
    null: the Dask config key in ``TLS_FILES``) when the address is ``tls://``; in plain TCP otherwise, which is
    refused when encryption is required (``infer.require_encryption``, by default whenever certificates are
    configured). Every problem is a one-line ``UserError`` raised before the job writes anything: a missing
    setting, a file that does not exist, files that do not load. Paths are shown, certificates never. ``warn``:
    log that certificates configured go unused with a ``tcp://`` scheduler."""
    import dask
    from distributed import Security

    address = infer.scheduler or ""
    files: dict[str, tuple[str, str | None]] = {}  # field: (where it is set, value)
    for field, key in TLS_FILES:
        own = getattr(infer, field)
        value = own or dask.config.get(key, None) or None
        if value and "\n" not in value:  # a path (the Dask config may also hold the PEM text itself)
            value = str(Path(value).expanduser())
        files[field] = (f"infer.{field}" if own else f"{key} ({env_name(key)})", value)
    configured = [where for where, value in files.values() if value]
    required, why = infer.require_encryption, "infer.require_encryption is true"
    if required is None:
        key = "distributed.comm.require-encryption"
        required, why = _truthy(dask.config.get(key, None)), f"{key} ({env_name(key)}) is true"
        if dask.config.get(key, None) is None:
            required, why = bool(configured), f"TLS is configured ({', '.join(configured)})"
    if protocol(address) not in ENCRYPTED:
        if required:
            raise UserError(f"infer.scheduler={address} is unencrypted but {why}: use tls://HOST:PORT")
        if configured and warn:
            log.warning("infer.scheduler=%s is unencrypted (infer.require_encryption=false): the TLS settings %s "
                        "are not used", address, ", ".join(configured))  # fmt: skip
        return Security(require_encryption=False)
    missing = [f"infer.{field} (or {env_name(key)})" for field, key in TLS_FILES[:2] if not files[field][1]]
    if missing:
        raise UserError(f"infer.scheduler={address} needs TLS certificates; not set: {', '.join(missing)}")
    for where, value in files.values():
        if value and "\n" not in value and not Path(value).is_file():
            raise UserError(f"{where}: {'not a file' if Path(value).exists() else 'no such file'}: {value}")
    ca, cert, key = (files[field][1] for field, _ in TLS_FILES)
    try:
        security = Security(require_encryption=required, tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key)
        security.get_connection_args("client")  # loads the files
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UserError(f"cannot load the Dask TLS files ({tls_files(ca, cert, key)}): {first_line(exc)}") from None
    return security


def tls_files(ca: str | None, cert: str | None, key: str | None) -> str:
    """The client's TLS files, for messages: paths, never certificates or keys."""
    return f"CA {shown(ca)}, certificate {shown(cert)}, key {shown(key) if key else 'in the certificate file'}"


def connect(address: str, security: Security) -> Client:
    """A client of the scheduler at ``address``; one-line errors when it cannot be reached or refuses us."""
    from distributed import Client

    try:
        return Client(address, security=security, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        reason = first_line(exc)
        if "SSL" in reason or "TLS" in reason:
            raise UserError(f"Dask scheduler at {address} refused the TLS connection, or we refused its certificate "
                            f"(are both signed by the CA of infer.tls_ca_file?): {reason}") from None  # fmt: skip
        hint = " (a scheduler that talks TLS? use tls://)" if "reset by peer" in reason else ""
        raise UserError(f"Dask scheduler unreachable at {address}: {reason}{hint}") from None


def dashboard(client: Client, cluster: SpecCluster | None) -> str:
    """The dashboard's address (a local cluster's is on loopback, whatever host name Dask would print)."""
    if cluster is None:
        return client.dashboard_link
    return f"http://{LOOPBACK}:{cluster.scheduler.http_server.port}/status"


def run_chunks(client: Client, function, arguments: list[tuple], description: str, resources=None) -> list:
    """Submit one task per argument tuple, show a progress bar, return results in submission order."""
    from distributed import as_completed
    from tqdm import tqdm

    futures = [client.submit(function, *args, pure=False, resources=resources) for args in arguments]
    index = {future.key: i for i, future in enumerate(futures)}
    results: list = [None] * len(futures)
    interval = 0.1 if sys.stderr.isatty() else 30  # a log file gets a line every 30 s, not every chunk
    with tqdm(total=len(futures), desc=description, unit="chunk", mininterval=interval) as bar:
        for future in as_completed(futures, loop=client.loop):
            results[index[future.key]] = future.result()  # re-raises a task's error here
            bar.update()
    return results
