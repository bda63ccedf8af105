"""Export the objects of an inference output as outlines in GeoJSON: for GIS tools, or as QuPath detections.

    python -m pipelines.export OUT.ome.zarr [--format geojson|qupath] [--min-area N] [--output FILE] [--overwrite]

One Feature per object of OUT's objects table (tables/nuclei): a Polygon along the pixel edges of its mask in
``labels/nuclei/0``, in the slide's level-0 pixel coordinates (x, y): where QuPath, opening the slide, puts
them, whatever resolution the slide was segmented at (``unet.resolution``; ``--min-area`` counts pixels of the
label image). ``geojson`` gives the label id as the
feature's id and the table's columns as its properties; ``qupath`` gives what QuPath (0.4 and later) imports
as detections of class Nucleus with measurements, ids deterministic UUIDs. The default output is beside OUT:
NAME.geojson or NAME.qupath.geojson. OUT may be a local folder or an object-store URL (see unet.storage).

The label image is read chunk by chunk, never whole: an object belongs to the chunk holding the top-left
corner of its bounding box, and each chunk's window reaches as far as its objects do, so an object that
crosses chunk seams is outlined whole, once. Features are written as they are made, sorted by chunk then id,
so the same output always gives the same bytes; the file appears under its name only once it is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from pipelines.cli import make_parser, run
from unet.errors import UserError

if TYPE_CHECKING:  # heavy modules are imported where they are used, so that --help answers at once
    import zarr

log = logging.getLogger("export")

FORMATS = {"geojson": ".geojson", "qupath": ".qupath.geojson"}  # format -> suffix of the default output
BBOX = ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")
REQUIRED = ("id", "area", *BBOX)
HEAD, SEPARATOR, TAIL = '{"type":"FeatureCollection","features":[\n', ",\n", "\n]}\n"  # one feature a line
COMPACT = (",", ":")
READ_AHEAD = 4  # label windows read ahead of the one being outlined


class ExportError(UserError):
    """An output that cannot be exported as asked (the message says why)."""


def export(
    output: str | Path,
    fmt: str = "geojson",
    min_area: int = 0,
    destination: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[str, int]:
    """Write the outlines of ``output``'s objects of at least ``min_area`` pixels; return (file, features)."""
    from pipelines.infer.output import LABELS, level0_scale
    from unet import storage

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if min_area < 0:
        raise ExportError(f"--min-area must be 0 or more pixels, not {min_area}")
    source = storage.resolve(output)
    labels = open_labels(source)
    target = storage.resolve(destination) if destination else default_destination(source, fmt)
    if storage.exists(target) and not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it")
    columns = read_objects(source, fmt)
    height, width = labels.shape[-2:]
    if len(columns["id"]) and (columns["bbox_y1"].max() > height or columns["bbox_x1"].max() > width):
        raise ExportError(f"{source}: its objects table does not fit {LABELS} ({height} x {width}); re-run inference")
    keep = columns["area"] >= min_area
    log.info("%s: %d objects", source, len(keep))
    if min_area:
        log.info("%d of them have at least %d pixels", keep.sum(), min_area)
    columns = {name: values[keep] for name, values in columns.items()}
    to_level0 = level0_scale(source)
    with staged_text(target, overwrite) as handle:
        written, missing = write_features(handle, labels, columns, fmt, storage.basename(source), to_level0)
    if missing:
        log.warning("%d objects of the objects table are not in %s; they were left out", missing, LABELS)
    return target, written


def open_labels(source: str) -> zarr.Array:
    """Level 0 of the output's label image; a one-line error if ``source`` is not an inference output."""
    import zarr

    from pipelines.infer.output import LABELS, OBJECTS, objects_location
    from unet import storage

    if not storage.exists(source):
        raise ExportError(f"{source} not found")
    try:
        labels = zarr.open_group(source, mode="r")[LABELS]
    except (KeyError, OSError, ValueError, TypeError, zarr.errors.BaseZarrError):
        labels = None
    if not isinstance(labels, zarr.Array) or labels.ndim < 2:
        raise ExportError(
            f"{source} is not an inference output (it has no {LABELS} label image); "
            "give the OUT.ome.zarr that python -m pipelines.infer wrote"
        )
    if objects_location(source) is None:
        raise ExportError(
            f"{source} has no objects table ({OBJECTS}, written by newer versions of pipelines.infer); "
            "re-run inference with this version to write it"
        )
    return labels


