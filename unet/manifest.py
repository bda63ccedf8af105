"""Manifests: a ``.csv`` with a header or a ``.yaml`` list (or a mapping with one list), one row per item, read
into a pydantic model per row (unknown columns are errors, so a typo is not ignored); relative paths are relative
to the manifest's folder. Used by inference (slides to segment) and training-data preparation (annotated
slides)."""

from __future__ import annotations

import csv
import io
from pathlib import PurePosixPath
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from unet import storage
from unet.errors import UserError, first_line

SUFFIXES = (".csv", ".yaml", ".yml")
Row = TypeVar("Row", bound=BaseModel)


def is_manifest(location: str) -> bool:
    return location.lower().endswith(SUFFIXES) and storage.exists(location) and storage.is_file(location)


def read_manifest(manifest: str, model: type[Row], noun: str, key: str) -> list[Row]:
    """The rows of ``manifest`` as ``model``s; one line naming the manifest and the row (a ``noun``) for anything
    wrong. A YAML mapping holds its list under ``key``s plural (e.g. ``slides:``)."""
    import fsspec

    with fsspec.open(storage.resolve(manifest), "r") as handle:
        text = handle.read()
    try:
        if manifest.lower().endswith(".csv"):
            rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(io.StringIO(text))]
        else:
            rows = yaml.safe_load(text)
            rows = rows.get(f"{noun}s") if isinstance(rows, dict) else rows
    except (csv.Error, yaml.YAMLError) as exc:
        raise UserError(f"manifest {manifest} cannot be read: {first_line(exc)}") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"manifest {manifest} lists no {noun}s (expected rows with an {key!r} column)")
    parsed = []
    for number, row in enumerate(rows, start=1):
        try:
            parsed.append(model.model_validate(row))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(map(str, error["loc"])) or "row"
            raise UserError(f"manifest {manifest}, {noun} {number}: {field}: {error['msg']}") from None
    return parsed


def relative_to(manifest: str, location: str) -> str:
    """``location`` as a manifest row names it, resolved: relative paths are relative to the manifest's folder."""
    if storage.is_url(location) or location.startswith("/"):
        return storage.resolve(location)
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    folder = storage.resolve(base)
    return storage.resolve(f"{folder}/{location}" if storage.is_url(folder) else str(PurePosixPath(folder) / location))
