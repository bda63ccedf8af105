"""Where ``pipelines.infer`` runs its chunk tasks: an existing Dask cluster, or a local one it starts.

Local clusters listen on 127.0.0.1 only. On CPU, one worker runs inside the job's process by default
(nothing to start, the model loaded once); ``infer.workers: N`` starts N worker processes instead. On
CUDA there is one worker per GPU, each seeing only its own GPU through ``CUDA_VISIBLE_DEVICES`` and
offering the Dask resource ``GPU=1`` (as dask-cuda's ``LocalCUDACluster`` does); a single GPU is
driven from the job's own process. Every chunk task asks for ``1 / infer.tasks_per_worker`` of a GPU,
so each GPU worker keeps that many chunks in flight: one in the model, the others being read or
written. A remote GPU worker is started the same way:
``CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --nthreads 8 --resources GPU=1``.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from unet.config import InferConfig
from unet.errors import UserError

if TYPE_CHECKING:
    from distributed import Client, SpecCluster

log = logging.getLogger("infer")
LOOPBACK = "127.0.0.1"


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
    from distributed import Client, LocalCluster

    if not log.isEnabledFor(logging.DEBUG):  # distributed sets its own levels when imported; -v shows its chatter
        logging.getLogger("distributed").setLevel(logging.WARNING)
        # a failed task is reported in one line by the job, and the tasks cancelled with its slide are expected
        logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)
    if infer.scheduler:
        try:
            return Client(infer.scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as exc:
            raise UserError(f"Dask scheduler unreachable at {infer.scheduler}: {exc}") from None
    gpus = gpus or []
    workers = worker_count(infer, gpus)
    if infer.device == "cuda" and workers > 1:
        cluster = gpu_cluster(gpus[:workers], infer.tasks)
        return Client(cluster), cluster
    options: dict[str, Any] = {"processes": False} if in_process(infer, gpus) else {"processes": True, "host": LOOPBACK}
    if infer.device == "cuda":
        options["resources"] = {"GPU": 1}
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=infer.tasks,
        dashboard_address=f"{LOOPBACK}:0",
        worker_dashboard_address=f"{LOOPBACK}:0",
        **options,
    )
    return Client(cluster), cluster


def gpu_cluster(gpus: list[str], tasks_per_worker: int) -> SpecCluster:
    """One worker process per GPU in ``gpus``, each seeing only that GPU and offering ``GPU=1``."""
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}}
    workers = {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {
                "host": LOOPBACK,
                "nthreads": tasks_per_worker,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": gpu},
                "dashboard_address": f"{LOOPBACK}:0",
            },
        }
        for gpu in gpus
    }
    return SpecCluster(scheduler=scheduler, workers=workers)


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
        for future in as_completed(futures):
            results[index[future.key]] = future.result()  # re-raises a task's error here
            bar.update()
    return results