def default_destination(source: str, fmt: str) -> str:
    """NAME.geojson (or NAME.qupath.geojson) beside NAME.ome.zarr."""
    from unet.io import stem

    parent, _, name = source.rstrip("/").rpartition("/")
    return f"{parent}/{stem(name)}{FORMATS[fmt]}"


def read_objects(source: str, fmt: str) -> dict[str, np.ndarray]:
    """The columns of the output's objects table that ``fmt`` writes, read once; floats are NaN where null.

    All rows are held (a few numbers per object, ~100 bytes): what must never be held whole is the label image.
    """
    import pyarrow.parquet as pq

    from pipelines.infer.output import objects_location
    from unet import storage
    from unet.outlines import INTENSITY_PREFIX, QUPATH_MEASUREMENTS

    location = objects_location(source)
    fs, path = storage.filesystem(location)
    try:
        names = pq.read_schema(path, filesystem=fs).names
        if missing := [name for name in REQUIRED if name not in names]:
            raise ExportError(f"{location} lacks the columns {', '.join(missing)}; re-run inference")
        if fmt == "qupath":  # only what becomes a measurement, plus what placing the objects needs
            names = [n for n in names if n in REQUIRED or n in QUPATH_MEASUREMENTS or n.startswith(INTENSITY_PREFIX)]
        table = pq.read_table(path, filesystem=fs, columns=names)
    except (OSError, ValueError) as exc:  # pyarrow's errors (ArrowInvalid, ...) are ValueError or OSError
        raise ExportError(f"cannot read {location}: {exc}") from None
    return {name: table.column(name).to_numpy() for name in table.column_names}


def chunk_windows(
    columns: dict[str, np.ndarray], chunk: tuple[int, int]
) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Each chunk's label window (y0, y1, x0, x1) with the rows of the objects it owns, in row-major chunk
    order and by id within a chunk. An object is owned by the chunk holding its bounding box's top-left
    corner; the window runs from that chunk's origin to the furthest bottom-right corner of its objects."""
    y0, x0, y1, x1 = (columns[name] for name in BBOX)
    cy, cx = y0 // chunk[0], x0 // chunk[1]
    order = np.lexsort((columns["id"], cx, cy))
    key = cy[order] * (int(cx.max(initial=0)) + 1) + cx[order]
    bounds = np.flatnonzero(np.diff(key)) + 1
    for rows in np.split(order, bounds) if len(order) else []:
        first = rows[0]
        top, left = int(cy[first]) * chunk[0], int(cx[first]) * chunk[1]
        yield (top, int(y1[rows].max()), left, int(x1[rows].max())), rows


