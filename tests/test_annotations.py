"""QuPath GeoJSON annotations to training labels (unet.annotations): exact round trips of our own export through
QuPath-style edits, the file shapes QuPath writes, and the rules for regions, ignore areas and overlaps."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile

from unet.annotations import (
    AnnotationError,
    AnnotationRules,
    check_inside,
    objects_in,
    rasterise,
    read_annotations,
)
from unet.outlines import outline, qupath_feature
from unet.samples import fetch_samples, sample_pairs

# The feature shapes below copy what QuPath writes (qupath-core QuPathTypeAdapters.PathObjectTypeAdapter.write and
# GsonTools.PathClassTypeAdapter, https://github.com/qupath/qupath/tree/main/qupath-core/src/main/java/qupath/lib/io):
# "type", "id" (a UUID since 0.4), "geometry", then "properties" with "objectType", "classification" as
# {"name", "color": [r, g, b]} (before 0.4: {"name", "colorRGB": int}), "isLocked" only when locked, "measurements".


def feature(geometry: dict, properties: dict, fid: str | None = None) -> dict:
    return {"type": "Feature", "id": fid or str(uuid.uuid4()), "geometry": geometry, "properties": properties}


def qupath_annotation(geometry: dict, name: str | None = None) -> dict:
    """An annotation as QuPath 0.4+ exports it (File > Export objects as GeoJSON)."""
    properties: dict = {"objectType": "annotation"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [0, 0, 180]}
    return feature(geometry, properties)


def polygon(x0: float, y0: float, x1: float, y1: float) -> dict:
    """A rectangle as QuPath's rectangle tool writes it: 4 corners, closed, clockwise on screen."""
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def nucleus(geometry: shapely.Geometry, label: int = 1) -> dict:
    """An object exactly as ``pipelines.export --format qupath`` writes it."""
    return qupath_feature(geometry, {"id": label, "area": float(geometry.area)}, "sample")


def write(folder: Path, data: object, name: str = "objects.geojson") -> Path:
    path = folder / name
    path.write_text(json.dumps(data, indent=2))  # QuPath's "Pretty JSON"
    return path


def assert_same_partition(expected: np.ndarray, labels: np.ndarray) -> None:
    """The same objects pixel for pixel, ids matched by a bijection."""
    assert expected.shape == labels.shape
    np.testing.assert_array_equal(expected == 0, labels == 0)
    pairs = set(zip(expected.ravel().tolist(), labels.ravel().tolist(), strict=True))
    assert len(pairs) == len(np.unique(expected)) == len(np.unique(labels))


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, dict[int, shapely.Geometry]]:
    """Real H&E nuclei (65 objects, touching ones among them) and their outlines, as our exporter draws them."""
    pairs = sample_pairs(fetch_samples(["he_nuclei"])["he_nuclei"])
    labels = tifffile.imread(next(lab for _, lab in pairs if lab.name == "crop08.tif")).astype(np.int64)
    return labels, {int(i): outline(labels == i) for i in np.unique(labels)[1:]}


def polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygons of an overlay's result (a cut can leave line bits where the outline runs along it)."""
    parts = [part for part in shapely.get_parts(geometry) if part.geom_type == "Polygon"]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def touching_pair(labels: np.ndarray) -> tuple[int, int]:
    a, b = labels[:, :-1], labels[:, 1:]
    touching = (a != b) & (a > 0) & (b > 0)
    return int(a[touching][0]), int(b[touching][0])


def background_window(labels: np.ndarray, height: int, width: int) -> tuple[int, int]:
    windows = np.lib.stride_tricks.sliding_window_view(labels == 0, (height, width)).all(axis=(2, 3))
    y, x = np.argwhere(windows)[0]
    return int(y), int(x)


EDITS = ["none", "delete", "merge", "merge_apart", "split", "draw", "reclass"]


