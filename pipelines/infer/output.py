"""One inference output's whole life: its layout, its lock, what a job does with it (new, resumed, skipped),
its creation, its objects table, its lineage and its finalisation.

The output is an OME-Zarr (NGFF 0.5) image of foreground probability with an NGFF ``labels/nuclei`` label image,
both multiscale (``unet.pyramid``), and ``tables/nuclei``, one row per object (``unet.objects``) as an ngio feature
table. Locally it is
written under a hidden name and renamed when complete; on object stores it is written in place (see
``unet.storage``). Either way its NGFF metadata, and ``complete: true`` in its lineage, are written only at the
end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr

from unet import storage
from unet.errors import UserError
from unet.pyramid import ngff_datasets
from unet.slides import Slide
from unet.tiling import grid_shape

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.infer.spec import JobSpec
    from pipelines.locks import Lock
    from unet.resample import Resampled
    from unet.resolution import Resolution

log = logging.getLogger("infer")

# the store's layout
NAME = "nuclei"  # of the label image and of its objects table
PROBABILITY, LABELS = "0", f"labels/{NAME}/0"  # level 0 of the image (foreground probability) and of its labels
# the objects table, inside the output so it moves and is replaced with it: an ngio feature table of the label image
# (Parquet backend), which ngio and the Fractal tools read; outputs of layout 1 kept it as objects.parquet
OBJECTS_TABLE, LAYOUT1_OBJECTS = f"tables/{NAME}", "objects.parquet"
OBJECTS = f"{OBJECTS_TABLE}/table.parquet"
OBJECTS_TABLE_ATTRS = {"backend": "parquet", "type": "feature_table", "table_version": "1", "index_key": "id",
                       "index_type": "int", "instance_key": "id", "region": {"path": f"../labels/{NAME}"},
                       "categorical_columns": [], "measurement_columns": [], "metadata_columns": []}  # fmt: skip
QC_PICTURE = "qc.png"  # the slide with its objects outlined, beside the probability (pipelines.infer.qc)
WORK = "_work"  # the job's own arrays, deleted when it completes
LOCAL, DONE_PREDICT, DONE_LABELS = f"{WORK}/local", f"{WORK}/done_predict", f"{WORK}/done_labels"
# the probability is a one-channel image (what an image viewer shows as such); the label image is YX, as NGFF and
# napari expect of labels, and every array names its axes (Zarr v3 dimension_names, which NGFF 0.5 requires)
IMAGE_AXES, LABEL_AXES = ("c", "y", "x"), ("y", "x")
# Zstandard at level 1, not Zarr's default 3: as small on probability and labels (uint8 2.5x, int32 ~50x on dense
# H&E) and about twice as fast to write (docs/benchmarks.md, "The pipeline around the model"); every reader of
# Zarr v3 decodes it whatever the level
CODEC = {"name": "zstd", "configuration": {"level": 1, "checksum": False}}
OUTPUT_LAYOUT = 2  # 2: YX labels, named axes (1, until Dec. 2026: CYX labels); a partial output resumes only its own


def probability_level(level: int) -> str:
    return str(level)


def labels_level(level: int) -> str:
    return f"labels/{NAME}/{level}"


def done_level(level: int) -> str:
    """The completion records of pyramid level ``level`` (1, 2, ...): one element per chunk."""
    return f"{WORK}/done_level_{level}"


NEW, RESUMED, SKIPPED = "new", "resumed", "skipped"  # what a job does with an output (open_output)
LINEAGE_KEY = "unet_inference"
# what must not change between an interrupted run and its --resume
RESUME_KEYS = ("model_uri", "input", "level", "resolution")
# input, output and level are compared resolved (RESUME_KEYS) or are where the output is; a batch and a
# single-slide run of the same slide agree on the rest
IGNORED_CONFIG = ("infer.overwrite", "infer.resume", "infer.scheduler", "infer.workers", "infer.tasks_per_worker",
                  "infer.input", "infer.output", "infer.level", "infer.pixel_size_um",
                  "infer.tls_ca_file", "infer.tls_cert", "infer.tls_key", "infer.require_encryption",
                  "infer.outlier_z", "infer.report", "infer.postprocess_processes", "infer.read_cache_mb")  # fmt: skip


def _omero(dtype: np.dtype) -> dict:
    """How a viewer shows the probability: one grey channel named after it, from 0 to certain (255 or 1)."""
    end = 255 if np.dtype(dtype) == np.uint8 else 1
    window = {"min": 0, "max": end, "start": 0, "end": end}
    channel = {"label": "foreground probability", "color": "FFFFFF", "active": True, "coefficient": 1,
               "family": "linear", "inverted": False, "window": window}  # fmt: skip
    return {"channels": [channel], "rdefs": {"model": "greyscale"}}


def _axes(resolution: Resolution, channel: bool = True) -> list[dict]:
    unit = {"unit": "micrometer"} if resolution.pixel_size_um else {}
    space = [{"name": n, "type": "space", **unit} for n in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channel else []) + space


def output_staging(output: str) -> storage.Staging:
    """Where the job writes: ``.NAME.partial`` beside a local output (a fixed name, so ``--resume`` finds it)."""
    return storage.staging(output, unique=False)


def lock_output(staged: storage.Staging) -> Lock | None:
    """Lock the output for this job (``pipelines.locks``) before its partial store is read or written: a second job
    writing it at once, even with --resume or --overwrite, is refused in one line naming the first. A killed job's
    lock dies with it, so its output can be resumed at once. On object stores only jobs on this machine are kept
    out."""
    from pipelines.locks import acquire

    def busy(holder: str) -> str:
        return f"{staged.final} is being written by another job ({holder}); wait for it, or stop it and use --resume"

    return acquire(staged.final, busy)


@dataclass(frozen=True)
class Policy:
    """What a job may do with an existing output. A single slide keeps the strict rules (``overwrite`` replaces it,
    ``resume`` continues an interrupted one); a ``batch`` skips a complete one made the same way and resumes an
    interrupted one by itself."""

    overwrite: bool
    resume: bool
    batch: bool


def open_output(
    staged: storage.Staging, slide: Slide | Resampled, spec: JobSpec, lineage: dict, policy: Policy
) -> tuple[str, Lock | None, dict]:
    """Lock the output (``lock_output``) and decide what to do with it by ``policy``: NEW (created here), RESUMED
    or SKIPPED, with the lineage a skipped output recorded. The lock is kept while there is work to do."""
    from pipelines.locks import release

    lock = lock_output(staged)
    try:
        state, recorded = _decide(staged, lineage, policy)
        if state == NEW:
            create_output(staged.partial, slide, spec, lineage)
    except BaseException:
        release(lock)
        raise
    if state == SKIPPED:
        release(lock)
        lock = None
    return state, lock, recorded


def _decide(staged: storage.Staging, lineage: dict, policy: Policy) -> tuple[str, dict]:
    """Make way for a new output (removing the old one with ``overwrite``), continue an interrupted one, or find a
    complete one; refuse in one line what ``policy`` does not allow."""
    overwrite, resume, batch = policy.overwrite, policy.resume or policy.batch, policy.batch
    final_exists = storage.exists(staged.final)
    final_lineage = recorded_lineage(staged.final) if final_exists else None
    if staged.in_place:  # object store: an interrupted output sits at the final location, marked incomplete
        partial = final_lineage is not None and not final_lineage.get("complete")
        partial_lineage = final_lineage if partial else None
    else:
        partial = storage.exists(staged.partial)
        partial_lineage = recorded_lineage(staged.partial) if partial else None
    complete = final_exists and not (staged.in_place and partial)
    if overwrite:
        storage.remove(staged.partial)
        if staged.in_place:  # no rename to replace it atomically: the old output goes first
            storage.remove(staged.final)
    elif complete and batch:
        if final_lineage and final_lineage.get("complete") and lineage_matches(final_lineage, lineage):
            return SKIPPED, final_lineage
        raise UserError(f"{staged.final} exists, not made with this model, input and config; --overwrite replaces it")
    elif complete and not resume:
        raise UserError(f"{staged.final} already exists; pass --overwrite to replace it or --resume to continue")
    elif partial and resume:
        if partial_lineage is not None and partial_lineage.get("layout", 1) != lineage["layout"]:
            raise UserError(f"{staged.partial} was started by an earlier version, with another output layout; use "
                            "--overwrite")  # fmt: skip
        if partial_lineage is None or not lineage_matches(partial_lineage, lineage):
            raise UserError(f"{staged.partial} was started with another model, input or config; use --overwrite")
        log.info("resuming into %s", staged.partial)
        return RESUMED, {}
    elif partial:
        raise UserError(f"an interrupted run left {staged.partial}; pass --resume to continue or --overwrite")
    elif complete:
        raise UserError(f"{staged.final} is already complete; nothing to resume")
    return NEW, {}


def create_output(location: str, slide: Slide | Resampled, spec: JobSpec, lineage: dict) -> None:
    """Create the (partial) output group with empty arrays and completion records."""
    root = zarr.open_group(location, mode="w-", zarr_format=3)
    chunks = (spec.chunk, spec.chunk)
    for level, (height, width) in enumerate(spec.levels):
        root.create_array(probability_level(level), shape=(1, height, width), chunks=(1, *chunks), compressors=CODEC,
                          dtype=spec.rule.probability_dtype, fill_value=0, dimension_names=IMAGE_AXES)  # fmt: skip
        root.create_array(labels_level(level), shape=(height, width), chunks=chunks, dtype="int32", fill_value=0,
                          compressors=CODEC, dimension_names=LABEL_AXES)  # fmt: skip
        records = (DONE_PREDICT, DONE_LABELS) if level == 0 else (done_level(level),)
        for name in records:
            cells = grid_shape(height, width, spec.chunk)
            root.create_array(name, shape=cells, chunks=(1, 1), dtype="uint8", fill_value=0)
    root.create_array(
        LOCAL, shape=(slide.height, slide.width), chunks=chunks, dtype="int32", fill_value=0, compressors=CODEC
    )
    root.attrs[LINEAGE_KEY] = {**lineage, "complete": False}


def yx_window(array: zarr.Array, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The window [y0:y1, x0:x1] of an output level as a YX array: the probability's channel axis dropped, and that
    of the label image of an output of layout 1."""
    selection = (0,) * (array.ndim - 2) + (slice(y0, y1), slice(x0, x1))
    return np.asarray(array[selection])


