"""Locations of data: a local path or an object-store URL (``s3://bucket/key``, ``gs://...``; any fsspec protocol).

Object stores are configured the way their own tools are, so one set of environment variables serves Zarr
(s3fs), Ray checkpoints (pyarrow) and MLflow artifacts (boto3) alike. For S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE`` or an instance role, and ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph, ...).

Writers never leave something that looks complete before it is. Locally they write under a hidden
sibling name and rename it into place at the end (``Staging``). Object stores have no rename (a "move"
copies every object), so there the output is written in place and its own attributes say whether it is
complete; replacing an existing output (``--overwrite``) deletes it before the new one is written.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.core import url_to_fs

from unet.errors import UserError, first_line


class StorageError(UserError):
    """A location that cannot be reached (no credentials, no such bucket, unknown protocol)."""


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names an object store (``s3://...``) rather than a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def resolve(location: str | Path) -> str:
    """URLs unchanged (less a trailing slash); local paths absolute, since jobs and workers run elsewhere."""
    if is_url(location):
        return str(location).rstrip("/")
    return str(Path(str(location).removeprefix("file://")).expanduser().resolve())


def basename(location: str | Path) -> str:
    """The last component: ``slide.ome.zarr`` of ``s3://bucket/slides/slide.ome.zarr/``."""
    return PurePosixPath(str(location).rstrip("/")).name if is_url(location) else Path(location).name


def filesystem(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``location`` and the path within it."""
    try:
        fs, path = url_to_fs(resolve(location))
    except (ImportError, ValueError) as exc:  # e.g. gs:// without gcsfs installed
        raise StorageError(f"cannot open {location}: {first_line(exc)}") from None
    fs.invalidate_cache()  # other processes (workers, earlier jobs) write here too: list afresh
    return fs, path


def exists(location: str | Path) -> bool:
    """Whether anything (a file, a folder, a Zarr group) is at ``location``; unreachable stores raise."""
    if not is_url(location):
        path = Path(resolve(location))
        return path.exists() or path.is_symlink()
    fs, path = filesystem(location)
    try:
        return fs.exists(path)
    except Exception as exc:  # botocore and aiohttp raise many kinds; the user needs one line
        raise StorageError(f"cannot reach {location}: {first_line(exc)}") from None


def is_file(location: str | Path) -> bool:
    """Whether ``location`` is a single file (a TIFF, say) rather than a folder or a Zarr hierarchy."""
    if not is_url(location):
        return Path(resolve(location)).is_file()
    fs, path = filesystem(location)
    return fs.isfile(path)


def remove(location: str | Path) -> None:
    """Delete ``location`` and everything below it; nothing there is fine."""
    if not is_url(location):
        path = Path(resolve(location))
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # removed meanwhile: what was asked
            pass
        except OSError as exc:  # a delete that failed must not pass for done
            raise StorageError(f"cannot delete {location}: {exc.strerror or exc}") from None
        return
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sha256(location: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file, or of every file under a folder (a Zarr store) with its relative name, in sorted order."""
    fs, root = filesystem(location)
    digest = hashlib.sha256()
    folder = fs.isdir(root)
    files = sorted(fs.find(root)) if folder else [root]
    for file in files:
        if folder:
            digest.update(file[len(root.rstrip("/")) + 1 :].encode())
        with fs.open(file, "rb") as handle:
            while chunk := handle.read(block):
                digest.update(chunk)
    return digest.hexdigest()


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write a small file (a PNG preview, say), creating local parent folders; returns the resolved location. A
    reader never sees it half written (a page being watched): a local file is written aside and renamed into place,
    an object store's put is whole already."""
    location = resolve(location)
    if is_url(location):
        with fsspec.open(location, "wb") as handle:
            handle.write(data)
        return location
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    aside.write_bytes(data)
    os.replace(aside, path)
    return location


# What a write killed before its rename leaves beside the file it was replacing: Zarr's local store writes
# NAME.<32 hex>.partial, ``write_bytes`` .NAME.<8 hex>.tmp.
UNFINISHED_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$|^\..+\.[0-9a-f]{8}\.tmp$")


def remove_unfinished_writes(location: str | Path) -> int:
    """Delete the temporary files of writes killed before their rename under a local folder (an output resumed
    after a SIGKILL; object stores leave none); returns how many."""
    if is_url(str(location)):
        return 0
    leftovers = [p for p in Path(location).rglob("*") if p.is_file() and UNFINISHED_WRITE.search(p.name)]
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def read_bytes(location: str | Path) -> bytes:
    """Read a small file (a picture, a page) from a path or URL."""
    with fsspec.open(resolve(location), "rb") as handle:
        return handle.read()


@dataclass(frozen=True)
class Staging:
    """Where an output is written (``partial``) before it appears at ``final``; the same on object stores."""

    final: str
    partial: str

    @property
    def in_place(self) -> bool:
        return self.partial == self.final


def staging(final: str | Path, unique: bool = True) -> Staging:
    """A hidden sibling of a local ``final`` (``.NAME.partial``, plus a random tag if ``unique``); on
    object stores, ``final`` itself. A non-unique name lets an interrupted job find its partial output."""
    final = resolve(final)
    if is_url(final):
        return Staging(final, final)
    path = Path(final)
    tag = f"-{uuid.uuid4().hex[:8]}" if unique else ""
    return Staging(final, str(path.parent / f".{path.name}.partial{tag}"))


def publish(staged: Staging) -> str:
    """Move a finished local output into place, deleting what was there only afterwards; a no-op in place."""
    if staged.in_place:
        return staged.final
    final = Path(staged.final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staged.partial, final)
    if old is not None:
        remove(old)
    return staged.final


# Comparing locations: whether writing one would touch another (an output that is, holds or lies inside an input)


def normal(location: str) -> str:
    """``location`` resolved for comparison: a local path absolute with symlinks followed (``storage.resolve``), a
    URL with ``.``, ``..`` and repeated or trailing slashes folded."""
    location = resolve(location)
    if not is_url(location):
        return location
    scheme, _, path = location.partition("://")
    return f"{scheme}://{posixpath.normpath('/' + path).lstrip('/')}"


def parents(location: str) -> list[str]:
    """The folders (prefixes) holding a ``normal`` location, nearest first (for a URL, down to its bucket)."""
    if is_url(location):
        scheme, _, path = location.partition("://")
        return [f"{scheme}://{parent}" for parent in PurePosixPath(path).parents if str(parent) != "."]
    return [str(parent) for parent in PurePosixPath(location).parents]


def overlap(output: str, input: str) -> str | None:
    """How writing ``output`` would touch ``input`` ("is the same location as", "lies inside", "holds"), or None."""
    output, input = normal(output), normal(input)
    if output == input:
        return "is the same location as"
    if input in parents(output):
        return "lies inside"
    if output in parents(input):
        return "holds"
    return None
