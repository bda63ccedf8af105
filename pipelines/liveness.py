"""Whether the job that drives an MLflow run is still alive: its driver ("HOST PID") and a heartbeat, tags renewed
while it runs and read by the next job that finds the run RUNNING. A training run with a live driver elsewhere is
refused (``pipelines.train``); a batch run whose driver is gone (killed: SIGKILL, a lost node) is marked KILLED
by the next run of the batch (``pipelines.infer.batch``)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

HEARTBEAT_S, STALE_S = 30.0, 120.0
DRIVER_TAG, HEARTBEAT_TAG = "driver", "driver_heartbeat"  # "HOST PID" of the job; when it last said it is alive


def heartbeat(client, run_id: str) -> threading.Event:
    """Tag the run with this driver and renew its heartbeat every HEARTBEAT_S seconds, from a daemon thread, until
    the returned event is set, the run is no longer RUNNING or the process ends."""
    from pipelines import registry

    stop = threading.Event()
    driver = f"{socket.gethostname()} {os.getpid()}"

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is no reason to fail the job
                if client.get_run(run_id).info.status != "RUNNING":
                    return
                registry.set_tags(client, run_id, {DRIVER_TAG: driver, HEARTBEAT_TAG: f"{time.time():.0f}"})
            if stop.wait(HEARTBEAT_S):
                return

    # not from the main thread: Ctrl-C in the middle of an MLflow call could leave its database session unusable for
    # marking the run KILLED
    threading.Thread(target=beat, name="mlflow-heartbeat", daemon=True).start()
    return stop


def live_driver(tags: dict[str, str]) -> str | None:
    """The live job driving a RUNNING run with these tags ("pid P on HOST, heartbeat N s ago"), or None when there
    is none: no heartbeat, one older than STALE_S seconds, or a process of this machine that is gone."""
    host, _, pid = tags.get(DRIVER_TAG, "").partition(" ")
    try:
        age = time.time() - float(tags.get(HEARTBEAT_TAG, "0"))
    except ValueError:
        return None
    if not host or age > STALE_S:
        return None
    if host == socket.gethostname() and not _alive(int(pid) if pid.isdigit() else 0):
        return None
    return f"pid {pid} on {host}, heartbeat {age:.0f} s ago"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (not this one) runs on this machine."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
