"""QuPath annotations (File > Export objects as GeoJSON) as training labels: objects, complete regions, ignore areas.

Pathologists correct or draw nuclei in QuPath (often on ``pipelines.export --format qupath`` output) and mark where
their annotation is complete; ``read_annotations`` reads the export as shapely polygons, ``rasterise`` turns one
region into instance labels and a loss mask by the pixel rule of ``unet.outlines`` (pixel (r, c) is the square
[c, c + 1] x [r, r + 1]; it is inside a polygon iff its centre is), so outlines along pixel edges come back exactly.

The file, as QuPath writes and reads it: a FeatureCollection, a bare array of Features or one Feature (without the
FEATURE_COLLECTION option). A Feature has ``"id"`` (a UUID since 0.4; in 0.2 the object type, e.g.
"PathAnnotationObject"), ``"geometry"`` in level-0 pixels, origin top left (Polygon, MultiPolygon, Point/MultiPoint,
LineString, possibly GeometryCollection; a ``"plane"`` member is ignored) and ``"properties"``: ``"objectType"``
("annotation", "detection", "cell", "tile", ...; missing means annotation), ``"classification"`` (0.4+:
``{"name", "color": [r, g, b]}``, ``{"names": [...]}`` for a derived class; before: ``{"name", "colorRGB": int}``
with ``"parentClass"``), ``"isLocked"`` (only if locked), ``"measurements"``, and in a hierarchy export
``"childObjects"`` (read as further features). Sources:

- https://qupath.readthedocs.io/en/stable/docs/advanced/exporting_annotations.html (units, origin, export options;
  source: github.com/qupath/qupath-docs docs/advanced/exporting_annotations.md)
- https://qupath.github.io/javadoc/docs/qupath/lib/io/PathIO.GeoJsonExportOptions.html (FEATURE_COLLECTION)
- https://github.com/qupath/qupath/blob/main/qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java
  (PathObjectTypeAdapter: what is written and read) and GsonTools.java there (PathClassTypeAdapter: classes)
"""

from __future__ import annotations

import fnmatch
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape

from unet.errors import UserError