def read_window(labels: zarr.Array, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """One window of the label image, as YX ids (``pipelines.infer.output.yx_window``)."""
    from pipelines.infer.output import yx_window

    return yx_window(labels, y0, y1, x0, x1)


def write_features(
    handle: TextIO, labels: zarr.Array, columns: dict[str, np.ndarray], fmt: str, source: str, to_level0: float = 1.0
) -> tuple[int, int]:
    """Write the FeatureCollection, chunk by chunk, outlines scaled by ``to_level0`` into the slide's level-0
    frame; return (features written, objects not found)."""
    import shapely
    from tqdm import tqdm

    from unet.outlines import geojson_feature, outline, qupath_feature

    chunks = labels.chunks[-2:]
    written = missing = 0
    interval = 0.1 if sys.stderr.isatty() else 30  # a log file gets a line every 30 s, not every chunk
    handle.write(HEAD)
    with tqdm(total=len(columns["id"]), desc="export", unit="object", mininterval=interval) as bar:
        for ((wy0, _, wx0, _), rows), window in prefetched(labels, chunk_windows(columns, chunks)):
            for row in table_rows(columns, rows):
                y0, x0, y1, x1 = (row[name] for name in BBOX)
                mask = window[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] == row["id"]
                geometry = outline(mask, y0, x0)
                bar.update()
                if geometry is None:
                    missing += 1
                    continue
                if to_level0 != 1:  # pixel edge e of the label image is level-0 edge e * to_level0
                    geometry = shapely.transform(geometry, lambda points: points * to_level0)
                feature = qupath_feature(geometry, row, source) if fmt == "qupath" else geojson_feature(geometry, row)
                # compact, one feature a line; NaN is not JSON (the table's nulls are None by now)
                handle.write((SEPARATOR if written else "") + json.dumps(feature, separators=COMPACT, allow_nan=False))
                written += 1
    handle.write(TAIL)
    return written, missing


def prefetched(
    labels: zarr.Array, plans: Iterator[tuple[tuple[int, int, int, int], np.ndarray]], ahead: int = READ_AHEAD
) -> Iterator[tuple[tuple[tuple[int, int, int, int], np.ndarray], np.ndarray]]:
    """Each plan of ``chunk_windows`` with its label window, read up to ``ahead`` windows in advance: reads
    (object-store round trips, decompression) overlap with outlining, and at most ``ahead + 1`` are held."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(ahead, thread_name_prefix="export-read") as pool:
        pending: deque = deque()
        try:
            for plan in plans:
                pending.append((plan, pool.submit(read_window, labels, *plan[0])))
                if len(pending) > ahead:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:  # stopped early (an error, ^C): drop the reads not yet started
            for _, future in pending:
                future.cancel()


def table_rows(columns: dict[str, np.ndarray], rows: np.ndarray) -> Iterator[dict[str, Any]]:
    """The table's ``rows`` as dicts of Python numbers, in column order; NaN (null) becomes None."""
    values = {}
    for name, column in columns.items():
        picked = column[rows]
        listed = picked.tolist()
        if picked.dtype.kind == "f" and np.isnan(picked).any():
            listed = [None if value != value else value for value in listed]  # NaN is the one value != itself
        values[name] = listed
    for index in range(len(rows)):
        yield {name: listed[index] for name, listed in values.items()}


@contextlib.contextmanager
def staged_text(target: str, overwrite: bool) -> Iterator[TextIO]:
    """A text file to write ``target`` through: locally a hidden sibling renamed into place when complete,
    for an object store a local temporary file uploaded when complete. Nothing is left on failure."""
    import tempfile

    from unet import storage

    if storage.is_url(target):
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / storage.basename(target)
            with open(local, "w", encoding="utf-8") as handle:
                yield handle
            fs, path = storage.filesystem(target)
            fs.put_file(str(local), path)  # an object appears only once its upload is complete
        return
    staged = storage.staging(target)
    try:
        Path(staged.final).parent.mkdir(parents=True, exist_ok=True)
        handle = open(staged.partial, "w", encoding="utf-8")  # noqa: SIM115 (closed below, before publishing)
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with handle:
            yield handle
        if not overwrite and storage.exists(staged.final):
            raise ExportError(f"{staged.final} was created while exporting; pass --overwrite to replace it")
        storage.publish(staged)
    except BaseException:
        storage.remove(staged.partial)
        raise


def main(args: argparse.Namespace) -> None:
    if args.output_zarr is None:
        raise ExportError("give the inference output, e.g. python -m pipelines.export slide.ome.zarr --format qupath")
    target, count = export(args.output_zarr, args.format, args.min_area, args.output, args.overwrite)
    print(f"wrote {count} objects to {target}")


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.export", __doc__.splitlines()[0], config=False)
    # optional for argparse so that a missing one is a one-line error; main() insists on it
    parser.add_argument("output_zarr", nargs="?", metavar="OUT", help="inference output (OUT.ome.zarr or s3://...)")
    parser.add_argument(
        "--format",
        default="geojson",
        metavar="FORMAT",  # checked by export(): a one-line error rather than argparse's usage message
        help="geojson (properties = the objects table) or qupath (QuPath detections); default geojson",
    )
    parser.add_argument("--min-area", type=int, default=0, metavar="N", help="leave out objects under N pixels")
    parser.add_argument("--output", help="file to write (default: NAME.geojson or NAME.qupath.geojson beside OUT)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
