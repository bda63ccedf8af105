"""Lazy access to (whole-slide) images: OME-Zarr (NGFF 0.4/0.5), plain Zarr arrays, TIFF files and every
slide format OpenSlide reads.

A local file is read by its content, not its name: TIFF, OME-TIFF and Aperio SVS through tifffile (which also
reads multi-channel and 16-bit images), the other vendor formats OpenSlide detects (Hamamatsu, Leica, MIRAX,
Philips, Sakura, Trestle, Ventana, Zeiss, DICOM) through OpenSlide as 8-bit RGB. Zarr may be local or on an
object store (``s3://bucket/slide.ome.zarr``, see ``unet.storage``); slide files must be local
(``pipelines.convert`` turns them into OME-Zarr, which it can write to object storage).

``open_slide(path, level)`` reads only metadata; ``Slide.read(y0, y1, x0, x1)`` reads one window as CYX and
``Slide.to_dask(chunk)`` gives the whole level as a lazy CYX Dask array. One module per kind of source:
``unet.slides.ngff`` (Zarr), ``unet.slides.tiff`` (tifffile), ``unet.slides.openslide`` (OpenSlide); ``base`` is
what they share.

A slide comes from outside, so what its metadata claims is checked before any pixel is read (``MAX_SIDE``,
``MAX_PIXELS``, ``MAX_CHANNELS``, ``MAX_CHUNK_BYTES``), and a chunk that cannot be read (truncated, corrupt) is a
one-line ``SlideError`` naming the slide and the chunk.
"""

from __future__ import annotations

import operator
from pathlib import Path

import zarr

from unet import storage
from unet.errors import one_line
from unet.slides.base import (
    MAX_CHANNELS,
    MAX_CHUNK_BYTES,
    MAX_PIXELS,
    MAX_SIDE,
    READABLE,
    Slide,
    SlideError,
    check_chunk_size,
    check_level,
    make_slide,
)
from unet.slides.ngff import ZARR_ERRORS, guess_axes, open_ngff
from unet.slides.tiff import TIFF_ERRORS, open_tiff

__all__ = [
    "MAX_CHANNELS",
    "MAX_CHUNK_BYTES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "READABLE",
    "Slide",
    "SlideError",
    "check_chunk_size",
    "open_slide",
]
# OpenSlide vendors left to tifffile: it reads these as well and also handles OME-TIFF, many channels and 16 bits
TIFFFILE_VENDORS = frozenset({"aperio", "generic-tiff"})


def open_slide(path: str | Path, level: int = 0) -> Slide:
    """Open resolution ``level`` of a slide: an OME-Zarr image, a plain Zarr array, a TIFF or an OpenSlide file."""
    path = storage.resolve(path)
    level = operator.index(level)
    if not storage.exists(path):
        raise SlideError(f"slide not found: {path}")
    if storage.is_file(path):
        if storage.is_url(path):
            raise SlideError(
                f"{path}: TIFF/SVS slides must be local files, as must other OpenSlide formats; convert it to "
                "OME-Zarr with `python -m pipelines.convert SLIDE s3://...` and read that"
            )
        return _open_file(Path(path), level)
    try:
        node = zarr.open(path, mode="r")
    except ZARR_ERRORS as exc:
        reason = one_line(exc)  # e.g. Zarr metadata with a negative shape says so
        detail = f" ({reason})" if str(exc).strip() and not isinstance(exc, FileNotFoundError) else ""
        raise SlideError(
            f"{path} is neither a Zarr array or group nor a TIFF file{detail}; readable: {READABLE}"
        ) from None
    if isinstance(node, zarr.Array):
        check_level(path, level, 1)
        return make_slide(path, level, 1, guess_axes(path, node), node, None)
    return open_ngff(path, node, level)


def _open_file(path: Path, level: int) -> Slide:
    """A local slide file, by content: OpenSlide's other vendors through OpenSlide, TIFF through tifffile."""
    from unet.slides.openslide import open_openslide, openslide_vendor

    vendor = openslide_vendor(path)
    if vendor is None or vendor in TIFFFILE_VENDORS:
        try:
            return open_tiff(path, level)
        except TIFF_ERRORS as exc:
            if vendor is None:
                reason = one_line(exc)  # whatever tifffile says
                detail = "" if reason.startswith("not a TIFF") else f" ({reason})"  # a broken TIFF says why
                raise SlideError(
                    f"{path} is neither a readable TIFF nor a slide OpenSlide reads{detail}; readable: {READABLE}"
                ) from None
            # an Aperio or tiled TIFF that tifffile cannot read: OpenSlide may
    return open_openslide(path, level)