@pytest.mark.parametrize("to_level0", [1.0, 2.0])
@pytest.mark.parametrize("edit", EDITS)
def test_our_export_edited_as_in_qupath_rasterises_to_the_edited_labels(sample, tmp_path, edit, to_level0) -> None:
    labels, outlines = sample
    expected, geometries = labels.copy(), dict(outlines)
    classes = dict.fromkeys(geometries, "Nucleus")
    a, b = touching_pair(labels)
    new = int(labels.max()) + 1
    if edit == "delete":
        del geometries[a]
        expected[expected == a] = 0
    elif edit == "merge":  # QuPath: select both, Objects > Annotations... > Merge selected
        geometries[a] = shapely.union(geometries.pop(a), geometries.pop(b))
        assert geometries[a].geom_type == "Polygon"  # they share pixel edges
        expected[expected == b] = a
    elif edit == "merge_apart":  # two objects far apart become one MultiPolygon object
        far = max(geometries, key=lambda k: shapely.distance(geometries[k], outlines[a]))
        geometries[a] = shapely.union(geometries.pop(a), geometries.pop(far))
        assert geometries[a].geom_type == "MultiPolygon"
        expected[expected == far] = a
    elif edit == "split":  # a straight vertical cut along a pixel edge through the largest object
        k = max(geometries, key=lambda k: geometries[k].area)
        x0, y0, x1, y1 = geometries[k].bounds
        cut = int((x0 + x1) // 2)
        whole = geometries.pop(k)
        geometries[k] = polygonal(shapely.intersection(whole, shapely.box(x0 - 1, y0 - 1, cut, y1 + 1)))
        geometries[new] = polygonal(shapely.intersection(whole, shapely.box(cut, y0 - 1, x1 + 1, y1 + 1)))
        expected[:, cut:][expected[:, cut:] == k] = new
    elif edit == "draw":  # a pixel-aligned rectangle and a diamond, drawn over background
        wy, wx = background_window(labels, 16, 32)
        geometries[new] = shapely.box(wx + 1, wy + 2, wx + 9, wy + 12)
        expected[wy + 2 : wy + 12, wx + 1 : wx + 9] = new
        cx, cy, r = wx + 23.3, wy + 8.2, 6.35
        geometries[new + 1] = shapely.Polygon([(cx - r, cy), (cx, cy - r), (cx + r, cy), (cx, cy + r)])
        rows, cols = np.mgrid[: labels.shape[0], : labels.shape[1]]
        distance = np.abs(cols + 0.5 - cx) + np.abs(rows + 0.5 - cy)  # pixel centres inside the diamond
        assert np.abs(distance - r).min() > 1e-6  # no centre on its edge
        expected[distance < r] = new + 1
    elif edit == "reclass":  # Nucleus -> Other: no longer an object
        classes[a] = "Other"
        expected[expected == a] = 0
    features = []
    for k, geometry in geometries.items():
        feature = nucleus(shapely.transform(geometry, lambda points: points * to_level0), k)
        if classes.get(k, "Nucleus") != "Nucleus":
            feature["properties"]["classification"] = {"name": classes[k], "color": [200, 0, 0]}
        features.append(feature)
    height, width = labels.shape
    features.append(qupath_annotation(polygon(0, 0, width * to_level0, height * to_level0), "Region*"))
    annotations = read_annotations(write(tmp_path, {"type": "FeatureCollection", "features": features}))
    assert annotations.counts["regions"] == 1 and annotations.counts["repaired"] == 0
    assert annotations.counts["skipped_class"] == (edit == "reclass")
    check_inside(annotations, int(height * to_level0), int(width * to_level0))
    raster = rasterise(annotations, annotations.regions[0], (0, 0, height, width), 1 / to_level0)
    assert raster.labels.dtype == np.int32 and raster.mask.all()
    assert (raster.overlapping, raster.contested_pixels, raster.hidden) == (0, 0, 0)
    assert_same_partition(expected, raster.labels)
    if edit == "none":  # a window of the slide gives the same labels as the whole, cropped
        window = rasterise(annotations, annotations.regions[0], (40, 70, 200, 256), 1 / to_level0)
        np.testing.assert_array_equal(window.labels > 0, raster.labels[40:200, 70:256] > 0)
        assert_same_partition(raster.labels[40:200, 70:256], window.labels)


def test_a_feature_collection_a_bare_array_and_one_feature_read_alike(tmp_path) -> None:
    features = [qupath_annotation(polygon(0, 0, 40, 30), "Region*"), nucleus(shapely.box(2, 3, 8, 9))]
    collection = read_annotations(write(tmp_path, {"type": "FeatureCollection", "features": features}, "a.json"))
    array = read_annotations(write(tmp_path, features, "b.json"))  # exportObjectsToGeoJson without FEATURE_COLLECTION
    assert collection.counts == array.counts and collection.counts["objects"] == 1
    assert [g.wkt for g in collection.objects] == [g.wkt for g in array.objects]
    single = read_annotations(write(tmp_path, features[1], "c.json"))
    assert single.counts["objects"] == 1 and single.regions == [] and single.objects[0].equals(shapely.box(2, 3, 8, 9))


def test_classifications_of_every_qupath_version(tmp_path) -> None:
    rules = AnnotationRules(object_classes=("Tumor: Positive", "Nucleus"))
    legacy_class = {"name": "Positive", "colorRGB": -3670016, "parentClass": {"name": "Tumor", "colorRGB": -3670016}}
    features = [
        qupath_annotation(polygon(0, 0, 50, 50), "Region*"),  # 0.4+: name and color
        feature(
            polygon(60, 0, 90, 20),
            {"classification": {"name": "Training area", "colorRGB": -16711165}},
            "PathAnnotationObject",
        ),  # 0.2: the type as id
        feature(
            polygon(1, 1, 5, 5),
            {"objectType": "detection", "classification": {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}},
        ),
        feature(
            polygon(10, 10, 15, 15), {"classification": legacy_class}, "PathDetectionObject"
        ),  # the same before 0.4
        feature(polygon(20, 20, 24, 24), {"objectType": "cell", "classification": "Nucleus", "isLocked": True}),
        feature(polygon(30, 30, 34, 34), {"objectType": "detection"}),  # unclassified
        qupath_annotation(polygon(40, 40, 44, 44), "Tumor"),
    ]
    annotations = read_annotations(write(tmp_path, {"type": "FeatureCollection", "features": features}), rules)
    assert (len(annotations.regions), len(annotations.objects), annotations.counts["skipped_class"]) == (2, 3, 2)
    every_detection = read_annotations(tmp_path / "objects.geojson", AnnotationRules(object_classes=()))
    assert every_detection.counts["objects"] == 4  # every detection and cell, classified or not


def test_a_multipolygon_with_a_hole_is_one_object_without_its_hole(tmp_path) -> None:
    holed = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(3, 3), (3, 6), (6, 6), (6, 3)]])
    geometry = shapely.MultiPolygon([holed, shapely.box(20, 2, 25, 7)])
    path = write(tmp_path, [qupath_annotation(polygon(0, 0, 30, 12), "Region*"), nucleus(geometry)])
    annotations = read_annotations(path)
    raster = rasterise(annotations, annotations.regions[0], (0, 0, 12, 30), 1.0)
    expected = np.zeros((12, 30), dtype=np.int32)
    expected[:10, :10], expected[3:6, 3:6], expected[2:7, 20:25] = 1, 0, 1
    np.testing.assert_array_equal(raster.labels, expected)


