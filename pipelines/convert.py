"""Convert a whole-slide image (TIFF, OME-TIFF, SVS, any OpenSlide format) into OME-Zarr, chunk by chunk.

    python -m pipelines.convert INPUT OUTPUT [--chunk 512] [--ngff 0.4|0.5] [--overwrite]

INPUT is whatever ``unet.slides.open_slide`` reads, chosen by content rather than by name: TIFF, OME-TIFF and
Aperio SVS through tifffile (any channel count and bit depth), and through OpenSlide, as 8-bit RGB, the other
vendor formats it reads: Hamamatsu .ndpi/.vms/.vmu, Leica .scn, MIRAX .mrxs (the index file beside its
folder), Philips .tiff, Sakura .svslide, Trestle .tif, Ventana .bif/.tif, Zeiss .czi and DICOM; also OME-Zarr
or plain Zarr. Areas outside an OpenSlide slide's scanned region come out white.

Level 0 is read lazily and written as CYX with chunks (C, chunk, chunk); each further level halves the
previous one (2x2 mean) until the longest side fits in one chunk. NGFF 0.4 is written as Zarr v2, NGFF 0.5
as Zarr v3. OUTPUT may be a local folder or an object-store URL (s3://bucket/slide.ome.zarr, see
unet.storage). A local output appears under its name only once it is complete; on object storage it is
written in place and its NGFF metadata, written last, is what makes it readable as an image.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.cli import make_parser, run

if TYPE_CHECKING:  # heavy modules are imported where they are used, so that --help answers at once
    import dask.array as da
    import zarr
    from ome_zarr.format import Format

    from unet.slides import Slide

log = logging.getLogger("convert")

NGFF_FORMATS: dict[str, int] = {"0.4": 2, "0.5": 3}  # OME-NGFF version -> Zarr format it is written as
MIN_CHUNK = 16
CHUNK, NGFF = 512, "0.5"  # the defaults of --chunk and --ngff, and of convert()'s arguments
RGB = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
OTHER_COLORS = ("FFFFFF", "00FFFF", "FF00FF", "FFFF00")


def convert(
    input: str | Path, output: str | Path, chunk: int = CHUNK, ngff: str = NGFF, overwrite: bool = False
) -> str:
    """Write ``input`` (TIFF/SVS, an OpenSlide format, or anything ``open_slide`` reads) as OME-Zarr at ``output``."""
    import zarr

    from unet import storage
    from unet.samples import resolve_location
    from unet.slides import SlideError, open_slide
    from unet.storage import overlap

    source, staged = storage.resolve(resolve_location(str(input))), storage.staging(output)
    if ngff not in NGFF_FORMATS:
        raise SlideError(f"unknown NGFF version {ngff!r}; choose one of {', '.join(NGFF_FORMATS)}")
    if chunk < MIN_CHUNK:
        raise SlideError(f"chunk size {chunk} is too small; use at least {MIN_CHUNK} (512 is typical)")
    if relation := overlap(staged.final, source):  # --overwrite would replace the slide being read
        raise SlideError(f"OUTPUT {staged.final} {relation} INPUT {source}; write the OME-Zarr somewhere else")
    if storage.exists(staged.final) and not overwrite:
        raise SlideError(f"{staged.final} already exists; pass --overwrite to replace it")
    fmt = ngff_format(ngff)
    with open_slide(source) as slide:
        log.info("converting %s (%d x %d x %d %s) to OME-NGFF %s", source, *slide.shape, slide.dtype, ngff)
        if staged.in_place:  # no rename on object stores: the old output goes first
            storage.remove(staged.final)
        try:
            root = zarr.open_group(staged.partial, mode="w-", zarr_format=fmt.zarr_format)
            shapes = write_pyramid(root, slide.to_dask(chunk), chunk, fmt)
            root.attrs["unet_source"] = {
                "path": source,
                "sha256": storage.sha256(source),
                "shape": list(slide.shape),
                "pixel_size_um": slide.pixel_size_um,
            }
            write_metadata(root, slide, shapes, fmt, name=storage.basename(source))  # last: makes it an image
            storage.publish(staged)
        except BaseException:
            storage.remove(staged.partial)
            raise
    return staged.final


def ngff_format(version: str) -> Format:
    """The ome_zarr format object of an NGFF version in ``NGFF_FORMATS``."""
    from ome_zarr.format import FormatV04, FormatV05

    return {"0.4": FormatV04, "0.5": FormatV05}[version]()


def write_pyramid(root: zarr.Group, image: da.Array, chunk: int, fmt: Format) -> list[tuple[int, ...]]:
    """Write ``image`` (CYX) as arrays "0", "1", ... each half the size of the last; return their shapes."""
    import dask.array as da

    from pipelines import zarr_store

    channels, dtype = image.shape[0], image.dtype
    extra: dict[str, Any] = {"dimension_names": ["c", "y", "x"]}
    if fmt.zarr_format == 2:  # NGFF 0.4 asks for "/"-separated chunk keys; v2 has no dimension names
        extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    shapes: list[tuple[int, ...]] = []
    level = image
    while True:
        name = str(len(shapes))
        target = root.create_array(
            name, shape=level.shape, dtype=dtype, chunks=(channels, chunk, chunk), fill_value=0, **extra
        )
        log.info("writing level %s: %s", name, " x ".join(map(str, level.shape)))
        zarr_store.store([level], [target])  # chunk-aligned, read back and checked
        shapes.append(tuple(level.shape))
        if max(level.shape[1:]) <= chunk or min(level.shape[1:]) < 2:
            return shapes
        # read the level just written back: each level costs one pass over the one above, not over level 0
        level = downsample(da.from_zarr(target, chunks=(channels, 2 * chunk, 2 * chunk)))


def downsample(image: da.Array) -> da.Array:
    """2x2 mean of a CYX array (an odd last row/column is dropped), in the input's dtype."""
    import dask.array as da

    mean = da.coarsen(np.mean, image, {1: 2, 2: 2}, trim_excess=True)
    if np.issubdtype(image.dtype, np.integer):
        mean = da.round(mean)  # plain casting truncates: every level would get darker by half a grey level
    return mean.astype(image.dtype)


