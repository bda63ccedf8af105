"""The inference output store: an OME-Zarr (NGFF 0.5) image of foreground probability with an
NGFF ``labels/nuclei`` label image, written under a hidden name and renamed when complete."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

from pipelines.infer_tasks import DONE_LABELS, DONE_PREDICT, LABELS, LOCAL, PROBABILITY, JobSpec
from unet.slide import Slide

LINEAGE_KEY = "unet_inference"
# what must not change between an interrupted run and its --resume
RESUME_KEYS = ("model_uri", "input", "level")
IGNORED_CONFIG = ("infer.overwrite", "infer.resume", "infer.scheduler", "infer.workers")


@dataclass(frozen=True)
class OutputPaths:
    final: Path
    partial: Path

    @classmethod
    def for_output(cls, output: str) -> OutputPaths:
        final = Path(output).expanduser().resolve()
        return cls(final, final.parent / f".{final.name}.partial")


def _axes(slide: Slide, channel: bool = True) -> list[dict]:
    unit = {"unit": "micrometer"} if slide.pixel_size_um else {}
    space = [{"name": n, "type": "space", **unit} for n in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channel else []) + space


def _datasets(slide: Slide) -> list[dict]:
    size = slide.pixel_size_um or 1.0
    return [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, size, size]}]}]


def create_output(path: Path, slide: Slide, spec: JobSpec, lineage: dict) -> None:
    """Create the (partial) output group with empty arrays and completion records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    shape, chunks = (1, slide.height, slide.width), (1, spec.chunk, spec.chunk)
    root.create_array(PROBABILITY, shape=shape, chunks=chunks, dtype=spec.probability_dtype, fill_value=0)
    root.create_array(LABELS, shape=shape, chunks=chunks, dtype="int32", fill_value=0)
    root.create_array(LOCAL, shape=shape[1:], chunks=chunks[1:], dtype="int32", fill_value=0)
    grid_shape = (-(-slide.height // spec.chunk), -(-slide.width // spec.chunk))
    for name in (DONE_PREDICT, DONE_LABELS):
        root.create_array(name, shape=grid_shape, chunks=(1, 1), dtype="uint8", fill_value=0)
    root.attrs[LINEAGE_KEY] = {**lineage, "complete": False}


def lineage_matches(path: Path, lineage: dict) -> bool:
    """Whether an interrupted output was started with the same model, input and config."""
    recorded = zarr.open_group(path, mode="r").attrs.get(LINEAGE_KEY, {})
    if any(recorded.get(key) != lineage[key] for key in RESUME_KEYS):
        return False
    before, now = recorded.get("config", {}), lineage["config"]
    keys = {k for k in before.keys() | now.keys() if k.startswith(("infer.", "model.")) and k not in IGNORED_CONFIG}
    return all(before.get(k) == now.get(k) for k in keys)


def finalize_output(paths: OutputPaths, slide: Slide, lineage: dict, overwrite: bool) -> Path:
    """Write the NGFF metadata and lineage, drop the work arrays, move the output into place."""
    fmt = FormatV05()
    root = zarr.open_group(paths.partial, mode="r+")
    write_multiscales_metadata(root, _datasets(slide), fmt=fmt, axes=_axes(slide), name="foreground probability")
    labels_root = root["labels"]
    write_multiscales_metadata(labels_root["nuclei"], _datasets(slide), fmt=fmt, axes=_axes(slide), name="nuclei")
    write_label_metadata(labels_root, "nuclei", fmt=fmt, source={"image": "../../"})
    root.attrs[LINEAGE_KEY] = {**lineage, "complete": True}
    shutil.rmtree(paths.partial / "_work", ignore_errors=True)
    old = None
    if paths.final.exists():
        if not overwrite:
            raise FileExistsError(paths.final)
        old = paths.final.parent / f".{paths.final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(paths.final, old)
    os.replace(paths.partial, paths.final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return paths.final