def test_an_unclassified_rectangle_is_a_region_other_unclassified_shapes_are_not(tmp_path) -> None:
    diamond = {"type": "Polygon", "coordinates": [[[50, 0], [60, 10], [50, 20], [40, 10], [50, 0]]]}
    path = write(tmp_path, [qupath_annotation(polygon(0, 0, 30, 20)), qupath_annotation(diamond)])
    annotations = read_annotations(path)
    assert len(annotations.regions) == 1 and annotations.regions[0].equals(shapely.box(0, 0, 30, 20))
    assert annotations.counts["skipped_class"] == 1
    assert read_annotations(path, AnnotationRules(rectangles_are_regions=False)).counts["skipped_class"] == 2


def test_an_ignore_annotation_clears_the_mask_inside_the_region(tmp_path) -> None:
    features = [
        qupath_annotation(polygon(2, 2, 20, 20), "Region*"),
        qupath_annotation(polygon(5, 5, 10, 30), "Ignore*"),
    ]
    annotations = read_annotations(write(tmp_path, features))
    raster = rasterise(annotations, annotations.regions[0], (0, 0, 24, 24), 1.0)
    expected = np.zeros((24, 24), dtype=bool)
    expected[2:20, 2:20] = True
    expected[5:24, 5:10] = False
    np.testing.assert_array_equal(raster.mask, expected)
    assert annotations.counts["ignored"] == 1