def recorded_lineage(location: str) -> dict | None:
    """The lineage an output (complete or not) records, or None if ``location`` is not one of ours."""
    try:
        recorded = zarr.open_group(location, mode="r").attrs.get(LINEAGE_KEY)
    except (FileNotFoundError, ValueError, zarr.errors.BaseZarrError):
        return None
    return recorded if isinstance(recorded, dict) else None


def recorded_resolution(lineage: dict | None) -> Resolution | None:
    """The resolution an output was segmented at, from its lineage (None for outputs made before it was recorded,
    which were all segmented as stored)."""
    from unet.resolution import Resolution

    recorded = (lineage or {}).get("resolution")
    return Resolution.from_dict(recorded) if recorded else None


def level0_scale(source: str) -> float:
    """Level-0 pixels per label-image pixel, from the output's lineage (1 for an output segmented as stored)."""
    resolution = recorded_resolution(recorded_lineage(source))
    return resolution.to_level0 if resolution else 1.0


def lineage_matches(recorded: dict, lineage: dict) -> bool:
    """Whether an interrupted output was started with the same model, input and config."""
    if any(_recorded_as(lineage.get(key), recorded.get(key)) != recorded.get(key) for key in RESUME_KEYS):
        return False
    before, now = recorded.get("config", {}), lineage["config"]
    keys = {k for k in before.keys() | now.keys() if k.startswith(("infer.", "model.")) and k not in IGNORED_CONFIG}
    return all(before.get(k) == now.get(k) for k in keys)


