"""Training examples from QuPath annotations on slides (``data.annotations``), for ``pipelines.prepare``.

Each region (an annotation of a ``data.region_classes`` class, or an unclassified rectangle) becomes one example:
the slide read at the training pixel size over the region's box, the objects it meets rasterised as instance labels
(``unet.annotations``: pixel centres inside the outline, overlaps to the smaller object, counted), and a mask of
the region (less ``Ignore*`` areas). **An object cut by the region's border is kept whole**, and the box reaches
as far as it does, while the loss and the scores leave out every pixel outside the region: half a nucleus
labelled as background would teach the model to cut nuclei, and without the whole object the border term of the
weight map would be wrong near the region's edge. Objects outside every region are not used: the region is where
the annotation is complete.

Where the annotations come from: ``data.annotations`` is one GeoJSON file (``data.images`` then names one slide),
a folder or glob of them (slide ``NAME.EXT`` pairs with ``NAME.geojson``, as QuPath names its exports), or a
CSV/YAML manifest with the columns ``slide`` and ``annotations`` (paths relative to the manifest)."""

from __future__ import annotations

import contextlib
import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from unet.config import Config

if TYPE_CHECKING:
    from unet.annotations import Annotations

log = logging.getLogger("prepare")
ANNOTATION_SUFFIXES = (".geojson", ".json")


class AnnotatedRow(BaseModel):
    """One row of an annotations manifest."""

    model_config = ConfigDict(extra="forbid")
    slide: str = Field(min_length=1)
    annotations: str = Field(min_length=1)


@dataclass(frozen=True)
class Source:
    """What ``training_pixel_size`` and its messages need of a slide (as of an image/label pair)."""

    name: str
    image: str  # the slide
    labels: str  # the annotation file


@dataclass
class AnnotatedSlide:
    """A slide, its annotations and level 0's pixel size (its metadata's, or ``data.pixel_size_um``)."""

    pair: Source
    annotations: Annotations
    height: int
    width: int
    stated_pixel_size: float | None


def find_annotated(config: Config) -> list[tuple[str, str]]:
    """(slide, annotation file) pairs that ``data.images`` and ``data.annotations`` name, resolved."""
    from pipelines.infer.cohort import find_slides, is_one_slide
    from unet import storage
    from unet.data.sources import DataError
    from unet.io import stem
    from unet.manifest import is_manifest, read_manifest, relative_to

    data = config.data
    if data.labels:
        raise DataError("set data.labels or data.annotations, not both")
    if is_manifest(data.annotations):
        rows = read_manifest(data.annotations, AnnotatedRow, "slide", "slide")
        return [(relative_to(data.annotations, r.slide), relative_to(data.annotations, r.annotations)) for r in rows]
    if not data.images:
        raise DataError("data.annotations needs data.images: the slide (or a folder or glob of slides) it annotates")
    if Path(data.annotations).is_file():
        if not is_one_slide(data.images, "data.images"):
            raise DataError(f"data.annotations {data.annotations} is one file: data.images must be one slide, not "
                            f"{data.images}; pair several with a folder or a manifest")  # fmt: skip
        return [(storage.resolve(data.images), str(Path(data.annotations).resolve()))]
    files = _annotation_files(data.annotations)
    slides = [storage.resolve(data.images)] if is_one_slide(data.images, "data.images") else find_slides(data.images)
    by_name = {_annotation_stem(path): path for path in files}
    pairs = [(slide, by_name[stem(slide)]) for slide in slides if stem(slide) in by_name]
    if unmatched := sorted(set(by_name) - {stem(slide) for slide in slides}):
        log.warning("no slide for the annotations of %s in %s", ", ".join(unmatched), data.images)
    if not pairs:
        raise DataError(f"no slide of {data.images} has annotations in {data.annotations} (slide NAME.EXT pairs "
                        "with NAME.geojson)")  # fmt: skip
    return pairs


