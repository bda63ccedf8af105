"""The training Zarr store: one group per example with its image, labels, target and weights.

Layout (Zarr v3)::

    train.zarr/                 attrs["unet_training_store"]: version, complete, weight_map, channels, ...
      <name>/image              (C, Y, X), the source dtype
      <name>/labels             (Y, X) int32 instance ids, as given
      <name>/target             (Y, X) uint8, touching objects split (see unet.weights)
      <name>/weights            (Y, X) float32, eq. 2 of the paper (0 outside the mask)
      <name>/mask               (Y, X) uint8, only in examples of annotated regions: 1 where annotation is complete
      <name> attrs              source files and sha256, split (train/val), intensity range, pixel sizes

The store's attrs record its pixel size (``pixel_size_um``: every example is stored at it, resampled where its
own differs) and the size distribution of its labelled objects (``object_area_um2``); a model trained on it
records both.

The store may be local or on an object store (``s3://bucket/train.zarr``; see ``unet.storage``).
Locally it is written under a hidden temporary name and renamed into place only when complete, and
an existing store is replaced only on request, after the new one is complete. On object stores it is
written in place; either way it is marked complete only at the end, so an interrupted run never
leaves a store that reads as valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unet import storage
from unet.errors import UserError

STORE_KEY = "unet_training_store"
STORE_VERSION = 1
ARRAYS = ("image", "labels", "target", "weights")
OPTIONAL_ARRAYS = ("mask",)  # examples from annotated regions: where annotation is complete
AREA_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


class StoreError(UserError):
    """A training store that is missing, incomplete or of another format."""


@dataclass(frozen=True)
class Example:
    """Lazy arrays and attributes of one example in a store."""

    name: str
    image: zarr.Array
    labels: zarr.Array
    target: zarr.Array
    weights: zarr.Array
    attrs: dict[str, Any]
    mask: zarr.Array | None = None  # examples of annotated regions: 1 where annotation is complete

    @property
    def split(self) -> str:
        return self.attrs["split"]


def object_areas(labels: np.ndarray) -> np.ndarray:
    """Pixels of each whole labelled object (id > 0) of a label image: objects touching the image's border are cut
    by it and left out, unless every object touches it (ids may be any size: no bincount)."""
    ids, counts = np.unique(labels, return_counts=True)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    whole = (ids != 0) & ~np.isin(ids, border)
    return counts[whole] if whole.any() else counts[ids != 0]


def object_area_distribution(areas_um2: np.ndarray) -> dict[str, float] | None:
    """``{"count": n, "p1": ..., "p99": ...}``: the number of objects and percentiles (``AREA_PERCENTILES``) of their
    areas in square micrometres; None when there are no objects."""
    if len(areas_um2) == 0:
        return None
    percentiles = np.percentile(np.asarray(areas_um2, np.float64), AREA_PERCENTILES)
    return {"count": len(areas_um2), **{f"p{p}": float(v) for p, v in zip(AREA_PERCENTILES, percentiles, strict=True)}}


class StoreWriter:
    """Writes a new store (staged as ``unet.storage`` describes); ``commit()`` marks it complete.

    Use as a context manager: leaving the block without ``commit()`` deletes the partial store.
    """

    def __init__(self, location: str | Path, overwrite: bool = False) -> None:
        self.staging = storage.staging(location)
        self.location = self.staging.final
        if storage.exists(self.location):
            if not overwrite:
                raise StoreError(f"{self.location} already exists; pass --overwrite to replace it")
            if self.staging.in_place:  # no rename on object stores: the old store must go first
                storage.remove(self.location)
        self.root = zarr.open_group(self.staging.partial, mode="w-", zarr_format=3)
        self.root.attrs[STORE_KEY] = {"version": STORE_VERSION, "complete": False}
        self.committed = False

    def create(self, name: str, kind: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...]) -> zarr.Array:
        """An empty array ``kind`` (one of ARRAYS) of example ``name``."""
        if kind not in ARRAYS + OPTIONAL_ARRAYS:
            raise ValueError(f"unknown array kind {kind!r}")
        group = self.root.require_group(name)
        return group.create_array(kind, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)

    def set_example_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        self.root[name].attrs.update(attrs)

    def commit(self, attrs: dict[str, Any]) -> str:
        """Mark the store complete with ``attrs`` and move it into place (replacing an old one)."""
        self.root.attrs[STORE_KEY] = {
            "version": STORE_VERSION,
            "complete": True,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **attrs,
        }
        storage.publish(self.staging)
        self.committed = True
        return self.location

    def abort(self) -> None:
        storage.remove(self.staging.partial)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


class TrainingStore:
    """Read access to a complete training store."""

    def __init__(self, location: str | Path) -> None:
        self.location = storage.resolve(location)
        if not storage.exists(self.location):
            raise StoreError(f"training store not found: {self.location} (create it with python -m pipelines.prepare)")
        try:
            self.root = zarr.open_group(self.location, mode="r")
        except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError) as exc:
            raise StoreError(f"{self.location} is not a Zarr group: {exc}") from None
        meta = self.root.attrs.get(STORE_KEY)
        if not isinstance(meta, dict):
            raise StoreError(f"{self.location} is not a training store (no {STORE_KEY!r} attribute)")
        if not meta.get("complete"):
            raise StoreError(f"{self.location} is incomplete (its preparation did not finish); prepare it again")
        if meta.get("version") != STORE_VERSION:
            raise StoreError(f"{self.location} has store version {meta.get('version')}, expected {STORE_VERSION}")
        self.attrs: dict[str, Any] = meta

    @property
    def names(self) -> list[str]:
        return list(self.attrs["examples"])

    @property
    def pixel_size_um(self) -> float | None:
        """Micrometres per stored pixel (None: prepared before stores recorded it)."""
        return self.attrs.get("pixel_size_um")

    def required_pixel_size_um(self) -> float:
        """``pixel_size_um``, refused in one line where the store records none: a model trained on it must."""
        if self.pixel_size_um is None:
            raise StoreError(f"{self.location} records no pixel size: prepare it again (data.pixel_size_um)")
        return self.pixel_size_um

    @property
    def object_area_um2(self) -> dict[str, float] | None:
        """The size distribution of the store's objects (``object_area_distribution``); None if unknown."""
        return self.attrs.get("object_area_um2")

    def names_in(self, split: str) -> list[str]:
        return [name for name in self.names if self.root[name].attrs["split"] == split]

    def example(self, name: str) -> Example:
        group = self.root[name]
        arrays = {kind: group[kind] for kind in ARRAYS}
        optional = {kind: group[kind] for kind in OPTIONAL_ARRAYS if kind in group}
        return Example(name=name, attrs=dict(group.attrs), **arrays, **optional)

    def __len__(self) -> int:
        return len(self.names)
