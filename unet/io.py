"""Reading and writing images: TIFF (and Aperio SVS), PNG/JPEG, NumPy and Zarr arrays."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from unet import storage
from unet.errors import UserError, one_line

TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
ZARR_SUFFIXES = {".ome.zarr", ".zarr"}
SUPPORTED = sorted(TIFF_SUFFIXES | PIL_SUFFIXES | {".npy", ".zarr"})


def longest_first(suffixes: set[str]) -> tuple[str, ...]:
    """``suffixes`` in the order a name is matched against them: a double suffix (``.ome.tif``) before its last
    part (``.tif``)."""
    return tuple(sorted(suffixes, key=lambda suffix: (len(suffix), suffix), reverse=True))


FORMAT_SUFFIXES = longest_first({*SUPPORTED, *ZARR_SUFFIXES})  # what ``stem`` strips: every format read


class ImageReadError(UserError):
    """An image file is missing, of an unsupported type, or unreadable."""


def stem(location: str | Path) -> str:
    """A file's (or store's) name without its format suffix, one of ``FORMAT_SUFFIXES`` in any case, a double one
    whole: ``a`` for ``a.ome.zarr``, ``s3://b/a.ome.zarr`` and ``a.ome.tif``, ``a.b`` for ``a.b.svs``. A name that is
    only a suffix (``.zarr``) or ends in none is kept whole. Images pair with label files by it, and a batch's slides
    name their outputs by it."""
    name = storage.basename(location)
    suffix = next((s for s in FORMAT_SUFFIXES if name.lower().endswith(s) and len(name) > len(s)), "")
    return name[: len(name) - len(suffix)]


def image_suffix(path: Path) -> str:
    """Lower-case suffix, keeping the double suffix of ``.ome.tif(f)``."""
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def read_image(path: str | Path, max_pixels: int | None = None, setting: str = "max_pixels") -> np.ndarray:
    """Read a whole image into memory as it is stored (YX or YXC for 2-D images).

    With ``max_pixels`` an image whose header claims more pixels (height x width) is refused before any pixel is
    decoded, naming ``setting`` (the option that raises the limit). For slides larger than memory, use
    ``pipelines.convert`` and read the Zarr lazily instead.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image not found: {path}")
    suffix = image_suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0].levels[0]  # an SVS's full resolution
                check_pixels(path, series.shape, max_pixels, setting, series.axes)
                return tif.asarray(series=0, level=0)
        if suffix in PIL_SUFFIXES:
            with Image.open(path) as img:  # reads the header only; Pillow refuses decompression bombs here
                check_pixels(path, (img.height, img.width), max_pixels, setting)
                return np.asarray(img)
        if suffix == ".npy":
            check_pixels(path, npy_shape(path), max_pixels, setting)
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False))  # a file shorter than its header says:
            # refused by the memory map, where np.load would allocate what the header claims first
        if suffix == ".zarr":
            import zarr

            array = zarr.open_array(path, mode="r")
            check_pixels(path, array.shape, max_pixels, setting)
            return np.asarray(GuardedReads(array, path)[...])
    except Image.DecompressionBombError as exc:  # before our own limit when that is above Pillow's
        raise ImageReadError(f"cannot read image {path}: {exc} (Pillow's limit; save it as TIFF)") from None
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ImageReadError(f"cannot read image {path}: {one_line(exc)}") from None
    raise ImageReadError(f"unsupported image type {suffix!r} for {path}; supported: {', '.join(SUPPORTED)}")


def npy_shape(path: str | Path) -> tuple[int, ...]:
    """The shape a ``.npy`` file's header claims, read without reading (or allocating) the array."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read(handle)[0])


def image_pixels(shape: tuple[int, ...], axes: str | None = None) -> int:
    """Height x width of an image of ``shape``: its Y and X axes (tifffile letters) if given, else the first two."""
    if axes and "Y" in axes and "X" in axes:
        return int(shape[axes.index("Y")]) * int(shape[axes.index("X")])
    return math.prod(int(n) for n in shape[:2])


def check_pixels(
    path: str | Path, shape: tuple[int, ...], max_pixels: int | None, setting: str, axes: str | None = None
) -> None:
    """Refuse an image whose (header's) height x width exceeds ``max_pixels``, in one line naming ``setting``."""
    pixels = image_pixels(tuple(shape), axes)
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"{path} has {pixels:,} pixels (shape {tuple(int(n) for n in shape)}), more than {setting} = "
            f"{max_pixels:,}: it would be read whole; crop or tile it, or raise the limit (--set {setting}=N)"
        )


class ImageTooLargeError(ImageReadError):
    """An image whose header claims more pixels than the caller's limit (nothing was decoded)."""


