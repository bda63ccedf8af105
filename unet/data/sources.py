"""Finding image/label pairs on disk and opening them lazily, so large inputs are never read whole."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr

from unet.errors import UserError, one_line
from unet.io import (
    SUPPORTED,
    TIFF_SUFFIXES,
    GuardedReads,
    ImageReadError,
    check_pixels,
    image_suffix,
    npy_shape,
    pixel_size_um,
    read_image,
    stem,
)


class DataError(UserError):
    """Training inputs that cannot be used as they are (the message names the file)."""


@dataclass(frozen=True)
class Pair:
    """One training example: an image and its instance labels, matched by file stem."""

    name: str
    image: Path
    labels: Path


def list_inputs(location: str) -> list[Path]:
    """Image files in a folder, or matching a glob pattern, sorted by name."""
    path = Path(location)
    candidates = sorted(path.iterdir()) if path.is_dir() and image_suffix(path) != ".zarr" else None
    if candidates is None:
        candidates = sorted(Path(p) for p in glob.glob(location))
        if not candidates and not any(ch in location for ch in "*?["):
            raise DataError(f"input folder not found: {location}")
    return [p for p in candidates if image_suffix(p) in SUPPORTED and not p.name.startswith(".")]


def find_pairs(images: str, labels: str) -> list[Pair]:
    """Match every image with the label file of the same stem; each must have exactly one."""
    image_files, label_files = list_inputs(images), list_inputs(labels)
    if not image_files:
        raise DataError(f"no images found in {images} (looked for {', '.join(SUPPORTED)})")
    by_stem: dict[str, Path] = {}
    for path in label_files:
        if stem(path) in by_stem:
            raise DataError(f"two label files for {stem(path)!r}: {by_stem[stem(path)]} and {path}")
        by_stem[stem(path)] = path
    pairs = []
    for image in image_files:
        label = by_stem.get(stem(image))
        if label is None:
            raise DataError(f"no label file for image {image} (expected {stem(image)}.* in {labels})")
        pairs.append(Pair(stem(image), image, label))
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise DataError(f"two images share a name in {images}: {sorted({n for n in names if names.count(n) > 1})}")
    return pairs


def open_lazy(path: Path, max_pixels: int | None = None) -> GuardedReads | np.ndarray:
    """An array-like over the file that reads only what is indexed (TIFF, NumPy, Zarr); a chunk that cannot be
    read is a one-line ``DataError`` naming the file and the chunk.

    With ``max_pixels`` (``data.max_image_pixels``) a larger image (height x width) is refused from its header,
    before any pixel is read. PNG/JPEG cannot be read partially and are decoded whole (they are small by nature).
    """
    suffix = image_suffix(path)
    setting = "data.max_image_pixels"
    try:
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:  # the header's shape, with its axes (YXS, SYX, ...)
                series = tif.series[0].levels[0]
                check_pixels(path, series.shape, max_pixels, setting, series.axes)
            return GuardedReads(zarr.open_array(tifffile.imread(path, aszarr=True, level=0), mode="r"), path, DataError)
        if suffix == ".npy":
            check_pixels(path, npy_shape(path), max_pixels, setting)
            return np.load(path, mmap_mode="r", allow_pickle=False)  # a header claiming more than the file: refused
        if suffix == ".zarr":
            array = zarr.open_array(path, mode="r")
            check_pixels(path, array.shape, max_pixels, setting)
            return GuardedReads(array, path, DataError)
    except ImageReadError as exc:
        raise DataError(str(exc)) from None
    except (OSError, ValueError, TypeError, tifffile.TiffFileError, zarr.errors.BaseZarrError) as exc:
        raise DataError(f"cannot read {path}: {one_line(exc)}") from None
    try:
        return read_image(path, max_pixels, setting)
    except ImageReadError as exc:
        raise DataError(str(exc)) from None


def stated_pixel_size_um(path: Path) -> float | None:
    """Micrometres per pixel that an input's metadata states: TIFF (Aperio MPP, OME PhysicalSizeX, resolution
    tags) or an OME-Zarr image's scale; None for PNG, NumPy, plain Zarr and files that state none."""
    if image_suffix(path) != ".zarr":
        return pixel_size_um(path)
    from unet.slides import open_slide

    try:
        with open_slide(path) as slide:
            return slide.pixel_size_um
    except UserError:  # not an image open_slide reads: open_lazy says what is wrong with it
        return None


def check_pair(pair: Pair, image: GuardedReads | np.ndarray, labels: GuardedReads | np.ndarray) -> None:
    """Shape and dtype checks that need no pixel data."""
    if labels.ndim != 2:
        raise DataError(f"labels {pair.labels}: expected a 2-D instance label image, got shape {labels.shape}")
    if 0 in labels.shape:
        raise DataError(f"labels {pair.labels} have no pixels (shape {tuple(labels.shape)})")
    if np.dtype(labels.dtype).kind not in "iu":
        raise DataError(f"labels {pair.labels}: instance labels must be integers, got {labels.dtype}")
    if image.ndim not in (2, 3) or tuple(image.shape[:2]) != tuple(labels.shape):
        raise DataError(
            f"image {pair.image} has shape {tuple(image.shape)} but labels {pair.labels} have "
            f"{tuple(labels.shape)}: the image must be YX or YXC with the labels' YX"
        )
    if np.dtype(image.dtype).kind not in "uif":
        raise DataError(f"image {pair.image}: unsupported pixel type {image.dtype}")
