"""What an inference output gives people to open and use, on the real slide: multiscale levels that
OME-Zarr readers open, each the stated downsampling of level 0, an objects table that agrees with
``skimage.measure.regionprops`` on the whole label image, seam objects included, and outlines exported as
RFC 7946 GeoJSON that rasterise back to the labels."""

from __future__ import annotations

import json
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import pytest
import shapely
import zarr
from mlflow.tracking import MlflowClient
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from skimage.measure import regionprops

from pipelines.export import export
from pipelines.infer.output import OBJECTS
from tests.test_infer import infer
from unet.slides import open_slide

pytestmark = pytest.mark.slow
CHUNK = 512


@pytest.fixture(scope="module")
def segmented(trained_model_dir, cmu_ome_zarr, tmp_path_factory) -> Path:
    """The real slide (2967 x 2220, 0.499 um/px) segmented with 512-pixel chunks."""
    folder = tmp_path_factory.mktemp("results")
    output = folder / "cmu.ome.zarr"
    assert infer(folder, trained_model_dir, cmu_ome_zarr, output, f"infer.chunk_size={CHUNK}") == 0
    return output


def mean_of_blocks(level: np.ndarray) -> np.ndarray:
    """2x2 block means, the blocks at an odd edge holding the pixels that exist (reduceat: no padding)."""
    rows, cols = np.arange(0, level.shape[0], 2), np.arange(0, level.shape[1], 2)
    total = np.add.reduceat(np.add.reduceat(level.astype(np.float64), rows, axis=0), cols, axis=1)
    count = np.add.reduceat(np.add.reduceat(np.ones(level.shape), rows, axis=0), cols, axis=1)
    return total / count


def test_pyramid_levels_open_in_ome_zarr_and_follow_the_stated_rule(segmented: Path) -> None:
    nodes = list(Reader(parse_url(str(segmented)))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs) and n.zarr.path == str(segmented))
    labels = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    shapes = [tuple(level.shape) for level in image.data]
    # halved (rounding up) down to one chunk: 2967 x 2220 -> 1484 x 1110 -> 742 x 555 -> 371 x 278
    assert shapes == [(1, 2967, 2220), (1, 1484, 1110), (1, 742, 555), (1, 371, 278)]
    assert [(1, *level.shape) for level in labels.data] == shapes  # a label image has no channel axis
    probability0, labels0 = np.asarray(image.data[0])[0], np.asarray(labels.data[0])
    previous = probability0
    for level in range(1, len(shapes)):
        # probability: each level the rounded 2x2 mean of the one above; labels: every 2**level-th pixel of level 0
        stored = np.asarray(image.data[level])[0]
        np.testing.assert_array_equal(stored, np.round(mean_of_blocks(previous)).astype(np.uint8))
        np.testing.assert_array_equal(np.asarray(labels.data[level]), labels0[:: 2**level, :: 2**level])
        previous = stored
    assert set(np.unique(np.asarray(labels.data[3]))) <= set(np.unique(labels0))  # ids preserved, none made up
    datasets = zarr.open_group(segmented, mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    scales = [d["coordinateTransformations"][0]["scale"][-1] for d in datasets]
    assert scales == pytest.approx([0.499 * 2**k for k in range(4)], rel=1e-3)


def test_objects_table_agrees_with_regionprops_on_the_whole_label_image(segmented: Path, cmu_ome_zarr) -> None:
    root = zarr.open_group(segmented, mode="r")
    labels, probability = np.asarray(root["labels/nuclei/0"]), np.asarray(root["0"])[0] / 255
    pixels = open_slide(cmu_ome_zarr)
    image = pixels.read(0, pixels.height, 0, pixels.width)
    table = pd.read_parquet(segmented / OBJECTS)
    intensity = np.dstack([probability, *image]).astype(np.float64)
    props = regionprops(labels, intensity_image=intensity)
    assert len(props) > 100 and list(table["id"]) == [p.label for p in props]
    expected = pd.DataFrame(
        {
            "area": [p.area for p in props],
            "centroid_y": [p.centroid[0] for p in props],
            "centroid_x": [p.centroid[1] for p in props],
            "bbox_y0": [p.bbox[0] for p in props],
            "bbox_x0": [p.bbox[1] for p in props],
            "bbox_y1": [p.bbox[2] for p in props],
            "bbox_x1": [p.bbox[3] for p in props],
            "mean_probability": [p.intensity_mean[0] for p in props],
            **{f"mean_intensity_{c}": [p.intensity_mean[1 + c] for p in props] for c in range(3)},
        }
    )
    pd.testing.assert_frame_equal(table[expected.columns], expected, check_dtype=False, rtol=1e-9)
    np.testing.assert_allclose(table["centroid_x_um"], table["centroid_x"] * pixels.pixel_size_um)
    np.testing.assert_allclose(table["area_um2"], table["area"] * pixels.pixel_size_um**2)
    crosses = (table["bbox_y0"] // CHUNK != (table["bbox_y1"] - 1) // CHUNK) | (
        table["bbox_x0"] // CHUNK != (table["bbox_x1"] - 1) // CHUNK
    )
    assert crosses.sum() > 5  # objects across chunk seams are measured whole, once
    assert (table["mean_probability"] > 0.5).all()  # every object pixel is above the threshold
    # summarised in the slide's MLflow run
    run_id = root.attrs["unet_inference"]["mlflow_run_id"]
    metrics = MlflowClient(f"sqlite:///{segmented.parent / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["objects"] == len(table) and metrics["object_area_px_median"] == table["area"].median()
    assert metrics["object_area_um2_median"] == pytest.approx(table["area_um2"].median())


def test_outlines_of_the_real_slide_validate_rasterise_back_and_repeat(segmented: Path, tmp_path: Path) -> None:
    first, count = export(segmented, "geojson", destination=tmp_path / "first.geojson")
    collection = geojson.loads(Path(first).read_text())
    assert collection.is_valid, collection.errors()
    labels = np.asarray(zarr.open_group(segmented, mode="r")["labels/nuclei/0"])
    table = pd.read_parquet(segmented / OBJECTS)
    assert count == len(collection["features"]) == len(table)
    seams = 0
    for feature in collection["features"]:
        polygon = shapely.from_geojson(json.dumps(feature["geometry"]))
        exterior, *holes = feature["geometry"]["coordinates"]
        assert exterior[0] == exterior[-1] and shapely.LinearRing(exterior).is_ccw  # RFC 7946 right-hand rule
        assert not any(shapely.LinearRing(ring).is_ccw for ring in holes)
        x0, y0, x1, y1 = (int(v) for v in polygon.bounds)
        ys, xs = np.mgrid[y0:y1, x0:x1]
        inside = shapely.contains_xy(polygon, xs + 0.5, ys + 0.5)  # pixel centres inside the outline
        mask = labels[y0:y1, x0:x1] == feature["id"]
        assert (inside & mask).sum() / (inside | mask).sum() > 0.9 and mask.sum() == feature["properties"]["area"]
        seams += y0 // CHUNK != (y1 - 1) // CHUNK or x0 // CHUNK != (x1 - 1) // CHUNK
    assert seams > 5
    again, _ = export(segmented, "geojson", destination=tmp_path / "again.geojson")
    assert Path(again).read_bytes() == Path(first).read_bytes()
