"""The driver of a training job: checks (store, Ray address, resources, GPUs), the Ray Train run tracked in
MLflow (one job per run, resumed from its last checkpoint), and the best model registered and promoted
(``train``). The command line is ``pipelines.train``'s ``__main__``; what each worker does is
``pipelines.train.worker``."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipelines.cli import Terminated
from unet.config import Config, dump_config, flatten_config
from unet.errors import UserError, first_line

if TYPE_CHECKING:  # heavy modules are imported where they are used, so that --help answers at once
    from unet.data.store import TrainingStore

log = logging.getLogger("train")


def check_store(config: Config) -> TrainingStore:
    from unet.data.store import TrainingStore

    store = TrainingStore(config.data.store)
    if not store.names_in("train") or not store.names_in("val"):
        raise UserError(
            f"{store.location} needs training and validation examples (has {len(store.names_in('train'))} and "
            f"{len(store.names_in('val'))}); prepare it with data.val_fraction > 0"
        )
    if store.attrs["channels"] != config.model.n_channels:
        raise UserError(
            f"{store.location} has {store.attrs['channels']}-channel images "
            f"but model.n_channels is {config.model.n_channels}"
        )
    stored = store.required_pixel_size_um()  # what the run records: the size it trains at
    if config.data.pixel_size_um not in (None, stored):
        log.warning("data.pixel_size_um=%g, but %s holds %g um/px: the model is %g", config.data.pixel_size_um,
                    store.location, stored, stored)  # fmt: skip
    config.data.pixel_size_um = stored
    from unet.evaluation import small_validation_split

    if warning := small_validation_split(store):
        log.warning(warning)
    return store


def ray_address() -> str | None:
    """The Ray cluster this job joins: RAY_ADDRESS (as `ray job submit` sets it); None: a local Ray of its own."""
    return os.environ.get("RAY_ADDRESS") or None


def check_ray_address(address: str | None) -> None:
    """Fail fast on an address nothing listens on (ray.init would retry for a long time)."""
    if not address or address in {"auto", "local"}:
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise UserError(f"RAY_ADDRESS {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=5).close()
    except OSError as exc:
        raise UserError(f"Ray cluster unreachable at {address}: {exc.strerror or exc}") from None


def init_ray(dashboard: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`; ``auto``: the one `ray start` started on
    this machine) or start a local Ray of the job's own (with its dashboard if ``dashboard``: ``train.dashboard``;
    with ``quiet_ray.LOCAL_RAY``'s settings).
    Without RAY_ADDRESS the job never joins a cluster it was not told about: ``ray.init()`` alone would join one
    that `ray start` left running, with its resources and token."""
    import ray

    from pipelines.train.quiet_ray import LOCAL_RAY

    address = ray_address()
    ours = signal.getsignal(signal.SIGTERM)
    try:
        # No num_cpus here: under `ray job submit` the cluster decides resources.
        local = {"address": "local", "include_dashboard": dashboard, "_system_config": LOCAL_RAY}
        where = {"address": address} if address else local
        ray.init(**where, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"cannot connect to Ray at {address or 'a new local instance'}: {first_line(exc)}") from None
    except SystemExit as exc:  # Ray's own SIGTERM handler (sys.exit(15)) while it starts
        if exc.code != signal.SIGTERM:
            raise
        raise Terminated() from None
    finally:  # ours again: SIGTERM ends the job (its run KILLED) as Ctrl-C does
        signal.signal(signal.SIGTERM, ours)


def check_gpu_build(config: Config) -> None:
    """``train.use_gpu`` needs a CUDA build of PyTorch here too (the image the workers run): NCCL, one GPU each."""
    from unet.devices import cuda_build

    if config.train.use_gpu and cuda_build() is None:
        raise UserError(
            "train.use_gpu needs a CUDA build of PyTorch (NCCL, one GPU per worker); this one is CPU-only "
            "(README, 'Installing')"
        )


