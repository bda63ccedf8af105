"""Outlines of labelled objects as polygons along pixel edges, and the GeoJSON features that carry them.

A pixel (row r, column c) is the square [c, c + 1] x [r, r + 1] in (x, y), so an outline's vertices are
integer grid points and re-rasterising it (pixel centres inside) gives back exactly the object's mask.
Polygons follow RFC 7946's right-hand rule as numbers: exterior rings counterclockwise, holes clockwise
(in an image, where y grows downwards, that looks clockwise on screen; GeoJSON readers go by the numbers).

``outline`` turns a mask into a shapely (Multi)Polygon; ``geojson_feature`` and ``qupath_feature`` build the
features of one object from its outline and its row of the objects table (``unet.objects``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

# QuPath object ids are UUIDs; deriving them from this fixed namespace, the output's name and the label id
# makes a re-export byte-identical and lets the same object keep its id across exports.
QUPATH_NAMESPACE = uuid.UUID("6dbde65b-483f-48a1-bdec-5d1b34f04c9e")
QUPATH_CLASS = {"name": "Nucleus", "color": [0, 160, 255]}  # QuPath reads a class as a proxy only with both
# objects-table column -> QuPath measurement name; centroids and bounding boxes are left out because QuPath
# derives them from the outline itself
QUPATH_MEASUREMENTS = {
    "id": "Label id",  # to join QuPath's measurements back to the objects table
    "area": "Area px^2",
    "area_um2": "Area µm^2",
    "mean_probability": "Mean probability",
}
INTENSITY_PREFIX = "mean_intensity_"


def outline(mask: np.ndarray, y0: int = 0, x0: int = 0) -> Polygon | MultiPolygon | None:
    """The outline of the True pixels of a YX ``mask`` whose top-left pixel is (``y0``, ``x0``) in the slide.

    A Polygon (with holes as interior rings) for a 4-connected object, a MultiPolygon if its pixels form
    several 4-connected parts, None for an empty mask. Oriented per RFC 7946, no collinear vertices.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    # The boundary is made of the unit pixel edges between an object pixel and a non-object one. Joined
    # into maximal straight segments, shapely.polygonize assembles them into rings and faces: about twice
    # as fast as a union of per-row boxes (shapely.union_all), and without its collinear vertices.
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    horizontal = padded[1:, 1:-1] != padded[:-1, 1:-1]  # (h + 1, w): edge y = r, x in [c, c + 1]
    vertical = padded[1:-1, 1:] != padded[1:-1, :-1]  # (h, w + 1): edge x = c, y in [r, r + 1]
    # At a grid point where the object's pixels meet only diagonally, four edges cross; polygonize needs
    # the segments noded there, so segments stop at such points rather than run through them.
    nw, ne, sw, se = padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    crossing = (nw == se) & (ne == sw) & (nw != ne)  # (h + 1, w + 1)
    rows, starts, stops = _runs(horizontal, crossing)
    cols, tops, bottoms = _runs(vertical.T, crossing.T)
    segments = np.empty((len(rows) + len(cols), 2, 2), dtype=np.float64)
    n = len(rows)
    segments[:n, 0, 0], segments[:n, 1, 0], segments[:n, :, 1] = starts, stops, rows[:, None]
    segments[n:, :, 0], segments[n:, 0, 1], segments[n:, 1, 1] = cols[:, None], tops, bottoms
    segments[..., 0] += x0
    segments[..., 1] += y0
    faces = shapely.get_parts(shapely.polygonize(shapely.linestrings(segments)))
    if len(faces) > 1:
        # polygonize also returns every hole as a face of its own: keep the faces whose inside is object
        points = shapely.get_coordinates(shapely.point_on_surface(faces))
        inside = mask[np.floor(points[:, 1]).astype(int) - y0, np.floor(points[:, 0]).astype(int) - x0]
        faces = faces[inside]
    # several object faces: parts touching at a corner, or a ring pinched at one; union_all sorts them out
    geometry = faces[0] if len(faces) == 1 else shapely.union_all(faces)
    return shapely.orient_polygons(geometry, exterior_cw=False)


def _runs(edges: np.ndarray, breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of True along the rows of ``edges`` (n, m), split where ``breaks`` (n, m + 1) is True at
    the grid point between two edges: (row, first grid point, last grid point) per run, in row-major order."""
    joined = np.zeros((edges.shape[0], edges.shape[1] + 1), dtype=bool)  # edges c - 1 and c form one segment
    joined[:, 1:-1] = edges[:, 1:] & edges[:, :-1] & ~breaks[:, 1:-1]
    row, start = np.nonzero(edges & ~joined[:, :-1])
    _, last = np.nonzero(edges & ~joined[:, 1:])
    return row, start, last + 1


def geometry_json(geometry: Polygon | MultiPolygon) -> dict[str, Any]:
    """A GeoJSON geometry object (Polygon or MultiPolygon); integral coordinates are written as integers."""
    if isinstance(geometry, Polygon):
        return {"type": "Polygon", "coordinates": _rings(geometry)}
    return {"type": "MultiPolygon", "coordinates": [_rings(part) for part in geometry.geoms]}


def _rings(polygon: Polygon) -> list[list[list[float]]]:
    return [_positions(polygon.exterior), *(_positions(ring) for ring in polygon.interiors)]


def _positions(ring: shapely.LinearRing) -> list[list[float]]:
    coords = shapely.get_coordinates(ring)
    integral = coords.astype(np.int64)
    return integral.tolist() if (integral == coords).all() else coords.tolist()  # "12" rather than "12.0"


def geojson_feature(geometry: Polygon | MultiPolygon, row: Mapping[str, Any]) -> dict[str, Any]:
    """A plain GeoJSON Feature: the label id as its id and the object's table row as its properties."""
    return {"type": "Feature", "id": row["id"], "geometry": geometry_json(geometry), "properties": dict(row)}


def qupath_feature(geometry: Polygon | MultiPolygon, row: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A Feature that QuPath (0.4 and later) imports as a detection of class Nucleus, with measurements.

    ``source`` (the inference output's name) goes into the object's UUID with the label id.
    """
    return {
        "type": "Feature",
        "id": object_uuid(source, row["id"]),
        "geometry": geometry_json(geometry),
        "properties": {
            "objectType": "detection",
            "classification": QUPATH_CLASS,
            "isLocked": False,
            "measurements": qupath_measurements(row),
        },
    }


def object_uuid(source: str, label: int) -> str:
    """The deterministic UUID of object ``label`` of the output named ``source``."""
    return str(uuid.uuid5(QUPATH_NAMESPACE, f"{source}/{int(label)}"))


def qupath_measurements(row: Mapping[str, Any]) -> dict[str, float]:
    """QuPath measurement names and values of a table row; null values are left out (QuPath wants numbers)."""
    measurements = {}
    for column, value in row.items():
        if column.startswith(INTENSITY_PREFIX):
            name = f"Mean intensity channel {column.removeprefix(INTENSITY_PREFIX)}"
        else:
            name = QUPATH_MEASUREMENTS.get(column)
        if name is not None and value is not None:
            measurements[name] = value
    return measurements
