"""pipelines.export: outlines of a real-looking inference output (the real fluorescence nuclei, mirrored 3 x 3
and offset so that many cross 256-pixel chunk seams) as RFC 7946 GeoJSON and as QuPath detections."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
import zarr
from skimage.measure import label as connected
from skimage.measure import regionprops

import pipelines.export as export_module
from pipelines.export import ExportError, cli, export
from pipelines.infer.output import OBJECTS, write_objects
from tests.helpers import ROOT, S3_BUCKET, objects
from unet import storage
from unet.outlines import outline, qupath_measurements
from unet.samples import fetch_samples

CHUNK = 256
PIXEL_UM = 0.5
OFFSET = (61, 37)  # puts the mosaic's tile borders, and the nuclei, off the chunk grid


def write_output(folder: Path, name: str, labels: np.ndarray, image: np.ndarray, pixel_um: float | None) -> Path:
    """An inference output as pipelines.infer writes it: probability "0", labels "labels/nuclei/0" (chunks
    CHUNK), NGFF metadata, and its objects table computed here independently with regionprops."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    path = folder / name
    probability = np.where(labels > 0, 160 + image // 3, image // 4).astype(np.uint8)  # bright nuclei, dim rest
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    root.create_array("0", data=probability[None], chunks=(1, CHUNK, CHUNK), dimension_names=("c", "y", "x"))
    root.create_array("labels/nuclei/0", data=labels.astype(np.int32), chunks=(CHUNK, CHUNK), dimension_names="yx")
    unit = {"unit": "micrometer"} if pixel_um else {}
    space = [{"name": n, "type": "space", **unit} for n in "yx"]
    scale = pixel_um or 1.0
    fmt = FormatV05()
    for group, axes, lead in ((root, [{"name": "c", "type": "channel"}, *space], [1.0]),
                              (root["labels"]["nuclei"], space, [])):  # fmt: skip
        datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [*lead, scale, scale]}]}]
        write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=group.basename or "probability")
    write_label_metadata(root["labels"], "nuclei", fmt=fmt, source={"image": "../../"})

    size = np.nan if pixel_um is None else pixel_um
    rows = []
    for region, means in zip(
        regionprops(labels, probability.astype(np.float64) / 255),
        regionprops(labels, image.astype(np.float64)),
        strict=True,
    ):
        (cy, cx), (y0, x0, y1, x1) = region.centroid, region.bbox
        rows.append({"id": region.label, "area": int(region.area), "centroid_y": cy, "centroid_x": cx,
                     "centroid_y_um": cy * size, "centroid_x_um": cx * size, "area_um2": region.area * size**2,
                     "bbox_y0": y0, "bbox_x0": x0, "bbox_y1": y1, "bbox_x1": x1,
                     "mean_probability": region.intensity_mean, "mean_intensity_0": means.intensity_mean})  # fmt: skip
    write_objects(str(path), pd.DataFrame(rows).sort_values("id"))
    return path


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    folder = fetch_samples(["fluo_nuclei"])["fluo_nuclei"]
    return tifffile.imread(folder / "labels" / "dsb2018_0.tif"), tifffile.imread(folder / "images" / "dsb2018_0.tif")