def check_resources(config: Config, local: bool) -> None:
    """Refuse at once what the cluster can never place (Ray Train would retry placement without end): a local
    Ray has all it will ever have; a remote cluster may be autoscaling, so wait ``train.resource_wait_s`` for it."""
    import ray

    train = config.train
    needed = {"CPU": train.num_workers * train.cpus_per_worker, **({"GPU": train.num_workers} if train.use_gpu else {})}

    def shortfall() -> str:
        have = ray.cluster_resources()
        short = [f"{count:g} {kind} (the cluster has {have.get(kind, 0):g})" for kind, count in needed.items()
                 if have.get(kind, 0) < count]  # fmt: skip
        return ", ".join(short)

    missing = shortfall()
    if not missing:
        return
    advice = "lower train.num_workers" + (" or train.cpus_per_worker" if "CPU" in missing else "")
    if local:
        raise UserError(f"train.num_workers={train.num_workers} workers need {missing}; {advice}")
    log.warning("the workers need %s; waiting up to %.0f s for the cluster to scale up", missing, train.resource_wait_s)
    deadline = time.monotonic() + train.resource_wait_s
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0)))
        if not (missing := shortfall()):
            return
    raise UserError(
        f"train.num_workers={train.num_workers} workers need {missing} after {train.resource_wait_s:.0f} s; "
        f"{advice}, or raise train.resource_wait_s"
    )


def build_trainer(config: Config, loop_config: dict):
    """The TorchTrainer described by ``config.train`` (gloo on CPU, NCCL on GPU); on a local Ray without what only a
    cluster needs (``pipelines.train.quiet_ray``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from pipelines.train.quiet_ray import trainer_class
    from pipelines.train.worker import train_loop_per_worker

    train = config.train
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    return trainer_class(local=ray_address() is None)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            name=train.run_name,
            storage_path=train.storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # one line per epoch, not per report
        ),
    )


def train(config: Config) -> dict:
    """Set up (checks, MLflow run), train and register; the run is marked FAILED if anything after its start fails."""
    from pipelines import registry
    from unet import storage

    config = config.model_copy(deep=True)
    config.data.store = storage.resolve(config.data.store)
    config.train.storage_path = storage.resolve(config.train.storage_path)
    store = check_store(config)
    check_gpu_build(config)
    check_ray_address(ray_address())
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    config.tracking.tracking_uri = tracking_uri
    client = registry.connect(tracking_uri)
    from pipelines.train.parent import check_parent

    check_parent(config, store, tracking_uri)  # before Ray starts: a wrong parent is one line at once
    with one_job_per_run(config):
        return _train(config, store, client)


def _train(config: Config, store: TrainingStore, client) -> dict:
    """``train`` once the run is this job's alone."""
    from pipelines import registry
    from pipelines.liveness import heartbeat
    from pipelines.models import resolution_tags
    from pipelines.train.parent import lineage_tags
    from pipelines.train.release import release
    from unet import storage

    tracking_uri = config.tracking.tracking_uri
    init_ray(config.train.dashboard)
    check_resources(config, local=ray_address() is None)

    store_sha = storage.sha256(store.location)
    tags = {
        "data.store": store.location,
        registry.STORE_SHA_TAG: store_sha,
        registry.GIT_COMMIT_TAG: registry.git_commit(),
        **resolution_tags(store.pixel_size_um, store.object_area_um2),
        **lineage_tags(config, store),
    }
    not_running_elsewhere(config, client)
    from pipelines.checkpoints import recorded_by_ray

    checkpointed = recorded_by_ray(f"{config.train.storage_path}/{config.train.run_name}") > 0
    start = functools.partial(registry.start_or_resume_run, client, config, tracking_uri, flatten_config(config), tags,
                              checkpointed)  # fmt: skip
    with tracked_run(client, config, start) as (run_id, resumed):
        stop_heartbeat = heartbeat(client, run_id)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                resolved = Path(tmp) / "config.yaml"
                resolved.write_text(dump_config(config))
                client.log_artifact(run_id, str(resolved))
            log.info(
                "%s MLflow run %s (experiment %r, %s); Ray run %r in %s",
                "resuming" if resumed else "started",
                run_id,
                config.tracking.experiment,
                tracking_uri,
                config.train.run_name,
                config.train.storage_path,
            )
            loop_config = {"config": config.model_dump(mode="json"), "mlflow_run_id": run_id,
                           "tracking_uri": tracking_uri}  # fmt: skip
            result = fit(build_trainer(config, loop_config))
            if result.checkpoint is None:
                raise UserError("training finished without a checkpoint")
            return release(config, client, run_id, result, tags, store, resumed)
        finally:
            stop_heartbeat.set()