def _annotation_files(location: str) -> list[str]:
    from unet.data.sources import DataError

    path = Path(location)
    found = sorted(str(p) for p in path.iterdir()) if path.is_dir() else sorted(glob.glob(location))
    files = [f for f in found if f.lower().endswith(ANNOTATION_SUFFIXES)]
    if not files:
        raise DataError(f"no annotation files (.geojson) in {location}")
    return [str(Path(f).resolve()) for f in files]


def _annotation_stem(path: str) -> str:
    """``NAME`` of ``NAME.geojson``, ``NAME.qupath.geojson`` (``pipelines.export``'s) or ``NAME.json``."""
    name = Path(path).name
    for suffix in (".qupath.geojson", *ANNOTATION_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_annotated(config: Config) -> list[AnnotatedSlide]:
    """Every annotated slide, its annotations read and checked against it (regions exist, nothing lies outside)."""
    from unet.annotations import AnnotationRules, check_inside, read_annotations
    from unet.data.sources import DataError
    from unet.io import stem
    from unet.slides import open_slide

    data = config.data
    rules = AnnotationRules(tuple(data.region_classes), tuple(data.object_classes), tuple(data.ignore_classes),
                            data.rectangles_are_regions)  # fmt: skip
    slides = []
    for slide, path in find_annotated(config):
        if not Path(path).is_file():
            raise DataError(f"annotations not found: {path}")
        annotations = read_annotations(path, rules)
        with open_slide(slide, 0) as level0:
            height, width, stated = level0.height, level0.width, level0.pixel_size_um
        check_inside(annotations, height, width)
        if not annotations.regions:
            classes = " or ".join(data.region_classes)
            raise DataError(f"{path} marks no region: draw one (a rectangle, or an annotation of class {classes}) "
                            "around the objects you annotated completely")  # fmt: skip
        counts = annotations.counts
        log.info("%s: %d regions, %d objects (%d repaired, %d of other classes, %d points or lines, %d empty)",
                 path, counts["regions"], counts["objects"], counts["repaired"], counts["skipped_class"],
                 counts["skipped_geometry"], counts["empty"])  # fmt: skip
        size = data.pixel_size_um if stated is None else stated
        slides.append(AnnotatedSlide(Source(stem(slide), slide, path), annotations, height, width, size))
    return slides


class RegionExample:
    """One annotated region as a training example, with the interface ``pipelines.prepare`` writes from (image,
    labels, checks, arrays, attrs)."""

    def __init__(
        self, slide: AnnotatedSlide, index: int, pixel_size: float, chunk: int, channels: int, max_pixels: int
    ) -> None:
        import dask.array as da

        from unet.annotations import objects_in, rasterise
        from unet.data.sources import DataError
        from unet.resolution import open_at, plan_resolution

        self.slide, self.index = slide, index
        self.region = slide.annotations.regions[index]
        self.name = f"{slide.pair.name}-region{index:03d}"
        self.pair = Source(self.name, slide.pair.image, slide.pair.labels)
        plan = plan_resolution(slide.pair.image, pixel_size, pixel_size_um=slide.stated_pixel_size)
        self.level, self.to_level0, self.scale = plan.level, plan.to_level0, plan.scale
        self.box = self._box(objects_in(slide.annotations, self.region))
        y0, x0, y1, x1 = self.box
        if (y1 - y0) * (x1 - x0) > max_pixels:  # training reads each example whole
            raise DataError(f"{slide.pair.labels}: region {index} is {y1 - y0:,} x {x1 - x0:,} pixels at "
                            f"{pixel_size:g} um/px, more than data.max_image_pixels={max_pixels:,}; draw smaller "
                            "regions")  # fmt: skip
        raster = rasterise(slide.annotations, self.region, self.box, 1 / self.to_level0)
        if not raster.labels.any():
            log.warning("%s: region %d holds no objects: it trains as background", slide.pair.labels, index)
        self.raster = raster
        if raster.overlapping:
            log.info("%s: %d objects overlap (%d contested pixels given to the smaller object; %d hidden)", self.name,
                     raster.overlapping, raster.contested_pixels, raster.hidden)  # fmt: skip
        with contextlib.closing(open_at(slide.pair.image, plan.level, plan.scale)) as source:
            image = np.asarray(source.read(y0, y1, x0, x1))
        if image.shape[0] != channels:
            raise DataError(f"slide {slide.pair.image} has {image.shape[0]} channels but model.n_channels is "
                            f"{channels}")  # fmt: skip
        self.image = da.from_array(image, chunks=(image.shape[0], chunk, chunk))
        self.labels = da.from_array(raster.labels, chunks=(chunk, chunk))
        self.mask = da.from_array(raster.mask.astype(np.uint8), chunks=(chunk, chunk))
        self.channels = int(image.shape[0])
        self.objects = len(np.unique(raster.labels)) - 1  # those left with pixels (labels.max() counts hidden ones)

    def _box(self, objects: list) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) in training pixels: the region and the whole of every object it meets, on the slide."""
        import shapely

        x0, y0, x1, y1 = shapely.bounds(shapely.union_all([self.region, *objects]))
        height, width = (round(n / self.to_level0) for n in (self.slide.height, self.slide.width))
        scale = 1 / self.to_level0
        return (max(int(np.floor(y0 * scale)), 0), max(int(np.floor(x0 * scale)), 0),
                min(int(np.ceil(y1 * scale)), height), min(int(np.ceil(x1 * scale)), width))  # fmt: skip

    def attrs(self, split: str, pixel_size: float) -> dict[str, Any]:
        from unet import storage
        from unet.intensity import intensity_ranges

        return {
            "split": split,
            "source_image": self.slide.pair.image,
            "annotations": self.slide.pair.labels,
            "annotations_sha256": storage.sha256(self.slide.pair.labels),
            "region": self.index,
            "region_bounds_level0": list(self.region.bounds),  # x0, y0, x1, y1 in the slide's level-0 pixels
            "box": list(self.box),  # y0, x0, y1, x1 in the stored pixels
            "level": self.level,
            "objects": self.objects,
            "overlapping_objects": self.raster.overlapping,
            "contested_pixels": self.raster.contested_pixels,
            "hidden_objects": self.raster.hidden,
            "shape": list(self.labels.shape),
            "channels": self.channels,
            "dtype": str(self.image.dtype),
            "intensity_range": intensity_ranges(self.image),
            "pixel_size_um": pixel_size,
            "source_pixel_size_um": self.slide.stated_pixel_size,
            "resampled": self.scale != 1.0,
        }

    # what pipelines.prepare checks of every example
    def checks(self) -> dict[str, Any]:
        from unet.intensity import intensity_checks

        return intensity_checks(self.image)

    def check(self, computed: dict[str, Any]) -> None:
        from unet.data.sources import DataError
        from unet.intensity import refuse_by

        refuse_by(computed, f"slide {self.slide.pair.image}", self.image.dtype, DataError)

    def renumber_if_needed(self, largest: int) -> None:
        """Ids are 1..n already."""

    def resample_to(self, pixel_size: float, chunk: int, max_pixels: int) -> None:
        """Read at the training pixel size already."""


def region_examples(slides: list[AnnotatedSlide], pixel_size: float, config: Config, chunk: int) -> list:
    """One ``RegionExample`` per region of every slide."""
    from unet.data.sources import DataError

    data = config.data
    if data.split_by == "slide" and data.val_fraction > 0 and len(slides) < 2:
        raise DataError("data.split_by=slide holds out whole slides: it needs annotations of 2 slides or more; "
                        "use data.split_by=region")  # fmt: skip
    examples = [RegionExample(slide, index, pixel_size, chunk, config.model.n_channels, data.max_image_pixels)
                for slide in slides for index in range(len(slide.annotations.regions))]  # fmt: skip
    log.info("%d regions of %d slides, %d objects in all", len(examples), len(slides),
             sum(ex.objects for ex in examples))  # fmt: skip
    return examples
