"""Zarr images: OME-Zarr groups (NGFF 0.1 to 0.5: axes, levels and pixel size from the metadata) and plain Zarr
arrays (axes from their dimension names or their shape)."""

from __future__ import annotations

from typing import Any

import zarr

from unet.slides.base import KNOWN_AXES, Slide, SlideError, check_level, make_slide

# NGFF spatial units we can express in micrometres (the spec allows more; these cover microscopy)
UNIT_TO_UM = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
ZARR_ERRORS = (OSError, ValueError, TypeError, KeyError, zarr.errors.BaseZarrError)


def guess_axes(path: str, array: zarr.Array) -> str:
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


def open_ngff(path: str, group: zarr.Group, level: int) -> Slide:
    meta = _ngff_metadata(group)
    multiscales = meta.get("multiscales")
    if not multiscales or not isinstance(multiscales, list) or not multiscales[0].get("datasets"):
        raise SlideError(f"{path} is a Zarr group without OME-NGFF multiscales metadata (not an OME-Zarr image)")
    image = multiscales[0]
    datasets = image["datasets"]
    check_level(path, level, len(datasets))
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
    return make_slide(path, level, len(datasets), axes, array, pixel_size)


def _scale(dataset: dict[str, Any], image: dict[str, Any], ndim: int) -> list[float] | None:
    """The level's total scale: its own ``scale`` transform times the image-wide one, if any."""
    total = None
    for transforms in (dataset.get("coordinateTransformations"), image.get("coordinateTransformations")):
        for transform in transforms or []:
            if transform.get("type") == "scale" and len(transform.get("scale", [])) == ndim:
                values = [float(v) for v in transform["scale"]]
                total = values if total is None else [a * b for a, b in zip(total, values, strict=True)]
    return total