def test_a_self_intersecting_object_is_repaired_and_counted(tmp_path) -> None:
    bow_tie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    features = [qupath_annotation(polygon(0, 0, 10, 10), "Region*"), qupath_annotation(bow_tie, "Nucleus")]
    annotations = read_annotations(write(tmp_path, features))
    assert annotations.counts["repaired"] == 1 and annotations.objects[0].area == pytest.approx(50)
    raster = rasterise(annotations, annotations.regions[0], (0, 0, 10, 10), 1.0)
    y, x = np.mgrid[:10, :10] + 0.5
    np.testing.assert_array_equal(raster.labels > 0, (x < np.minimum(y, 10 - y)) | (x > np.maximum(y, 10 - y)))


def test_a_region_of_zero_area_is_an_error(tmp_path) -> None:
    flat = {"type": "Polygon", "coordinates": [[[0, 5], [10, 5], [20, 5], [0, 5]]]}
    feature = qupath_annotation(flat, "Region*")
    path = write(tmp_path, [nucleus(shapely.box(0, 0, 2, 2)), feature])
    with pytest.raises(AnnotationError, match=rf"objects\.geojson: region 1 \(id {feature['id']}\) is empty") as e:
        read_annotations(path)
    assert "\n" not in str(e.value)


def test_a_polygon_outside_the_slide_is_an_error(tmp_path) -> None:
    outside = nucleus(shapely.box(95, 10, 105, 20))
    annotations = read_annotations(write(tmp_path, [qupath_annotation(polygon(0, 0, 100, 50), "Region*"), outside]))
    check_inside(annotations, 50, 110)
    with pytest.raises(AnnotationError, match=rf"object \(feature 1 \(id {outside['id']}\)\).*100 x 50 px") as e:
        check_inside(annotations, 50, 100)
    assert "x 95..105" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AnnotationError, match="region"):
        check_inside(annotations, 40, 110)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<xml/>", "not a JSON file"),
        ('{"annotations": []}', "not QuPath GeoJSON.*another JSON object"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}', "found a GeoJSON Polygon"),
        ("[1, 2]", r"feature 0 \(no id\) is not a GeoJSON Feature"),
        ('[{"type": "Feature", "id": "a", "geometry": null, "properties": {}}]', r"feature 0 \(id a\) has no geometry"),
        ('[{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 1]}}]', "type 'Circle'"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}}]', "malformed"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, NaN], [1, 1], [0, 0]]]},'
            ' "properties": {"classification": {"name": "Region*"}}}]',
            "non-finite",
        ),
    ],
)
def test_files_that_are_not_qupath_objects_are_one_line_errors(tmp_path, text, message) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message) as e:
        read_annotations(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_points_and_lines_are_skipped_and_counted(tmp_path) -> None:
    features = [
        qupath_annotation({"type": "Point", "coordinates": [3, 4]}, "Nucleus"),
        qupath_annotation({"type": "MultiPoint", "coordinates": [[3, 4], [5, 6]]}, "Nucleus"),
        qupath_annotation({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Region*"),
        nucleus(shapely.box(1, 1, 3, 3)),
    ]
    annotations = read_annotations(write(tmp_path, features))
    assert annotations.counts["skipped_geometry"] == 3 and annotations.counts["objects"] == 1
    assert annotations.counts["features"] == 4


def test_overlaps_go_to_the_smaller_object_whatever_the_file_order(tmp_path) -> None:
    big, small, twin = shapely.box(0, 0, 20, 20), shapely.box(5, 5, 10, 10), shapely.box(30, 0, 36, 6)
    left, right = shapely.box(40, 0, 46, 6), shapely.box(43, 0, 49, 6)  # equal areas, overlapping
    features = [nucleus(g, i) for i, g in enumerate([big, small, twin, twin, left, right])]
    features.append(qupath_annotation(polygon(0, 0, 50, 20), "Region*"))
    rasters = []
    for seed in range(3):
        random.Random(seed).shuffle(features)
        annotations = read_annotations(write(tmp_path, features, f"{seed}.geojson"))
        rasters.append(rasterise(annotations, annotations.regions[0], (0, 0, 20, 50), 1.0))
    for raster in rasters[1:]:
        np.testing.assert_array_equal(raster.labels, rasters[0].labels)
    raster, labels = rasters[0], rasters[0].labels
    assert labels[7, 7] != labels[2, 2] and (labels[5:10, 5:10] == labels[7, 7]).all()  # the small one wins
    assert (labels[:20, :20] == labels[2, 2]).sum() == 400 - 25
    assert (labels[:, 40:49] > 0).sum() == 54 and len(np.unique(labels[:6, 40:49])) == 2  # a tie: one of the two
    assert (raster.overlapping, raster.contested_pixels, raster.hidden) == (6, 25 + 36 + 18, 1)  # a twin is hidden
    assert len(np.unique(labels)) == 1 + 5


def test_objects_in_a_region_are_drawn_whole(tmp_path) -> None:
    inside, straddling = shapely.box(2, 2, 6, 6), shapely.box(8, 3, 14, 7)
    outside, touching = shapely.box(20, 0, 24, 4), shapely.box(10, 10, 14, 14)  # touching: shares the region's corner
    region = qupath_annotation(polygon(0, 0, 10, 10), "Region*")
    features = [nucleus(g) for g in (inside, straddling, outside, touching)] + [region]
    annotations = read_annotations(write(tmp_path, features))
    found = objects_in(annotations, annotations.regions[0])
    assert sorted(g.bounds for g in found) == [inside.bounds, straddling.bounds]
    raster = rasterise(annotations, annotations.regions[0], (0, 0, 16, 26), 1.0)
    assert (raster.labels[3:7, 8:14] > 0).all() and (raster.labels > 0).sum() == 16 + 24  # also outside the region
    assert raster.mask.sum() == 100 and not raster.mask[3:7, 10:14].any()


def test_a_cell_gives_its_nucleus_where_qupath_wrote_one(tmp_path: Path) -> None:
    """QuPath's cell detection writes the cell outline as ``geometry`` and the nucleus as ``nucleusGeometry``: the
    nucleus is what trains a nucleus model; a cell without one gives its outline."""
    cell = feature(polygon(0, 0, 40, 40), {"objectType": "cell", "classification": {"name": "Nucleus"}})
    cell["nucleusGeometry"] = polygon(10, 10, 20, 20)
    inner = feature(polygon(50, 50, 90, 90), {"objectType": "cell", "classification": {"name": "Nucleus"},
                                             "nucleusGeometry": polygon(60, 60, 70, 70)})  # fmt: skip
    bare = feature(polygon(100, 100, 120, 120), {"objectType": "cell", "classification": {"name": "Nucleus"}})
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [cell, inner, bare]}))
    areas = sorted(geometry.area for geometry in read_annotations(path).objects)
    assert areas == [100.0, 100.0, 400.0]