@contextlib.contextmanager
def one_job_per_run(config: Config) -> Iterator[None]:
    """Refuse, in one line, a second job with this ``train.run_name`` and ``train.storage_path`` while one runs: both
    would write checkpoints into one folder, log into one MLflow run and register a model each.

    On this machine (and on a shared filesystem) a file lock decides at once and for certain
    (``pipelines.locks``: ``.RUN_NAME.lock`` beside the run folder); it dies with its job, so a killed job is
    resumed at once. A job on another machine is recognised later, just before the MLflow run is started or
    resumed, by that run (``not_running_elsewhere``)."""
    from pipelines import locks

    train = config.train
    folder = f"{train.storage_path}/{train.run_name}"

    def busy(holder: str) -> str:
        return (f"training run {train.run_name!r} is already running ({holder}; checkpoints in {folder}); "
                "wait for it, or stop it and run this again to resume")  # fmt: skip

    with locks.locked(folder, busy):
        yield


def not_running_elsewhere(config: Config, client) -> None:
    """Refuse when the run's MLflow run says a live job drives it (``pipelines.liveness``): RUNNING, with a recent
    heartbeat, from another machine or from a live process on this one (a killed job's heartbeat stops). Unlike the
    file lock this is not atomic: two jobs on two machines that both pass it within a second or so both go on."""
    from pipelines import registry
    from pipelines.liveness import STALE_S, live_driver

    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return
    name, storage_path = config.train.run_name, config.train.storage_path
    for found in registry.ray_run_runs(client, experiment.experiment_id, name, storage_path, max_results=1):
        if found.info.status == "RUNNING" and (driver := live_driver(found.data.tags)):
            raise UserError(
                f"training run {name!r} is already running ({driver}, MLflow run {found.info.run_id}); wait for "
                f"it, or stop it and run this again {STALE_S:.0f} s later"
            )


@contextlib.contextmanager
def tracked_run(client, config: Config, start: Callable[[], tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Start (or resume) the MLflow run with ``start()`` and end it truthfully: KILLED when the block is interrupted
    (Ctrl-C, SIGTERM: the note says the checkpoints are kept), FAILED when it fails (one line). A signal that comes
    while the run starts is held until the block can answer it: no moment leaves the run RUNNING."""
    _stop_signals(signal.SIG_BLOCK)
    try:
        run_id, resumed = start()
    except BaseException:
        _stop_signals(signal.SIG_UNBLOCK)
        raise
    try:
        _stop_signals(signal.SIG_UNBLOCK)  # a signal held meanwhile is raised here
        yield run_id, resumed
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        with contextlib.suppress(Exception):  # the tracking server may be what failed
            client.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
        if interrupted:
            folder = f"{config.train.storage_path}/{config.train.run_name}"
            exc.add_note(f"MLflow run {run_id} marked KILLED; run the same command again to resume from the last "
                         f"checkpoint in {folder}")  # fmt: skip
            raise
        if isinstance(exc, UserError):
            raise
        log.debug("training failed", exc_info=True)  # the whole traceback with -v
        raise UserError(f"training failed: {_reason(exc)}") from exc


def _stop_signals(how: int) -> None:
    """Block or unblock Ctrl-C and SIGTERM for this thread: only the main thread receives them."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(how, {signal.SIGINT, signal.SIGTERM})


def fit(trainer):
    """``trainer.fit()``, run in a thread so that Ctrl-C stays with this job's main thread (Ray Train's own SIGINT
    handler, installed only from the main thread, asks its controller to abort: lost while the controller starts,
    reported as a failure after). Interrupted, the job's process ends and Ray stops its workers with it."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    _wait_answering_signals(thread)  # KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM) here
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _wait_answering_signals(thread: threading.Thread) -> None:
    """Wait for ``thread`` in a way a signal interrupts at once, whichever thread the kernel hands it to. A plain
    ``join()`` is woken only by a signal delivered to the main thread; with threads that leave signals unblocked
    (polars', imported by MLflow when installed) it may go to one of them, and the job would not answer until the
    wait ended (Ctrl-C: training went on; SIGTERM: Ray's processes, stopped with the job, took it down first). Every
    signal's handler writes to the wakeup descriptor, whichever thread runs it, and that wakes this ``select``."""
    import select
    import socket

    wake, wakeup = socket.socketpair()
    for end in (wake, wakeup):
        end.setblocking(False)
    previous = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    try:
        while thread.is_alive():
            if select.select([wake], [], [], 0.25)[0]:  # the signal's Python handler runs right after this call
                wake.recv(4096)
    finally:
        signal.set_wakeup_fd(previous)
        wake.close()
        wakeup.close()


def _reason(exc: BaseException) -> str:
    """One line for a failure: Ray's worker errors open with a heading ("...: ") and end with the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    reason = f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if (user := f"{UserError.__module__}.{UserError.__name__}: ") in reason:  # a worker's one-line error: as it is
        return reason.rsplit(user, 1)[1][:400]
    return reason[:400]
