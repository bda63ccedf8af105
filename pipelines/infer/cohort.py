"""Which slides one inference job segments, and where each result goes.

``infer.input`` is one of:

- one slide (an OME-Zarr or Zarr store, a TIFF/SVS file): ``infer.output`` is its output store;
- a glob (``slides/*.ome.zarr``, ``s3://bucket/cohort/*.zarr``) or a folder / prefix holding slides: every
  Zarr store and TIFF/SVS file it matches or holds (sorted by name) is one slide;
- a manifest, a ``.csv`` with a header or a ``.yaml`` list, one slide per row: ``input`` and optionally
  ``output``, ``level`` and ``pixel_size_um`` (level 0's, for a slide whose metadata states none); relative
  paths are relative to the manifest's folder.

With several slides ``infer.output`` is a folder (or prefix): slide ``NAME.EXT`` is written to
``OUTPUT/NAME.ome.zarr`` (``EXT`` is ``.ome.zarr``, ``.zarr``, ``.ome.tif(f)``, ``.tif(f)`` or ``.svs``)
unless its manifest row names an output; the batch summary ``OUTPUT/batch_summary.csv`` lies beside them.

Refused before anything starts: two slides writing one output; an output that is an input, lies inside one or
holds one (the same path, or by way of a symlink, ``..``, ``./`` or a trailing slash: locations are compared
resolved); and in a batch an output outside ``infer.output`` (a manifest row's ``../x.ome.zarr``, an absolute
path or URL elsewhere, or a symlink leading out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field

from unet import storage
from unet.errors import UserError
from unet.io import TIFF_SUFFIXES, ZARR_SUFFIXES, longest_first, stem
from unet.manifest import is_manifest, read_manifest, relative_to

SLIDE_SUFFIXES = longest_first(ZARR_SUFFIXES | TIFF_SUFFIXES)  # slides by name (others are slides by content)
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
OUTPUT_SUFFIX = ".ome.zarr"
SUMMARY_NAME = "batch_summary.csv"


@dataclass(frozen=True)
class Item:
    """One slide of a job: where it is read, where its result goes (both resolved), which level (None: chosen for
    the model's pixel size) and level 0's pixel size where given (None: the slide's metadata)."""

    input: str
    output: str
    level: int | None
    pixel_size_um: float | None = None


@dataclass(frozen=True)
class Cohort:
    """The slides of a job; ``batch`` when ``infer.input`` named several (then ``folder`` holds the summary)."""

    items: list[Item]
    batch: bool
    folder: str | None = None

    @property
    def summary(self) -> str | None:
        return join(self.folder, SUMMARY_NAME) if self.folder else None


class ManifestRow(BaseModel):
    """One manifest row; unknown columns are errors, so a typo is not ignored."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1)
    output: str | None = None
    level: int | None = Field(None, ge=0)
    pixel_size_um: float | None = Field(None, gt=0)


def expand(input: str, output: str, level: int | None, pixel_size_um: float | None = None) -> Cohort:
    """The slides named by ``infer.input`` (see the module docstring), each with its output and level."""
    if is_manifest(input):
        return _checked(_from_manifest(input, output, level, pixel_size_um), output)
    if is_one_slide(input, "infer.input"):
        item = Item(storage.resolve(input), storage.resolve(output), level, pixel_size_um)
        if clash := storage.overlap(item.output, item.input):  # --overwrite would replace the slide with its result
            raise UserError(f"infer.output {output} {clash} infer.input {input}; choose another output")
        return Cohort([item], batch=False)
    if storage.resolve(output) == storage.resolve(input):  # a re-run would segment the outputs too
        raise UserError(f"infer.output must not be the input folder {input}; choose another folder")
    slides = find_slides(input)
    return _checked([Item(slide, output_for(slide, output), level, pixel_size_um) for slide in slides], output)


def is_one_slide(location: str, setting: str) -> bool:
    """Whether ``location`` (not a glob) is one slide rather than a folder of them; ``setting`` names it when it is
    missing."""
    if any(char in location for char in "*?["):
        return False
    if not storage.exists(location):
        raise UserError(f"{setting} not found: {location}")
    return storage.is_file(location) or is_zarr(location)


def find_slides(location: str) -> list[str]:
    """The slides a glob matches or a folder (prefix) holds, sorted by name; one line if there are none."""
    if any(char in location for char in "*?["):
        slides = [match for match in _glob(location) if is_slide(match)]
        if not slides:
            raise UserError(f"no slides match {location} (Zarr stores or {', '.join(longest_first(TIFF_SUFFIXES))} "
                            "files)")  # fmt: skip
        return slides
    slides = [child for child in _children(location) if is_slide(child)]
    if not slides:
        raise UserError(f"{location} is a folder without slides (Zarr stores or TIFF/SVS files)")
    return slides


def output_for(slide: str, folder: str) -> str:
    """``FOLDER/NAME.ome.zarr`` for slide ``.../NAME.EXT``."""
    return join(folder, stem(slide) + OUTPUT_SUFFIX)


def join(folder: str, name: str) -> str:
    folder = storage.resolve(folder)
    return f"{folder}/{name}" if storage.is_url(folder) else str(PurePosixPath(folder) / name)


def is_zarr(location: str) -> bool:
    """Whether ``location`` is the root of a Zarr array or group (v2 or v3)."""
    return any(storage.exists(join(location, marker)) for marker in ZARR_MARKERS)


def is_slide(location: str) -> bool:
    """A TIFF/SVS file or a Zarr store by name, or any Zarr store (a broken store still counts: it is reported)."""
    return storage.basename(location).lower().endswith(SLIDE_SUFFIXES) or is_zarr(location)


def _glob(pattern: str) -> list[str]:
    fs, path = storage.filesystem(pattern)
    return sorted(fs.unstrip_protocol(m) if storage.is_url(pattern) else m for m in fs.glob(path))


def _children(folder: str) -> list[str]:
    fs, path = storage.filesystem(folder)
    names = fs.ls(path, detail=False)
    return sorted(fs.unstrip_protocol(n) if storage.is_url(folder) else n for n in names)


def _from_manifest(manifest: str, output: str, level: int | None, pixel_size_um: float | None) -> list[Item]:
    items = []
    for row in read_manifest(manifest, ManifestRow, "slide", "input"):
        slide = relative_to(manifest, row.input)
        items.append(Item(slide, relative_to(manifest, row.output) if row.output else output_for(slide, output),
                          level if row.level is None else row.level, row.pixel_size_um or pixel_size_um))  # fmt: skip
    return items


def _checked(items: list[Item], folder: str) -> Cohort:
    """Refuse two slides writing one output, an output that is, holds or lies inside an input, and an output
    outside ``folder`` (``infer.output``)."""
    seen: dict[str, str] = {}
    inputs = {storage.normal(item.input): item.input for item in items}
    outputs = {storage.normal(item.output) for item in items}
    root = storage.normal(folder)
    for item in items:
        output = storage.normal(item.output)
        if output in seen:
            raise UserError(
                f"{seen[output]} and {item.input} would both write {item.output}; name outputs in a manifest"
            )
        if output in inputs:
            raise UserError(f"the output of {item.input} would overwrite an input: {item.output}")
        if inside := next((inputs[p] for p in storage.parents(output) if p in inputs), None):
            raise UserError(f"the output of {item.input} would be written inside the input {inside}: {item.output}")
        if root not in storage.parents(output):
            raise UserError(
                f"the output of {item.input} is not inside infer.output {storage.resolve(folder)}: {item.output} "
                "(a manifest's outputs must lie inside infer.output)"
            )
        seen[output] = item.input
    for location, name in inputs.items():  # an input inside an output: --overwrite would delete it
        if holder := next((p for p in storage.parents(location) if p in outputs), None):
            raise UserError(f"the input {name} lies inside the output {holder}; choose other outputs")
    return Cohort(items, batch=True, folder=storage.resolve(folder))