def _recorded_as(value, recorded):
    """``value`` as an output of an earlier version recorded it: a dict without the keys added since."""
    if isinstance(value, dict) and isinstance(recorded, dict):
        return {k: v for k, v in value.items() if k in recorded}
    return value


def write_objects(location: str, table: pd.DataFrame) -> None:
    """The objects table (``OBJECTS_TABLE``) inside the (partial) output ``location``."""
    import io

    root = zarr.open_group(location, mode="r+")
    root.require_group("tables").attrs["tables"] = [NAME]
    root.require_group(OBJECTS_TABLE).attrs.update(OBJECTS_TABLE_ATTRS)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(f"{location.rstrip('/')}/{OBJECTS}", buffer.getvalue())


def objects_location(output: str) -> str | None:
    """Where an output keeps its objects table (``OBJECTS``, or ``objects.parquet`` in outputs of layout 1); None
    where it has none."""
    for name in (OBJECTS, LAYOUT1_OBJECTS):
        if storage.exists(f"{output.rstrip('/')}/{name}"):
            return f"{output.rstrip('/')}/{name}"
    return None


def ngff_frame(resolution: Resolution) -> tuple[float | None, float]:
    """The output's level-0 pixel size and the position of its first pixel's centre, in the slide's physical
    coordinates (micrometres; level-0 pixels where the pixel size is unknown): it overlays the slide's level 0,
    whose first pixel centre is at 0 (``unet.resolution``)."""
    if resolution.pixel_size_um is None:
        return resolution.to_level0, (resolution.to_level0 - 1) / 2
    return resolution.pixel_size_um, (resolution.pixel_size_um - resolution.slide_pixel_size_um) / 2


def finalize_output(
    staged: storage.Staging, resolution: Resolution, levels: int, lineage: dict, overwrite: bool
) -> str:
    """Write the NGFF metadata (``levels`` levels) and lineage, drop the work arrays, move the output into place."""
    if not (staged.in_place or overwrite) and storage.exists(staged.final):  # appeared while the job ran
        raise UserError(f"{staged.final} was created while this job ran; its result stays in {staged.partial}")
    from ome_zarr.format import FormatV05  # about half a second to import: only here, at the end
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    fmt = FormatV05()
    root = zarr.open_group(staged.partial, mode="r+")
    frame = ngff_frame(resolution)
    write_multiscales_metadata(root, ngff_datasets(levels, *frame), fmt=fmt, axes=_axes(resolution),
                               name="foreground probability")  # fmt: skip
    root.attrs["ome"] = {**root.attrs["ome"], "omero": _omero(root[PROBABILITY].dtype)}
    labels_root = root["labels"]
    write_multiscales_metadata(labels_root[NAME], ngff_datasets(levels, *frame, channel=False), fmt=fmt,
                               axes=_axes(resolution, channel=False), name=NAME)  # fmt: skip
    write_label_metadata(labels_root, NAME, fmt=fmt, source={"image": "../../"})
    labels_root.attrs["ome"] = {"version": fmt.version, "labels": [NAME]}  # ome-zarr 0.18 leaves out the version
    del root[WORK]
    storage.remove_unfinished_writes(staged.partial)  # a resumed output may hold some from the killed run
    root.attrs[LINEAGE_KEY] = {**lineage, "complete": True}
    return storage.publish(staged)
