"""One job at a time per output or training run: advisory locks that die with the process holding them.

A lock is an exclusive ``flock`` on a small file beside what it guards (``.NAME.lock``). The kernel (or, on a
shared filesystem, the NFS server) releases it when its process ends, however it ends, so a killed job never
leaves a stale lock: the next job takes it at once and resumes. The file records who holds it (host, pid, start)
for the message of a job refused, and is removed on release. Object stores have no such lock: for an ``s3://``
location the file lies in this machine's temporary folder, which keeps out jobs on this machine only.

Within one process a location is locked once: a second job started in the same process (tests, a notebook)
shares the lock, since jobs in one process run one after the other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from unet import storage
from unet.errors import UserError

log = logging.getLogger(__name__)


class Busy(UserError):
    """The location is locked by another job that is still running."""


@dataclass
class Lock:
    """A lock held by this process (``fd`` is None once released)."""

    path: Path
    fd: int | None


_HELD: dict[Path, Lock] = {}


def lock_file(location: str) -> Path:
    """The lock file of an output or a run folder: ``.NAME.lock`` beside a local one; for an object-store URL a
    file named by its hash in this user's temporary folder on this machine."""
    if storage.is_url(location):
        digest = hashlib.sha256(storage.resolve(location).encode()).hexdigest()[:32]
        return Path(tempfile.gettempdir()) / f"unet-wsi-locks-{os.getuid()}" / f"{digest}.lock"
    path = Path(storage.resolve(location))
    return path.parent / f".{path.name}.lock"


def acquire(location: str, busy: Callable[[str], str], wait: bool = False) -> Lock | None:
    """Lock ``location`` (see ``lock_file``) for this process; if another job holds it, raise ``Busy`` with the
    message ``busy(holder)`` (``holder``: "pid N on HOST since YYYY-MM-DD HH:MM:SS") or, with ``wait``, wait for it.
    Returns None, with a warning, where the filesystem offers no locks."""
    path = lock_file(location)
    held = _HELD.get(path)
    if held is not None and held.fd is not None:
        return held
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open(path)
        except OSError as exc:
            raise UserError(f"cannot lock {location}: {exc.strerror or exc} ({path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Busy(busy(holder)) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks (some FUSE and network mounts)
            os.close(fd)
            log.warning("cannot lock %s (%s): make sure no other job uses %s", path, exc.strerror, location)
            return None
        if _same_file(fd, path):  # not a file its last holder removed between our open and our lock
            break
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": started}).encode()
    with contextlib.suppress(OSError):  # read-only: the refused job's message names no holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner, 0)
    _HELD[path] = lock = Lock(path, fd)
    return lock


def release(lock: Lock | None) -> None:
    """Give the lock up and remove its file (removed while still locked, so no other job can lose it)."""
    if lock is None or lock.fd is None:
        return
    fd, lock.fd = lock.fd, None
    _HELD.pop(lock.path, None)
    try:
        if _same_file(fd, lock.path):
            lock.path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(location: str, busy: Callable[[str], str], wait: bool = False) -> Iterator[Lock | None]:
    """``acquire`` for the block only."""
    lock = acquire(location, busy, wait)
    try:
        yield lock
    finally:
        release(lock)


def _open(path: Path) -> int:
    """The lock file, created if missing, not inherited by the processes this one starts."""
    try:
        return _open_file(path, os.O_RDWR | os.O_CREAT)
    except PermissionError:  # another user's file, left by a killed job of theirs: it locks read-only as well
        return _open_file(path, os.O_RDONLY)


def _open_file(path: Path, flags: int) -> int:
    """``os.open``; a job holding a lock per slide of a large cohort may need more file descriptors than the
    soft limit allows: it is raised to the hard one."""
    flags |= os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if exc.errno != errno.EMFILE or soft == hard:
            raise
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return os.open(path, flags, 0o644)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int, patience: float = 2.0) -> str:
    """Who holds the lock, as its file says. A holder writes that just after it locks, so a job refused in between
    reads again for up to ``patience`` seconds; a holder that cannot write (a read-only file) stays unknown."""
    deadline = time.monotonic() + patience
    while True:
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "holder unknown"
            time.sleep(0.05)
