"""Lazy access to (whole-slide) images: OME-Zarr (NGFF 0.4/0.5), plain Zarr arrays, TIFF files and every
slide format OpenSlide reads.

A local file is read by its content, not its name: TIFF, OME-TIFF and Aperio SVS through tifffile (which also
reads multi-channel and 16-bit images), the other vendor formats OpenSlide detects (Hamamatsu, Leica, MIRAX,
Philips, Sakura, Trestle, Ventana, Zeiss, DICOM) through OpenSlide as 8-bit RGB. Zarr may be local or on an
object store (``s3://bucket/slide.ome.zarr``, see ``unet.storage``); slide files must be local
(``pipelines.convert`` turns them into OME-Zarr, which it can write to object storage).

``open_slide(path, level)`` reads only metadata; ``Slide.read(y0, y1, x0, x1)`` reads one window as CYX and
``Slide.to_dask(chunk)`` gives the whole level as a lazy CYX Dask array.

A slide comes from outside, so what its metadata claims is checked before any pixel is read (``MAX_SIDE``,
``MAX_PIXELS``, ``MAX_CHANNELS``, ``MAX_CHUNK_BYTES``), and a chunk that cannot be read (truncated, corrupt) is a
one-line ``SlideError`` naming the slide and the chunk.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
import zarr

from unet import storage
from unet.errors import UserError
from unet.io import GuardedReads
from unet.io import pixel_size_um as tiff_pixel_size_um

if TYPE_CHECKING:
    import dask.array as da

SPATIAL = "yx"
KNOWN_AXES = "tczyx"
# NGFF spatial units we can express in micrometres (the spec allows more; these cover microscopy)
UNIT_TO_UM = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
_ZARR_ERRORS = (OSError, ValueError, TypeError, KeyError, zarr.errors.BaseZarrError)
_TIFF_ERRORS = (OSError, ValueError, IndexError, tifffile.TiffFileError, zarr.errors.BaseZarrError)
# What a slide's metadata may claim (per level). The largest scanners write about 2e10 pixels a slide (200,000 x
# 100,000); beyond these limits a header is corrupt or hostile, and believing it would allocate absurd memory.
MAX_SIDE = 2**24  # pixels a side (16.7 million): Dask's and the tiling's bookkeeping grows with it
MAX_PIXELS = 2**36  # pixels a level (68.7 billion, e.g. 262,144 x 262,144)
MAX_CHANNELS = 256
MAX_CHUNK_BYTES = 2**30  # one stored chunk (a TIFF strip or tile) decoded: reading any pixel of it costs this much
# OpenSlide vendors left to tifffile: it reads these as well and also handles OME-TIFF, many channels and 16 bits
TIFFFILE_VENDORS = frozenset({"aperio", "generic-tiff"})
READABLE = (
    "OME-Zarr, Zarr, TIFF/OME-TIFF, and OpenSlide formats (Aperio .svs/.tif, DICOM .dcm, Hamamatsu "
    ".ndpi/.vms/.vmu, Leica .scn, MIRAX .mrxs, Philips .tiff, Sakura .svslide, Trestle .tif, Ventana .bif/.tif, "
    "Zeiss .czi, generic tiled TIFF)"
)


class SlideError(UserError):
    """A slide that cannot be opened or read as asked (the message names the path)."""


@dataclass(frozen=True)
class Slide:
    """One resolution level of a slide; pixels are read only when indexed.

    ``array`` is the stored array in its own axis order (``axes``); ``read`` and ``to_dask`` return CYX.
    """

    path: str  # a local path or URL
    level: int
    levels: int
    axes: str
    channels: int
    height: int
    width: int
    dtype: np.dtype
    pixel_size_um: float | None
    array: Any = field(repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of this level."""
        return self.channels, self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The window ``[y0:y1, x0:x1]`` as a (C, y1 - y0, x1 - x0) array; it must lie inside the level."""
        y0, y1, x0, x1 = (operator.index(v) for v in (y0, y1, x0, x1))
        if not (0 <= y0 <= y1 <= self.height and 0 <= x0 <= x1 <= self.width):
            raise SlideError(
                f"{self.path}: window y {y0}:{y1}, x {x0}:{x1} is outside level {self.level} "
                f"({self.height} x {self.width} pixels)"
            )
        return self._to_cyx(np.asarray(self._reads[self._selection(slice(y0, y1), slice(x0, x1))]))

    def to_dask(self, chunk: int = 512) -> da.Array:
        """The whole level as a lazy CYX Dask array with chunks (C, chunk, chunk)."""
        sizes = {"y": chunk, "x": chunk, "c": -1}
        chunks = tuple(sizes.get(axis, 1) for axis in self.axes)
        import dask.array as da

        meta = np.empty((0,) * self.array.ndim, self.dtype)
        if isinstance(self.array, zarr.Array):  # read errors become one line naming the slide and the chunk
            whole = da.from_array(self._reads, chunks=chunks, lock=False, meta=meta)
        else:  # an OpenSlide level; OpenSlide handles are thread-safe, so no lock; name=False: nothing to hash
            whole = da.from_array(self.array, chunks=chunks, lock=False, name=False, meta=meta)
        return self._to_cyx(whole[self._selection(slice(None), slice(None))])

    @property
    def _reads(self) -> Any:
        """The array to read from: a Zarr array's read errors become a ``SlideError`` (OpenSlide's already are)."""
        if isinstance(self.array, zarr.Array):
            return GuardedReads(self.array, f"{self.path} (level {self.level})", SlideError)
        return self.array

    def close(self) -> None:
        """Release the file handle a TIFF- or OpenSlide-backed slide keeps open (harmless for Zarr)."""
        close = getattr(self.array, "close", None) or getattr(getattr(self.array, "store", None), "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _selection(self, ys: slice, xs: slice) -> tuple[slice | int, ...]:
        # extra axes (t, z, ...) are singleton, checked at open: index them away
        return tuple({"y": ys, "x": xs, "c": slice(None)}.get(axis, 0) for axis in self.axes)

    def _to_cyx(self, block: Any) -> Any:
        kept = [axis for axis in self.axes if axis in "cyx"]
        if "c" not in kept:
            return block[None]
        return block.transpose([kept.index(axis) for axis in "cyx"])


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
    except _ZARR_ERRORS as exc:
        reason = " ".join(str(exc).split())  # e.g. Zarr metadata with a negative shape says so
        detail = f" ({reason})" if reason and not isinstance(exc, FileNotFoundError) else ""
        raise SlideError(
            f"{path} is neither a Zarr array or group nor a TIFF file{detail}; readable: {READABLE}"
        ) from None
    if isinstance(node, zarr.Array):
        _check_level(path, level, 1)
        return _make_slide(path, level, 1, _guess_axes(path, node), node, None)
    return _open_ngff(path, node, level)


def _open_file(path: Path, level: int) -> Slide:
    """A local slide file, by content: OpenSlide's other vendors through OpenSlide, TIFF through tifffile."""
    from unet.openslide_reader import open_openslide, openslide_vendor

    vendor = openslide_vendor(path)
    if vendor is None or vendor in TIFFFILE_VENDORS:
        try:
            return _open_tiff(path, level)
        except _TIFF_ERRORS as exc:
            if vendor is None:
                reason = " ".join(str(exc).split())  # one line, whatever tifffile says
                detail = "" if reason.startswith("not a TIFF") else f" ({reason})"  # a broken TIFF says why
                raise SlideError(
                    f"{path} is neither a readable TIFF nor a slide OpenSlide reads{detail}; readable: {READABLE}"
                ) from None
            # an Aperio or tiled TIFF that tifffile cannot read: OpenSlide may
    return open_openslide(path, level)


