"""What every slide reader shares: ``Slide`` (one resolution level, pixels read only when indexed), ``SlideError``,
the limits on what a slide's metadata may claim, and ``make_slide``, which checks a level's axes and claims before
any pixel is read.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from unet.errors import UserError
from unet.io import GuardedReads

if TYPE_CHECKING:
    import dask.array as da

    from unet.slides.tiles import TileCache

SPATIAL = "yx"
KNOWN_AXES = "tczyx"
# What a slide's metadata may claim (per level). The largest scanners write about 2e10 pixels a slide (200,000 x
# 100,000); beyond these limits a header is corrupt or hostile, and believing it would allocate absurd memory.
MAX_SIDE = 2**24  # pixels a side (16.7 million): Dask's and the tiling's bookkeeping grows with it
MAX_PIXELS = 2**36  # pixels a level (68.7 billion, e.g. 262,144 x 262,144)
MAX_CHANNELS = 256
MAX_CHUNK_BYTES = 2**30  # one stored chunk (a TIFF strip or tile) decoded: reading any pixel of it costs this much
# Fewer pixels a stored chunk and each read decodes thousands of them: Zarr reads 8x8-px chunks at 0.15 Mpx/s, 32x32
# at 3, 64x64 at 30 (2 cores); a level of more than MAX_SMALL_CHUNKS such chunks is refused for inference.
MIN_CHUNK_PIXELS, MAX_SMALL_CHUNKS = 64 * 64, 256
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

    ``array`` is the stored array in its own axis order (``axes``); ``read`` and ``to_dask`` return CYX. With
    ``tiles`` (``with_tiles``), ``read`` decodes whole stored chunks and keeps them there for the next window.
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
    tiles: TileCache | None = field(default=None, repr=False, compare=False)
    token: int = field(default_factory=itertools.count().__next__, init=False, repr=False, compare=False)  # in tiles

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
        if self.tiles is not None and y0 < y1 and x0 < x1:
            return self._to_cyx(self._read_tiles(y0, y1, x0, x1))
        return self._to_cyx(np.asarray(self._reads[self._selection(slice(y0, y1), slice(x0, x1))]))

    def with_tiles(self, tiles: TileCache) -> Slide:
        """This level, its reads decoding whole stored chunks kept in ``tiles`` (``unet.slides.tiles``); a level
        without a regular chunk grid (OpenSlide keeps its own tile cache) is returned as it is."""
        if not isinstance(self.array, zarr.Array) or stored_chunks(self.array) is None:
            return self
        return dataclasses.replace(self, tiles=tiles)

    def _read_tiles(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The window in the stored axis order (less the singleton ones), put together from whole stored chunks
        (every channel of each), each decoded once while ``tiles`` keeps it."""
        sizes = dict(zip(self.axes, stored_chunks(self.array), strict=True))
        height, width = sizes["y"], sizes["x"]
        kept = [axis for axis in self.axes if axis in "cyx"]
        ky, kx = kept.index("y"), kept.index("x")
        cells = [(row, col) for row in range(y0 // height, (y1 - 1) // height + 1)
                 for col in range(x0 // width, (x1 - 1) // width + 1)]  # fmt: skip
        self._decode_together(self.tiles.missing([(self.token, *cell) for cell in cells]), height, width, ky, kx)
        out: np.ndarray | None = None
        for row, col in cells:
            ty0, tx0 = row * height, col * width
            ys, xs = slice(ty0, min(ty0 + height, self.height)), slice(tx0, min(tx0 + width, self.width))
            tile = self.tiles.get((self.token, row, col), lambda ys=ys, xs=xs: self._reads[self._selection(ys, xs)])
            if out is None:
                shape = list(tile.shape)
                shape[ky], shape[kx] = y1 - y0, x1 - x0
                out = np.empty(shape, tile.dtype)
            inside = [slice(None)] * len(kept)
            target = [slice(None)] * len(kept)
            inside[ky] = slice(max(y0, ty0) - ty0, min(y1, ty0 + height) - ty0)
            inside[kx] = slice(max(x0, tx0) - tx0, min(x1, tx0 + width) - tx0)
            target[ky] = slice(max(y0, ty0) - y0, min(y1, ty0 + height) - y0)
            target[kx] = slice(max(x0, tx0) - x0, min(x1, tx0 + width) - x0)
            out[tuple(target)] = tile[tuple(inside)]
        return out

    def _decode_together(self, keys: list[tuple[int, int, int]], height: int, width: int, ky: int, kx: int) -> None:
        """Decode the stored chunks ``keys`` (token, row, col) in one read of the rectangle around them and keep
        each in ``tiles``: one call's overhead instead of one a chunk (~1 ms of the GIL apiece through Zarr's event
        loop, docs/benchmarks.md, "The pipeline around the model"), and where Zarr serves the read (an object store,
        a TIFF) it fetches and decodes them concurrently, not one round trip after another. Chunks of the rectangle
        kept already are decoded again, not kept twice."""
        tile_bytes = self.dtype.itemsize * height * width * self.channels  # every channel of a stored chunk
        if len(keys) < 2 or len(keys) * tile_bytes > self.tiles.budget_bytes:
            return  # none or one (``tiles.get`` decodes it), or more than are kept: decoded one by one as needed
        rows, cols = [key[1] for key in keys], [key[2] for key in keys]
        top, left = min(rows) * height, min(cols) * width
        bottom, right = min((max(rows) + 1) * height, self.height), min((max(cols) + 1) * width, self.width)
        block = np.asarray(self._reads[self._selection(slice(top, bottom), slice(left, right))])
        for key in keys:
            part = [slice(None)] * block.ndim
            part[ky] = slice(key[1] * height - top, min((key[1] + 1) * height, self.height) - top)
            part[kx] = slice(key[2] * width - left, min((key[2] + 1) * width, self.width) - left)
            self.tiles.put(key, block[tuple(part)].copy())  # a copy: a kept view would keep the whole block

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


def check_level(path: str, level: int, levels: int) -> None:
    if not 0 <= level < levels:
        raise SlideError(
            f"{path}: level {level} does not exist; it has {levels} level{'s' if levels != 1 else ''} "
            f"(0 to {levels - 1})"
        )


def make_slide(path: str, level: int, levels: int, axes: str, array: Any, pixel_size: float | None) -> Slide:
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
    check_claims(path, level, axes, array)
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


def check_claims(path: str, level: int, axes: str, array: Any) -> None:
    """Refuse a level whose metadata claims what no slide has (see ``MAX_SIDE`` and the others), before any read."""
    shape = tuple(int(n) for n in array.shape)
    sizes = dict(zip(axes, shape, strict=True))
    height, width, channels = sizes["y"], sizes["x"], sizes.get("c", 1)
    if min(shape) <= 0:
        raise SlideError(f"{path}: level {level} has no pixels (shape {shape})")
    if max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
        raise SlideError(
            f"{path}: level {level} claims {height:,} x {width:,} pixels (shape {shape}), more than a slide may have "
            f"(unet.slides.MAX_SIDE = {MAX_SIDE:,} pixels a side, MAX_PIXELS = {MAX_PIXELS:,} a level)"
        )
    if channels > MAX_CHANNELS:
        raise SlideError(
            f"{path}: level {level} claims {channels:,} channels (shape {shape}), more than unet.slides.MAX_CHANNELS "
            f"= {MAX_CHANNELS}"
        )
    chunks = stored_chunks(array)
    if chunks is not None:
        chunk_bytes = math.prod(chunks) * np.dtype(array.dtype).itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise SlideError(
                f"{path}: level {level} is stored in chunks of {chunks} ({chunk_bytes / 2**20:,.0f} MiB decoded), "
                f"more than unet.slides.MAX_CHUNK_BYTES = {MAX_CHUNK_BYTES // 2**20:,} MiB: reading any "
                "pixel would decode a whole chunk; save it tiled or in smaller chunks"
            )


def stored_chunks(array: Any) -> tuple[int, ...] | None:
    """The shape of ``array``'s stored chunks, one size per axis; None where it has none (an OpenSlide level) or no
    single one (a chunk grid of several shapes)."""
    try:
        chunks = getattr(array, "chunks", None)
    except (NotImplementedError, ValueError, TypeError):  # a chunk grid without one chunk shape
        return None
    if not isinstance(chunks, tuple) or len(chunks) != len(array.shape):
        return None
    return tuple(int(n) for n in chunks)


def check_chunk_size(slide: Slide) -> None:
    """Refuse, for inference, a level stored in chunks so small that reading it would take hours (``MIN_CHUNK_PIXELS``);
    ``pipelines.convert`` rewrites it in 512-px chunks once."""
    chunks = stored_chunks(slide.array)
    if chunks is None:
        return
    sizes = dict(zip(slide.axes, chunks, strict=True))
    height, width = min(sizes["y"], slide.height), min(sizes["x"], slide.width)
    count = math.ceil(slide.height / height) * math.ceil(slide.width / width)
    if height * width < MIN_CHUNK_PIXELS and count > MAX_SMALL_CHUNKS:
        per_window = math.ceil(1024 / height) * math.ceil(1024 / width)
        raise SlideError(
            f"{slide.path}: level {slide.level} is stored in {count:,} chunks of {height} x {width} px, too small to "
            f"read in reasonable time (each 1024-px window decodes {per_window:,} of them); rechunk it once: "
            f"python -m pipelines.convert {slide.path} RECHUNKED.ome.zarr"
        )