LEGACY_TYPES = {  # QuPath 0.2 stored the object type as the feature's id
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
POLYGONAL = {"Polygon", "MultiPolygon", "GeometryCollection"}
SKIPPED = {"Point", "MultiPoint", "LineString", "MultiLineString"}  # points and lines cover no pixels
Window = tuple[slice, slice]
COUNTS = ("features", "regions", "objects", "ignored", "repaired", "skipped_class", "skipped_geometry", "empty")


class AnnotationError(UserError):
    """An annotation file that cannot be used as it is; the message names the file and the feature."""


@dataclass(frozen=True)
class AnnotationRules:
    """Which QuPath classes mean what. Patterns are fnmatch patterns on the class name, case-sensitive as QuPath."""

    region_classes: tuple[str, ...] = ("Region*", "Training area")  # annotation is complete inside these
    object_classes: tuple[str, ...] = ("Nucleus",)  # empty: every detection or cell, of any class, is an object
    ignore_classes: tuple[str, ...] = ("Ignore*",)  # masked out of the loss inside regions
    rectangles_are_regions: bool = True  # training areas are often drawn with the rectangle tool and no class


@dataclass
class Annotations:
    """Polygons in the level-0 frame. ``objects`` are sorted by (bounds, normalised WKB), so labels do not depend
    on the order QuPath happened to write; ``origins`` says which feature each polygon came from, for messages."""

    source: str
    regions: list
    objects: list
    ignored: list
    counts: dict[str, int]
    origins: dict[str, list[str]] = field(default_factory=dict, repr=False)


@dataclass
class Raster:
    """One region's training labels over a box: objects 1..n, the loss mask and how overlaps were resolved."""

    labels: np.ndarray
    mask: np.ndarray
    overlapping: int
    contested_pixels: int
    hidden: int


def read_annotations(path: str | Path, rules: AnnotationRules = AnnotationRules()) -> Annotations:
    """Read a QuPath GeoJSON export; invalid polygons are repaired, points and lines and other classes skipped."""
    source = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise AnnotationError(f"{source}: cannot read the annotations ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{source}: not a JSON file ({' '.join(str(e).split())})") from e
    counts = dict.fromkeys(COUNTS, 0)
    found: dict[str, list] = {"regions": [], "objects": [], "ignored": []}
    for index, feature in enumerate(_flatten(_features(data, source))):
        where = _where(index, feature)
        if not isinstance(feature, dict) or str(feature.get("type", "")).lower() != "feature":
            raise AnnotationError(f"{source}: {where} is not a GeoJSON Feature")
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise AnnotationError(f"{source}: {where} has properties that are not a JSON object")
        kind = _object_type(feature, properties)
        if kind == "root":  # the hierarchy's root in a hierarchy export: no shape of its own
            continue
        counts["features"] += 1
        geometry = _geometry(_outline_of(kind, feature, properties), f"{source}: {where}")
        if geometry is None:
            counts["skipped_geometry"] += 1
            continue
        role = _role(kind, _class_name(properties.get("classification")), geometry, rules)
        if role is None:
            counts["skipped_class"] += 1
            continue
        if not geometry.is_valid:  # self-intersections, as freehand drawing makes them
            geometry = _polygonal(shapely.make_valid(geometry))
            counts["repaired"] += 1
        if geometry.is_empty or geometry.area == 0:
            if role == "regions":
                region = where.removeprefix("feature ")
                raise AnnotationError(f"{source}: region {region} is empty: zero area (redraw or delete it)")
            counts["empty"] += 1
            continue
        found[role].append((shapely.normalize(geometry), where))
        counts[role] += 1
    found["objects"].sort(key=lambda item: (item[0].bounds, shapely.to_wkb(item[0])))
    lists = {role: [geometry for geometry, _ in items] for role, items in found.items()}
    origins = {role: [where for _, where in items] for role, items in found.items()}
    return Annotations(source, lists["regions"], lists["objects"], lists["ignored"], counts, origins)


def check_inside(annotations: Annotations, height: int, width: int) -> None:
    """Raise AnnotationError for the first region or object not wholly inside the level-0 slide: a wrong slide,
    or a file exported from another image, would otherwise train on misplaced labels."""
    for role, noun in (("regions", "region"), ("objects", "object")):
        origins = annotations.origins.get(role, [])
        for i, geometry in enumerate(getattr(annotations, role)):
            x0, y0, x1, y1 = geometry.bounds
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                where = origins[i] if i < len(origins) else f"{noun} {i}"
                raise AnnotationError(
                    f"{annotations.source}: {noun} ({where}) lies outside the slide: x {x0:g}..{x1:g}, "
                    f"y {y0:g}..{y1:g} but the slide is {width} x {height} px (width x height) at level 0"
                )


def objects_in(annotations: Annotations, region: Any) -> list:
    """The objects whose inside meets the region's inside (objects merely touching it from outside are not)."""
    if not annotations.objects:
        return []
    objects = np.asarray(annotations.objects, dtype=object)
    shapely.prepare(region)
    hits = shapely.intersects(objects, region) & ~shapely.touches(objects, region)
    return list(objects[hits])


def rasterise(annotations: Annotations, region: Any, box: tuple[int, int, int, int], scale: float) -> Raster:
    """Labels and loss mask of one region over ``box`` = (y0, x0, y1, x1) in target pixels, ``scale`` target pixels
    per level-0 pixel. Objects meeting the region are drawn whole; where objects overlap, the smaller (by area)
    keeps the pixels, so a nucleus drawn over a larger one stays visible; equal areas go to the earlier object.
    Ids are 1..n in ``objects_in`` order; an object left without pixels is absent (``hidden`` if others took them)."""
    y0, x0, y1, x1 = box
    if y1 < y0 or x1 < x0 or not scale > 0:
        raise ValueError(f"rasterise: bad box {box} or scale {scale}")
    shape_ = (y1 - y0, x1 - x0)
    mask = np.zeros(shape_, dtype=bool)
    if (inside := _pixels(region, box, scale)) is not None:
        mask[inside[0]] |= inside[1]
    for ignore in annotations.ignored:
        if (inside := _pixels(ignore, box, scale)) is not None:
            mask[inside[0]] &= ~inside[1]
    objects = objects_in(annotations, region)
    seen, contested = np.zeros(shape_, dtype=bool), np.zeros(shape_, dtype=bool)
    pieces = [_pixels(geometry, box, scale) for geometry in objects]
    for piece in pieces:
        if piece is not None:
            window, inside = piece
            contested[window] |= seen[window] & inside
            seen[window] |= inside
    labels = np.zeros(shape_, dtype=np.int32)
    areas = [geometry.area for geometry in objects]
    for i in sorted(range(len(objects)), key=lambda i: (areas[i], i), reverse=True):  # the winner is drawn last
        if pieces[i] is not None:
            labels[pieces[i][0]][pieces[i][1]] = i + 1
    overlapping = hidden = 0
    for i, piece in enumerate(pieces):
        if piece is not None and piece[1].any():
            window, inside = piece
            overlapping += bool((contested[window] & inside).any())
            hidden += not (labels[window][inside] == i + 1).any()
    return Raster(labels, mask, overlapping, int(contested.sum()), hidden)


def _pixels(geometry: Any, box: tuple[int, int, int, int], scale: float) -> tuple[Window, np.ndarray] | None:
    """(window of the box, which of its pixels have their centre inside ``geometry``), over the geometry's bounds
    only (a pixel of margin against rounding); None where they miss the box."""
    y0, x0, y1, x1 = box
    gx0, gy0, gx1, gy1 = geometry.bounds
    # pixel c's centre is at level-0 x = (x0 + c + 0.5) / scale
    c0, c1 = max(0, math.floor(gx0 * scale - x0 - 0.5)), min(x1 - x0, math.ceil(gx1 * scale - x0 - 0.5) + 1)
    r0, r1 = max(0, math.floor(gy0 * scale - y0 - 0.5)), min(y1 - y0, math.ceil(gy1 * scale - y0 - 0.5) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    xs = (x0 + np.arange(c0, c1) + 0.5) / scale
    ys = (y0 + np.arange(r0, r1) + 0.5) / scale
    shapely.prepare(geometry)
    return (slice(r0, r1), slice(c0, c1)), shapely.contains_xy(geometry, xs[None, :], ys[:, None])


def _features(data: Any, source: str) -> list:
    """The features of a FeatureCollection, a bare array of Features or a single Feature."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection" and isinstance(data.get("features"), list):
            return data["features"]
        if str(kind).lower() == "feature":
            return [data]
        found = f"a GeoJSON {kind}" if isinstance(kind, str) and "coordinates" in data else "another JSON object"
    else:
        found = f"a JSON {type(data).__name__}"
    raise AnnotationError(
        f"{source}: not QuPath GeoJSON: expected a FeatureCollection, a Feature or an array of Features, "
        f"found {found} (export with File > Export objects as GeoJSON)"
    )


def _flatten(features: list) -> list:
    """Features followed by their ``childObjects`` (a QuPath hierarchy export nests children in properties)."""
    out = []
    for feature in features:
        out.append(feature)
        properties = feature.get("properties") if isinstance(feature, dict) else None
        if isinstance(properties, dict):
            children = properties.get("childObjects", properties.get("children"))
            if isinstance(children, list):
                out.extend(_flatten(children))
    return out


def _where(index: int, feature: Any) -> str:
    fid = feature.get("id") if isinstance(feature, dict) else None
    return f"feature {index} (id {' '.join(str(fid).split())})" if fid is not None else f"feature {index} (no id)"


def _object_type(feature: dict, properties: dict) -> str:
    """As QuPath reads it: objectType, else the older object_type or type, else a 0.2 id, else annotation."""
    for key in ("objectType", "object_type", "type"):
        if isinstance(properties.get(key), str):
            return properties[key]
    return LEGACY_TYPES.get(str(feature.get("id")), "annotation")


def _outline_of(kind: str, feature: dict, properties: dict) -> Any:
    """The GeoJSON geometry that outlines the object: a cell's nucleus where QuPath wrote one (its
    ``nucleusGeometry``, beside ``geometry`` or in the properties), since the model segments nuclei."""
    if kind == "cell":
        for holder in (feature, properties):
            if isinstance(holder.get("nucleusGeometry"), dict):
                return holder["nucleusGeometry"]
    return feature.get("geometry")


def _class_name(classification: Any) -> str | None:
    """The class as QuPath names it: derived classes joined with ': ' (e.g. 'Tumor: Positive')."""
    if isinstance(classification, str):
        return classification or None
    if not isinstance(classification, dict):
        return None
    if isinstance(classification.get("names"), list):
        return ": ".join(str(name) for name in classification["names"]) or None
    name = classification.get("name")
    name = str(name) if name not in (None, "") else None
    parent = _class_name(classification.get("parentClass"))  # before 0.4: the chain of parent classes
    return f"{parent}: {name}" if parent and name else name or parent


def _geometry(geometry: Any, where: str) -> Any:
    """The polygonal part of a GeoJSON geometry as 2-D shapely, or None for points and lines."""
    if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
        raise AnnotationError(f"{where} has no geometry")
    kind = geometry["type"]
    if kind in SKIPPED:
        return None
    if kind not in POLYGONAL:
        raise AnnotationError(f"{where} has a geometry of type {kind!r}, not a polygon, a point or a line")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN coordinates: reported below
            parsed = shapely.force_2d(shape(geometry))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, shapely.errors.ShapelyError) as e:
        raise AnnotationError(f"{where} has a malformed {kind}: {' '.join(str(e).split())}") from e
    if not np.isfinite(shapely.get_coordinates(parsed)).all():
        raise AnnotationError(f"{where} has non-finite coordinates (NaN or infinity)")
    polygonal = _polygonal(parsed)
    return None if polygonal.is_empty and not parsed.is_empty else polygonal


def _polygonal(geometry: Any) -> Any:
    """The Polygon or MultiPolygon made of the polygonal parts of ``geometry`` (empty if it has none)."""
    parts = [part for part in shapely.get_parts(geometry) if part.geom_type in ("Polygon", "MultiPolygon")]
    parts = [p for part in parts for p in shapely.get_parts(part)]
    if len(parts) == 1:
        return parts[0]
    return shapely.MultiPolygon(parts) if parts else shapely.Polygon()


def _role(kind: str, name: str | None, geometry: Any, rules: AnnotationRules) -> str | None:
    """'regions', 'ignored', 'objects' or None (not used) for a feature of object type ``kind`` and class ``name``."""

    def matches(patterns: tuple[str, ...]) -> bool:
        return name is not None and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    if kind == "annotation":
        if name is None:
            return "regions" if rules.rectangles_are_regions and _is_rectangle(geometry) else None
        if matches(rules.region_classes):
            return "regions"
        if matches(rules.ignore_classes):
            return "ignored"
        return "objects" if matches(rules.object_classes) else None
    if kind in ("detection", "cell"):
        return "objects" if not rules.object_classes or matches(rules.object_classes) else None
    return None


def _is_rectangle(geometry: Any) -> bool:
    """An axis-aligned rectangle of 4 corners, as QuPath's rectangle tool writes it."""
    if geometry.geom_type != "Polygon" or geometry.interiors or not geometry.is_valid:
        return False
    corners = shapely.get_coordinates(geometry.exterior)
    return len(corners) == 5 and len(set(corners[:4, 0])) == 2 and len(set(corners[:4, 1])) == 2