def _open_tiff(path: Path, level: int) -> Slide:
    """Open with tifffile; its own errors (``_TIFF_ERRORS``) are left to the caller."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = len(series.levels)
        _check_level(str(path), level, levels)
        axes = _tiff_axes(series.levels[level].axes)
        width0 = series.levels[0].shape[series.levels[0].axes.index("X")]
    array = zarr.open_array(tifffile.imread(path, aszarr=True, level=level), mode="r")
    pixel_size = tiff_pixel_size_um(path)
    if pixel_size is not None and "x" in axes:
        pixel_size *= width0 / array.shape[axes.index("x")]  # lower levels have proportionally larger pixels
    try:
        return _make_slide(str(path), level, levels, axes, array, pixel_size)
    except SlideError:
        array.store.close()
        raise


def _tiff_axes(axes: str) -> str:
    """tifffile axis codes (YXS, CYX, TZCYX, ...) in NGFF letters; samples (S) are channels."""
    axes = axes.lower()
    return axes.replace("s", "c") if "c" not in axes else axes


def _guess_axes(path: str, array: zarr.Array) -> str:
    """Axes of a plain array: its Zarr v3 dimension names when they are NGFF letters, else from its shape."""
    names = getattr(array.metadata, "dimension_names", None)
    if names and all(isinstance(n, str) and len(n) == 1 and n.lower() in KNOWN_AXES for n in names):
        return "".join(names).lower()
    if array.ndim == 2:
        return "yx"
    if array.ndim == 3 and array.shape[-1] <= 4:
        return "yxc"
    if array.ndim == 3 and array.shape[0] <= 4:
        return "cyx"
    raise SlideError(
        f"{path}: cannot tell the axes of a Zarr array of shape {tuple(array.shape)}; expected YX, YXC or CYX "
        "with at most 4 channels (or write it as OME-Zarr with axes metadata)"
    )


def _ngff_metadata(group: zarr.Group) -> dict[str, Any]:
    attrs = group.attrs.asdict()
    # NGFF 0.5 (Zarr v3) nests everything under "ome"; 0.4 (Zarr v2) puts it at the top level
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def _open_ngff(path: str, group: zarr.Group, level: int) -> Slide:
    meta = _ngff_metadata(group)
    multiscales = meta.get("multiscales")
    if not multiscales or not isinstance(multiscales, list) or not multiscales[0].get("datasets"):
        raise SlideError(f"{path} is a Zarr group without OME-NGFF multiscales metadata (not an OME-Zarr image)")
    image = multiscales[0]
    datasets = image["datasets"]
    _check_level(path, level, len(datasets))
    # NGFF 0.1/0.2 had no axes and were always 5-D
    axis_meta = [a if isinstance(a, dict) else {"name": a} for a in image.get("axes") or list(KNOWN_AXES)]
    axes = "".join(str(a.get("name", "")).lower() for a in axis_meta)
    try:
        array = group[datasets[level]["path"]]
    except (KeyError, TypeError):
        raise SlideError(f"{path}: level {level} dataset {datasets[level].get('path')!r} is missing") from None
    if not isinstance(array, zarr.Array):
        raise SlideError(f"{path}: level {level} dataset {datasets[level]['path']!r} is not an array")
    scale = _scale(datasets[level], image, len(axes))
    pixel_size = None
    if scale is not None and "x" in axes:
        factor = UNIT_TO_UM.get(str(axis_meta[axes.index("x")].get("unit", "")).lower())
        pixel_size = float(scale[axes.index("x")]) * factor if factor is not None else None
    return _make_slide(path, level, len(datasets), axes, array, pixel_size)


def _scale(dataset: dict[str, Any], image: dict[str, Any], ndim: int) -> list[float] | None:
    """The level's total scale: its own ``scale`` transform times the image-wide one, if any."""
    total = None
    for transforms in (dataset.get("coordinateTransformations"), image.get("coordinateTransformations")):
        for transform in transforms or []:
            if transform.get("type") == "scale" and len(transform.get("scale", [])) == ndim:
                values = [float(v) for v in transform["scale"]]
                total = values if total is None else [a * b for a, b in zip(total, values, strict=True)]
    return total