class GuardedReads:
    """A read-only array-like over a lazily read array (Zarr, or a TIFF through tifffile's Zarr store) whose read
    errors (a truncated or corrupt chunk, a file cut short) become one line: an ``error`` naming the file, the
    window and, found by reading the window's chunks one by one, the chunk that fails.

    Dask reads it like the array itself (``da.from_array``); ``array`` is the array underneath.
    """

    def __init__(self, array: Any, path: str | Path, error: type[UserError] = ImageReadError) -> None:
        self.array, self.path, self.error = array, str(path), error
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(n) for n in array.chunks)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self._read(key)
        except (MemoryError, UserError):
            raise
        except Exception as exc:  # codecs and stores raise many kinds (RuntimeError, ValueError, OSError, ...)
            window = self._window(key)
            where = ", ".join(f"{s.start}:{s.stop}" for s in window) if window else repr(key)
            raise self.error(f"{self.path}: cannot read [{where}]{self._bad_chunk(window)} ({one_line(exc)})") from None

    def _read(self, key: Any) -> np.ndarray:
        """``array[key]``; a Zarr array's whole chunks decoded in this thread (``unet.chunk_io``) where ``key`` is
        a window (slices and single indices, one per axis)."""
        import zarr

        from unet import chunk_io

        key = key if isinstance(key, tuple) else (key,)
        plain = len(key) == self.ndim and all(isinstance(k, (slice, int, np.integer)) for k in key)
        if not (plain and isinstance(self.array, zarr.Array)) or (window := self._window(key)) is None:
            return np.asarray(self.array[key])
        return chunk_io.read(self.array, window)[tuple(slice(None) if isinstance(k, slice) else 0 for k in key)]

    def __dask_tokenize__(self) -> Any:  # one name per wrapper (its array may not pickle, e.g. a TIFF's store)
        return type(self).__name__, self.path, self.shape, str(self.dtype), self.chunks, id(self)

    def _window(self, key: Any) -> tuple[slice, ...] | None:
        """``key`` as one unit-step slice per axis, or None for other indexing."""
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        window = []
        for k, n in zip(key, self.shape, strict=False):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    return None
                window.append(slice(start, max(start, stop)))
            elif isinstance(k, (int, np.integer)):
                window.append(slice(int(k) % n, int(k) % n + 1))
            else:
                return None
        return tuple(window) if len(window) == self.ndim else None

    def _bad_chunk(self, window: tuple[slice, ...] | None, most: int = 4096) -> str:
        """The first chunk in ``window`` that fails to read alone, as ", chunk 'c/0/1/2'" (its key in a Zarr store,
        its index otherwise), or "" if none does (or the window spans too many to try)."""
        if window is None:
            return ""
        grid = tuple(getattr(self.array, "shards", None) or self.chunks)  # a shard is the file a key names
        spans = [range(s.start // c, -(-s.stop // c)) for s, c in zip(window, grid, strict=True)]
        if math.prod(len(r) for r in spans) > most:
            return ""
        for index in itertools.product(*spans):
            cells = zip(index, grid, window, strict=True)
            part = tuple(slice(max(i * c, s.start), min((i + 1) * c, s.stop)) for i, c, s in cells)
            try:
                self.array[part]
            except (MemoryError, UserError):
                raise
            except Exception:
                return f", chunk {self._chunk_name(index)}"
        return ""

    def _chunk_name(self, index: tuple[int, ...]) -> str:
        """Its key in a Zarr store (the file or object holding it); its index in anything else (a TIFF's tiles)."""
        encode = getattr(getattr(self.array, "metadata", None), "encode_chunk_key", None)
        if callable(encode) and type(getattr(self.array, "store", None)).__module__.startswith("zarr."):
            return repr(encode(index))
        return str(index)


def write_png(location: str | Path, rgb: np.ndarray) -> str:
    """Write an HxWx3 (or HxW) uint8 array as PNG to a path (parent folders created) or URL. Fast compression: a
    picture of a slide barely compresses further, and each slide of a batch writes one."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return storage.write_bytes(location, buffer.getvalue())


def write_tiff(path: str | Path, cyx: np.ndarray, pixel_size_um: float) -> Path:
    """Write a CYX image as a TIFF stating its pixel size as a scanner's does (pixels per centimetre, which
    ``pixel_size_um`` reads back)."""
    per_cm = 1e4 / pixel_size_um
    tifffile.imwrite(path, np.moveaxis(cyx, 0, -1), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return Path(path)


def pixel_size_um(path: str | Path) -> float | None:
    """Pixel size in micrometres from TIFF metadata (Aperio MPP, OME PhysicalSizeX, resolution tags); None where
    it states none, or a size that is not a positive number."""
    size = _stated_pixel_size_um(path)
    return size if size is not None and math.isfinite(size) and size > 0 else None


def _stated_pixel_size_um(path: str | Path) -> float | None:
    path = Path(path)
    if image_suffix(path) not in TIFF_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if tif.is_svs:
                return float(tifffile.tifffile.svs_description_metadata(page.description)["MPP"])
            if tif.is_ome and tif.ome_metadata and "PhysicalSizeX=" in tif.ome_metadata:
                value = tif.ome_metadata.split('PhysicalSizeX="', 1)[1].split('"', 1)[0]
                return float(value)
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                numerator, denominator = tags["XResolution"].value
                per_unit = numerator / denominator if denominator else 0
                # inch, centimetre, and the millimetre and micrometre some microscopes write
                unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(int(tags["ResolutionUnit"].value))
                if per_unit > 0 and unit and (per_unit != 1 or unit == 1.0):  # 1 per inch/cm means "unknown"
                    return unit / per_unit
    except (OSError, KeyError, ValueError, IndexError, tifffile.TiffFileError):
        return None
    return None