@pytest.fixture(scope="module")
def slide(sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1600 x 1573 pixels, ~1100 touching nuclei; ids unique, 4-connected and not consecutive."""
    labels, image = sample
    step = {0: slice(None), 1: slice(None, None, -1)}
    flips = [(step[i % 2], step[j % 2]) for i in range(3) for j in range(3)]
    tiles = [(labels[flip], image[flip]) for flip in flips]  # mirrored, so that no two neighbours are the same
    mosaic = np.zeros((3 * 512 + 64, 3 * 512 + 37), np.int64)
    pixels = np.zeros(mosaic.shape, np.uint16)
    for index, (tile, tile_image) in enumerate(tiles):
        y, x = OFFSET[0] + 512 * (index // 3), OFFSET[1] + 512 * (index % 3)
        mosaic[y : y + 512, x : x + 512] = np.where(tile > 0, tile + 1000 * index, 0)
        pixels[y : y + 512, x : x + 512] = tile_image
    # objects are 4-connected, as inference labels them; equal-valued regions, so touching nuclei stay apart
    relabelled = connected(mosaic, background=0, connectivity=1)
    ids = np.where(relabelled > 0, 3 * relabelled + 7, 0)  # ids need not be consecutive
    return write_output(tmp_path_factory.mktemp("out"), "slide.ome.zarr", ids, pixels, PIXEL_UM)


@pytest.fixture(scope="module")
def uncalibrated(sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample as it is (512 x 512), without a pixel size: the µm columns are null."""
    labels, image = sample
    return write_output(tmp_path_factory.mktemp("raw"), "raw.ome.zarr", connected(labels, connectivity=1), image, None)


@pytest.fixture(scope="module")
def table(slide: Path) -> pd.DataFrame:
    return pd.read_parquet(slide / OBJECTS)


@pytest.fixture(scope="module")
def stored_labels(slide: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(slide, mode="r")["labels/nuclei/0"])


@pytest.fixture(scope="module")
def exported(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {fmt: Path(export(slide, fmt, destination=folder / f"{fmt}.geojson")[0]) for fmt in ("geojson", "qupath")}


def features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def test_outputs_of_layout_1_export_the_same(slide, exported, tmp_path) -> None:
    """Outputs written before the table moved to tables/nuclei keep it as objects.parquet, beside a CYX label image."""
    old = tmp_path / "old.ome.zarr"
    shutil.copytree(slide, old)
    (old / OBJECTS).rename(old / "objects.parquet")
    shutil.rmtree(old / "tables")
    root = zarr.open_group(old, mode="r+")
    labels = np.asarray(root["labels/nuclei/0"])
    del root["labels/nuclei/0"]
    root.create_array("labels/nuclei/0", data=labels[None], chunks=(1, CHUNK, CHUNK))
    target, _ = export(old, "qupath", destination=tmp_path / "old.geojson")
    strip = lambda path: [{k: v for k, v in f.items() if k != "id"} for f in features(path)]  # noqa: E731 (UUIDs name the output)
    assert strip(Path(target)) == strip(exported["qupath"])


def test_geojson_is_valid_rfc7946(exported, table) -> None:
    text = exported["geojson"].read_text()
    collection = geojson.loads(text)
    assert collection["type"] == "FeatureCollection" and collection.is_valid, collection.errors()
    assert "crs" not in json.loads(text)
    assert [f["id"] for f in collection["features"]] != sorted(table["id"])  # ordered by chunk, not by id
    holes = 0
    for feature in collection["features"]:
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"  # 4-connected objects give one polygon each
        exterior, *interiors = geometry["coordinates"]
        holes += len(interiors)
        for ring in (exterior, *interiors):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(isinstance(v, int) for position in ring for v in position)  # pixel-edge grid points
        assert shapely.LinearRing(exterior).is_ccw
        assert not any(shapely.LinearRing(ring).is_ccw for ring in interiors)
        assert shapely.from_geojson(json.dumps(geometry)).is_valid
    row = table.set_index("id").loc[collection["features"][0]["id"]]
    assert collection["features"][0]["properties"]["area_um2"] == pytest.approx(row["area_um2"])


def test_outlines_rasterise_back_to_the_masks(exported, table, stored_labels) -> None:
    collection = features(exported["geojson"])
    assert sorted(f["id"] for f in collection) == sorted(table["id"])
    ious, seams = [], 0
    for feature in collection:
        props = feature["properties"]
        y0, x0, y1, x1 = (props[k] for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"))
        polygon = shapely.from_geojson(json.dumps(feature["geometry"]))
        assert polygon.bounds == (x0, y0, x1, y1)
        ys, xs = np.mgrid[y0:y1, x0:x1]
        inside = shapely.contains_xy(polygon, xs + 0.5, ys + 0.5)
        mask = stored_labels[y0:y1, x0:x1] == feature["id"]
        ious.append((inside & mask).sum() / (inside | mask).sum())
        assert polygon.area == props["area"] == mask.sum()
        seams += y0 // CHUNK != (y1 - 1) // CHUNK or x0 // CHUNK != (x1 - 1) // CHUNK
    assert min(ious) == 1.0  # pixel-edge outlines are exact
    assert seams > 50  # many objects cross chunk seams and come out whole


def test_a_second_export_is_byte_identical_and_nothing_is_overwritten(slide, exported, tmp_path) -> None:
    for fmt, first in exported.items():
        again, _ = export(slide, fmt, destination=tmp_path / f"again.{fmt}.geojson")
        assert Path(again).read_bytes() == first.read_bytes()
    before = exported["geojson"].read_bytes()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(slide, "geojson", min_area=400, destination=exported["geojson"])
    assert exported["geojson"].read_bytes() == before
    replaced, count = export(slide, "geojson", min_area=400, destination=tmp_path / "again.geojson.geojson",
                             overwrite=True)  # fmt: skip
    assert len(features(Path(replaced))) == count < len(features(exported["geojson"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.geojson.geojson", "again.qupath.geojson"]


def test_cli_writes_beside_the_output_by_default(slide, exported, capsys) -> None:
    assert cli([str(slide), "--format", "qupath"]) == 0
    default = slide.parent / "slide.qupath.geojson"
    assert capsys.readouterr().out.strip() == f"wrote {len(features(default))} objects to {default}"
    assert default.read_bytes() == exported["qupath"].read_bytes()  # the UUIDs follow the output's name only
    assert cli([str(slide), "--format", "qupath"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{default} already exists; pass --overwrite to replace it")
    default.unlink()


@pytest.mark.parametrize("fmt", ["geojson", "qupath"])
def test_min_area_drops_exactly_the_smaller_objects(slide, table, tmp_path, fmt) -> None:
    threshold = int(table["area"].median())
    path, count = export(slide, fmt, min_area=threshold, destination=tmp_path / "big.geojson")
    kept = features(Path(path))
    assert count == len(kept) == (table["area"] >= threshold).sum() < len(table)
    props = [f["properties"] for f in kept]
    areas = [p["area"] for p in props] if fmt == "geojson" else [p["measurements"]["Area px^2"] for p in props]
    assert min(areas) >= threshold
    assert export(slide, fmt, min_area=0, destination=tmp_path / "all.geojson")[1] == len(table)


def test_qupath_features_are_detections_with_measurements(exported, table) -> None:
    plain = {f["id"]: f for f in features(exported["geojson"])}
    detections = features(exported["qupath"])
    assert len(detections) == len(table)
    ids = [uuid.UUID(f["id"]) for f in detections]  # QuPath keeps ids that parse as UUIDs
    assert len(set(ids)) == len(ids)
    expected = {"Label id", "Area px^2", "Area µm^2", "Mean probability", "Mean intensity channel 0"}
    for feature in detections:
        assert feature["type"] == "Feature" and set(feature) == {"type", "id", "geometry", "properties"}
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["isLocked"] is False
        classification = props["classification"]  # QuPath reads a class from both "name" and "color"
        assert classification["name"] == "Nucleus" and len(classification["color"]) == 3
        measurements = props["measurements"]  # a JSON object of numbers, as QuPath 0.4+ writes it
        assert set(measurements) == expected and all(isinstance(v, int | float) for v in measurements.values())
        original = plain[measurements["Label id"]]
        assert feature["geometry"] == original["geometry"]
        assert measurements["Area µm^2"] == original["properties"]["area_um2"]
        assert 0 <= measurements["Mean probability"] <= 1
    assert geojson.loads(exported["qupath"].read_text()).is_valid


def test_unknown_pixel_size_leaves_micrometres_out(uncalibrated, tmp_path) -> None:
    path, _ = export(uncalibrated, "geojson", destination=tmp_path / "raw.geojson")
    props = features(Path(path))[0]["properties"]
    assert props["area_um2"] is None and props["centroid_x_um"] is None and props["area"] > 0
    path, _ = export(uncalibrated, "qupath", destination=tmp_path / "raw.qupath.geojson")
    measurements = features(Path(path))[0]["properties"]["measurements"]
    assert "Area µm^2" not in measurements and "Area px^2" in measurements
    assert "NaN" not in Path(path).read_text()


def test_label_windows_stay_within_a_chunk_and_its_objects(slide, table, stored_labels, tmp_path, monkeypatch):
    """Memory is bounded: each read is one chunk's window, at most a chunk plus the largest object per side."""
    reads = []
    original = export_module.read_window

    def recording(labels, y0, y1, x0, x1):
        reads.append((y0, y1, x0, x1))
        return original(labels, y0, y1, x0, x1)

    monkeypatch.setattr(export_module, "read_window", recording)
    export(slide, "geojson", destination=tmp_path / "windows.geojson")
    height = (table["bbox_y1"] - table["bbox_y0"]).max()
    width = (table["bbox_x1"] - table["bbox_x0"]).max()
    grid = -(-stored_labels.shape[0] // CHUNK) * -(-stored_labels.shape[1] // CHUNK)
    assert len(reads) == len(set(reads)) <= grid  # each chunk's window once, read ahead in threads
    for y0, y1, x0, x1 in reads:
        assert y0 % CHUNK == 0 and x0 % CHUNK == 0
        assert y1 - y0 <= CHUNK + height and x1 - x0 <= CHUNK + width
    assert max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in reads) < stored_labels.size / 10


def test_not_an_output_is_one_line_in_a_subprocess(tmp_path) -> None:
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3).create_array("0", shape=(4, 4), dtype="u1")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.export", str(tmp_path / "plain.zarr")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an inference output" in lines[0], result.stderr
    assert not list(tmp_path.glob("*.geojson"))


def test_user_errors_are_one_line(slide, uncalibrated, tmp_path, capsys) -> None:
    (tmp_path / "plain.txt").write_text("a file where a folder would be")
    no_table = tmp_path / "old.ome.zarr"
    zarr.open_group(no_table, mode="w", zarr_format=3).create_array("labels/nuclei/0", shape=(1, 8, 8), dtype="i4")
    cases = {
        (str(no_table),): "has no objects table (tables/nuclei/table.parquet, written by newer versions",
        (str(tmp_path / "missing.ome.zarr"),): "not found",
        (str(slide), "--format", "shapefile"): "unknown format 'shapefile'; choose one of geojson, qupath",
        (str(slide), "--min-area", "-1"): "--min-area must be 0 or more pixels, not -1",
        (): "give the inference output",
        (str(slide), "--output", str(tmp_path / "plain.txt" / "x.geojson")): "cannot write",
    }
    for args, message in cases.items():
        assert cli(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
    assert not list(tmp_path.glob("*.geojson")) and not list(slide.parent.glob("*.geojson"))


def test_outline_matches_a_union_of_pixel_boxes() -> None:
    """Random masks (holes, pixels touching only at corners, several parts) against shapely's own union."""
    rng = np.random.default_rng(0)
    masks = [rng.random((rng.integers(1, 12), rng.integers(1, 12))) < rng.uniform(0.3, 0.8) for _ in range(400)]
    hole = [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    pinched = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]  # a hole meeting the outside at a corner
    masks += [np.eye(3, dtype=bool), np.array(hole, bool), np.array(pinched, bool)]
    for mask in masks:
        if not mask.any():
            assert outline(mask) is None
            continue
        geometry = outline(mask, 5, 7)
        rows, cols = np.nonzero(mask)
        union = shapely.union_all(shapely.box(cols + 7, rows + 5, cols + 8, rows + 6))
        assert geometry.is_valid and geometry.equals(union) and geometry.area == mask.sum()
        assert shapely.get_num_coordinates(shapely.simplify(geometry, 0)) == shapely.get_num_coordinates(geometry)
        assert geometry.geom_type == ("Polygon" if connected(mask, connectivity=1).max() == 1 else "MultiPolygon")
        ys, xs = np.mgrid[5 : 5 + mask.shape[0], 7 : 7 + mask.shape[1]]
        assert (shapely.contains_xy(geometry, xs + 0.5, ys + 0.5) == mask).all()
        for polygon in getattr(geometry, "geoms", [geometry]):
            assert polygon.exterior.is_ccw and not any(ring.is_ccw for ring in polygon.interiors)
    square = outline(np.ones((2, 3), bool))
    assert len(square.exterior.coords) == 5 and square.bounds == (0, 0, 3, 2)  # no collinear vertices


def test_qupath_measurements_leave_nulls_out() -> None:
    row = {"id": 3, "area": 10, "area_um2": None, "centroid_x": 1.5, "mean_probability": 0.5, "mean_intensity_2": 7.0}
    assert qupath_measurements(row) == {"Label id": 3, "Area px^2": 10, "Mean probability": 0.5,
                                        "Mean intensity channel 2": 7.0}  # fmt: skip


def test_windows_are_read_ahead_in_order_and_boundedly(monkeypatch) -> None:
    """Reads overlap with outlining (object stores answer slowly), yet come back in order, a few at a time."""
    started, consumed = [], []

    def slow_read(labels, y0, y1, x0, x1):
        started.append(y0)
        time.sleep(0.002 * (y0 % 3))  # out-of-order completion
        return np.full((y1 - y0, x1 - x0), y0)

    monkeypatch.setattr(export_module, "read_window", slow_read)
    plans = (((y, y + 2, 0, 3), np.array([y])) for y in range(40))
    for (window, rows), pixels in export_module.prefetched(None, plans, ahead=3):
        assert len(started) - len(consumed) <= 4  # the one being used and three ahead
        assert pixels.shape == (2, 3) and (pixels == window[0]).all() and rows[0] == window[0]
        consumed.append(window[0])
    assert consumed == list(range(40))


def test_an_output_on_object_storage(slide, exported, s3) -> None:
    """s3:// in, the default file beside it on S3 out (uploaded only when complete), the same bytes as locally."""
    fs, _ = storage.filesystem(s3)
    fs.put(str(slide), f"{S3_BUCKET}/outs/slide.ome.zarr", recursive=True)
    target, count = export(f"{s3}/outs/slide.ome.zarr", "qupath")
    assert target == f"{s3}/outs/slide.qupath.geojson" and count == len(features(exported["qupath"]))
    assert fs.cat(target.removeprefix("s3://")) == exported["qupath"].read_bytes()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(f"{s3}/outs/slide.ome.zarr", "qupath")
    assert [key for key in objects(f"{s3}/outs") if not key.startswith("slide.ome.zarr/")] == ["slide.qupath.geojson"]