def _check_level(path: str, level: int, levels: int) -> None:
    if not 0 <= level < levels:
        raise SlideError(
            f"{path}: level {level} does not exist; it has {levels} level{'s' if levels != 1 else ''} "
            f"(0 to {levels - 1})"
        )


def _make_slide(path: str, level: int, levels: int, axes: str, array: Any, pixel_size: float | None) -> Slide:
    """Check the axes against the array and build the Slide."""
    if len(axes) != array.ndim or len(set(axes)) != len(axes):
        raise SlideError(f"{path}: axes {axes!r} do not fit an array of shape {tuple(array.shape)}")
    if not set(SPATIAL) <= set(axes):
        raise SlideError(f"{path}: axes {axes!r} lack y and x; a slide needs both")
    sizes = dict(zip(axes, array.shape, strict=True))
    if extra := {a: n for a, n in sizes.items() if a not in "cyx" and n != 1}:
        described = ", ".join(f"{a}={n}" for a, n in extra.items())
        raise SlideError(
            f"{path}: axes {axes!r} of shape {tuple(array.shape)} have non-singleton {described}; "
            "only c, y and x may be larger than 1"
        )
    _check_claims(path, level, axes, array)
    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        pixel_size = None  # a zero, negative or NaN size in the metadata says nothing: unknown, not believed
    return Slide(
        path=path,
        level=level,
        levels=levels,
        axes=axes,
        channels=int(sizes.get("c", 1)),
        height=int(sizes["y"]),
        width=int(sizes["x"]),
        dtype=np.dtype(array.dtype),
        pixel_size_um=pixel_size,
        array=array,
    )


def _check_claims(path: str, level: int, axes: str, array: Any) -> None:
    """Refuse a level whose metadata claims what no slide has (see ``MAX_SIDE`` and the others), before any read."""
    shape = tuple(int(n) for n in array.shape)
    sizes = dict(zip(axes, shape, strict=True))
    height, width, channels = sizes["y"], sizes["x"], sizes.get("c", 1)
    if min(shape) <= 0:
        raise SlideError(f"{path}: level {level} has no pixels (shape {shape})")
    if max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
        raise SlideError(
            f"{path}: level {level} claims {height:,} x {width:,} pixels (shape {shape}), more than a slide may have "
            f"(unet.slide.MAX_SIDE = {MAX_SIDE:,} pixels a side, MAX_PIXELS = {MAX_PIXELS:,} a level)"
        )
    if channels > MAX_CHANNELS:
        raise SlideError(
            f"{path}: level {level} claims {channels:,} channels (shape {shape}), more than unet.slide.MAX_CHANNELS "
            f"= {MAX_CHANNELS}"
        )
    try:
        chunks = getattr(array, "chunks", None)
    except (NotImplementedError, ValueError, TypeError):  # a chunk grid without one chunk shape
        chunks = None
    if chunks is not None:
        chunks = tuple(int(n) for n in chunks)
        chunk_bytes = math.prod(chunks) * np.dtype(array.dtype).itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise SlideError(
                f"{path}: level {level} is stored in chunks of {chunks} ({chunk_bytes / 2**20:,.0f} MiB decoded), "
                f"more than unet.slide.MAX_CHUNK_BYTES = {MAX_CHUNK_BYTES // 2**20:,} MiB: reading any "
                "pixel would decode a whole chunk; save it tiled or in smaller chunks"
            )