def write_metadata(root: zarr.Group, slide: Slide, shapes: list[tuple[int, ...]], fmt: Format, name: str) -> None:
    """NGFF multiscales (axes, per-level scale and translation) and an omero rendering block."""
    from ome_zarr.writer import write_multiscales_metadata

    from unet.pyramid import ngff_datasets

    datasets = ngff_datasets(len(shapes), slide.pixel_size_um)
    units = {"y": "micrometer", "x": "micrometer"} if slide.pixel_size_um else None
    write_multiscales_metadata(
        root,
        datasets,
        fmt=fmt,
        axes=["c", "y", "x"],
        axes_units=units,
        name=name,
        metadata={"omero": omero_metadata(slide.channels, slide.dtype, name)},
    )


def omero_metadata(channels: int, dtype: np.dtype, name: str) -> dict[str, Any]:
    """Display hints for viewers: red/green/blue for 8-bit RGB, otherwise white then cyan/magenta/yellow."""
    rgb = channels == 3 and dtype == np.uint8
    window = None
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        window = {"min": int(info.min), "max": int(info.max), "start": int(info.min), "end": int(info.max)}
    entries = []
    for index in range(channels):
        label, color = RGB[index] if rgb else (f"channel {index}", OTHER_COLORS[index % len(OTHER_COLORS)])
        entry: dict[str, Any] = {"label": label, "color": color, "active": True}
        if window is not None:
            entry["window"] = window
        entries.append(entry)
    return {"name": name, "channels": entries, "rdefs": {"model": "color" if channels > 1 else "greyscale"}}


def describe(path: str) -> list[str]:
    """One line per level of a written OME-Zarr image."""
    from unet.slides import open_slide

    lines = []
    with open_slide(path) as first:
        levels = first.levels
    for level in range(levels):
        with open_slide(path, level) as slide:
            size = f", {slide.pixel_size_um:.4g} um/px" if slide.pixel_size_um else ""
            lines.append(f"  level {level}: {' x '.join(map(str, slide.shape))} (CYX) {slide.dtype}{size}")
    return lines


def main(args: argparse.Namespace) -> None:
    from unet.slides import SlideError

    if args.input is None or args.output is None:
        raise SlideError("give INPUT and OUTPUT, e.g. python -m pipelines.convert slide.svs slide.ome.zarr")
    path = convert(args.input, args.output, chunk=args.chunk, ngff=args.ngff, overwrite=args.overwrite)
    lines = describe(path)
    print(f"wrote {path} (OME-NGFF {args.ngff}, Zarr v{NGFF_FORMATS[args.ngff]}): {len(lines)} levels")
    print("\n".join(lines))


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.convert", __doc__.splitlines()[0], config=False)
    # optional for argparse so that a missing one is a one-line error; main() insists on both
    parser.add_argument(
        "input",
        nargs="?",
        help="slide file: TIFF, OME-TIFF, SVS or any OpenSlide format (.ndpi, .mrxs, .scn, .bif, .czi, ...), "
        "told apart by content; or Zarr, or samples:SET/FILE",
    )
    parser.add_argument("output", nargs="?", help="OME-Zarr to write: a folder (slide.ome.zarr) or s3://... URL")
    parser.add_argument("--chunk", type=int, default=CHUNK, help=f"pixels per chunk side (default {CHUNK})")
    parser.add_argument("--ngff", choices=sorted(NGFF_FORMATS), default=NGFF, help=f"OME-NGFF version (default {NGFF})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT once the new one is done")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
