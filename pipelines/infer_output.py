"""The inference output store: an OME-Zarr (NGFF 0.5) image of foreground probability with an
NGFF ``labels/nuclei`` label image. Locally it is written under a hidden name and renamed when
complete; on object stores it is written in place (see ``unet.storage``). Either way its NGFF
metadata, and ``complete: true`` in its lineage, are written only at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import zarr

from unet import storage
from unet.errors import UserError
from unet.slide import Slide

if TYPE_CHECKING:
    from pipelines.infer_tasks import JobSpec

# the store's layout
PROBABILITY, LABELS = "0", "labels/nuclei/0"  # the image (foreground probability) and its NGFF label image
WORK = "_work"  # the job's own arrays, deleted when it completes
LOCAL, DONE_PREDICT, DONE_LABELS = f"{WORK}/local", f"{WORK}/done_predict", f"{WORK}/done_labels"

LINEAGE_KEY = "unet_inference"
# what must not change between an interrupted run and its --resume
RESUME_KEYS = ("model_uri", "input", "level")
# input, output and level are compared resolved (RESUME_KEYS) or are where the output is; a batch and a
# single-slide run of the same slide agree on the rest
IGNORED_CONFIG = ("infer.overwrite", "infer.resume", "infer.scheduler", "infer.workers", "infer.tasks_per_worker",
                  "infer.input", "infer.output", "infer.level")  # fmt: skip


def _axes(slide: Slide, channel: bool = True) -> list[dict]:
    unit = {"unit": "micrometer"} if slide.pixel_size_um else {}
    space = [{"name": n, "type": "space", **unit} for n in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channel else []) + space


def _datasets(slide: Slide) -> list[dict]:
    size = slide.pixel_size_um or 1.0
    return [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, size, size]}]}]


def output_staging(output: str) -> storage.Staging:
    """Where the job writes: ``.NAME.partial`` beside a local output (a fixed name, so ``--resume`` finds it)."""
    return storage.staging(output, unique=False)


def create_output(location: str, slide: Slide, spec: JobSpec, lineage: dict) -> None:
    """Create the (partial) output group with empty arrays and completion records."""
    root = zarr.open_group(location, mode="w-", zarr_format=3)
    shape, chunks = (1, slide.height, slide.width), (1, spec.chunk, spec.chunk)
    root.create_array(PROBABILITY, shape=shape, chunks=chunks, dtype=spec.probability_dtype, fill_value=0)
    root.create_array(LABELS, shape=shape, chunks=chunks, dtype="int32", fill_value=0)
    root.create_array(LOCAL, shape=shape[1:], chunks=chunks[1:], dtype="int32", fill_value=0)
    grid_shape = (-(-slide.height // spec.chunk), -(-slide.width // spec.chunk))
    for name in (DONE_PREDICT, DONE_LABELS):
        root.create_array(name, shape=grid_shape, chunks=(1, 1), dtype="uint8", fill_value=0)
    root.attrs[LINEAGE_KEY] = {**lineage, "complete": False}


def recorded_lineage(location: str) -> dict | None:
    """The lineage an output (complete or not) records, or None if ``location`` is not one of ours."""
    try:
        recorded = zarr.open_group(location, mode="r").attrs.get(LINEAGE_KEY)
    except (FileNotFoundError, ValueError, zarr.errors.BaseZarrError):
        return None
    return recorded if isinstance(recorded, dict) else None


def lineage_matches(recorded: dict, lineage: dict) -> bool:
    """Whether an interrupted output was started with the same model, input and config."""
    if any(recorded.get(key) != lineage[key] for key in RESUME_KEYS):
        return False
    before, now = recorded.get("config", {}), lineage["config"]
    keys = {k for k in before.keys() | now.keys() if k.startswith(("infer.", "model.")) and k not in IGNORED_CONFIG}
    return all(before.get(k) == now.get(k) for k in keys)


def finalize_output(staged: storage.Staging, slide: Slide, lineage: dict, overwrite: bool) -> str:
    """Write the NGFF metadata and lineage, drop the work arrays, move the output into place."""
    if not (staged.in_place or overwrite) and storage.exists(staged.final):  # appeared while the job ran
        raise UserError(f"{staged.final} was created while this job ran; its result stays in {staged.partial}")
    from ome_zarr.format import FormatV05  # about half a second to import: only here, at the end
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    fmt = FormatV05()
    root = zarr.open_group(staged.partial, mode="r+")
    write_multiscales_metadata(root, _datasets(slide), fmt=fmt, axes=_axes(slide), name="foreground probability")
    labels_root = root["labels"]
    write_multiscales_metadata(labels_root["nuclei"], _datasets(slide), fmt=fmt, axes=_axes(slide), name="nuclei")
    write_label_metadata(labels_root, "nuclei", fmt=fmt, source={"image": "../../"})
    del root[WORK]
    root.attrs[LINEAGE_KEY] = {**lineage, "complete": True}
    return storage.publish(staged)
