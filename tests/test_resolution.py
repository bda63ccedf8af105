"""Slides segmented at the model's resolution (issue 24): resampling exact window by window, the level chosen for
a model's pixel size, outputs that overlay the slide, and the same objects from a slide and its 2x downsample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
import torch
import zarr
from mlflow.tracking import MlflowClient
from scipy.spatial import cKDTree

from benchmarks.models import with_resolution
from pipelines.export import export
from pipelines.infer.output import OBJECTS
from tests.test_infer import infer, stored
from tests.test_tiling import whole_image_probability
from unet.errors import UserError
from unet.model_files import load_weights
from unet.resample import Resampled, choose_level, resample_image, resample_labels, resample_window
from unet.resolution import plan_resolution
from unet.samples import fetch_samples, sample_pairs
from unet.slides import open_slide

CMU_UM = 0.499  # the demo slide's pixel size (its Aperio metadata)
AREAS = {"count": 100, "p1": 4.0, "p5": 6.0, "p25": 12.0, "p50": 20.0, "p75": 28.0, "p95": 40.0, "p99": 50.0}


def model_at(model_dir: Path, folder: Path, pixel_size_um: float) -> Path:
    """A copy of a trained model that says it was trained at ``pixel_size_um`` on objects of ``AREAS``."""
    return with_resolution(model_dir, folder, pixel_size_um, AREAS)


def write_tiff(path: Path, rgb_cyx: np.ndarray, pixel_size_um: float | None) -> Path:
    resolution = {} if pixel_size_um is None else {"resolution": (1e4 / pixel_size_um,) * 2, "resolutionunit": 3}
    tifffile.imwrite(path, np.moveaxis(rgb_cyx, 0, -1), photometric="rgb", **resolution)  # 3: centimetre
    return path


@pytest.fixture(scope="module")
def region(cmu_slide: Path) -> np.ndarray:
    """768 x 768 pixels of the real slide's tissue (CYX, uint8, 0.499 um/px)."""
    return open_slide(cmu_slide).read(800, 1568, 600, 1368)


def test_integer_images_keep_their_range_when_resampled() -> None:
    for dtype in (np.uint8, np.uint16, np.int16, np.uint32, np.int32):
        info = np.iinfo(dtype)
        image = np.full((1, 6, 7), info.max, dtype)
        image[0, 0, 0] = info.min
        for scale in (0.5, 2.0):
            resampled = resample_image(image, scale)
            assert resampled.dtype == dtype and resampled.max() == info.max and resampled.min() >= info.min


@pytest.mark.parametrize("scale", [0.499, 2.0, 1.37, 0.73])
def test_any_window_of_a_resampled_image_is_the_whole_image_s(region, scale) -> None:
    image = region[:, :150, :131]
    whole = resample_image(image, scale)
    assert whole.dtype == np.uint8 and whole.shape[1:] == (round(150 / scale), round(131 / scale))
    rng = np.random.default_rng(0)
    for _ in range(25):
        y0, x0 = rng.integers(0, whole.shape[1]), rng.integers(0, whole.shape[2])
        y1, x1 = rng.integers(y0, whole.shape[1]) + 1, rng.integers(x0, whole.shape[2]) + 1
        window = resample_window(lambda a, b, c, d: image[:, a:b, c:d], image.shape[1:], scale, (y0, y1, x0, x1))
        np.testing.assert_array_equal(window, whole[:, y0:y1, x0:x1])
    # the filter is PyTorch's antialiased bilinear interpolation (as PIL's), computed window by window
    values = image.astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(values)[None], scale_factor=1 / scale, mode="bilinear", antialias=True
    )[0]
    if reference.shape[1:] == whole.shape[1:]:  # torch floors the size, we round
        np.testing.assert_allclose(resample_image(values, scale), reference.numpy(), atol=1e-3)


def test_labels_are_resampled_by_nearest_neighbour_keeping_their_ids() -> None:
    _, labels_path = sample_pairs(fetch_samples(["he_nuclei"])["he_nuclei"])[0]
    labels = tifffile.imread(labels_path)
    ids = set(np.unique(labels))
    up, down = resample_labels(labels, 0.5), resample_labels(labels, 2.0)
    assert up.shape == (2 * labels.shape[0], 2 * labels.shape[1]) and set(np.unique(up)) == ids
    assert set(np.unique(down)) <= ids and len(set(np.unique(down))) > 0.8 * len(ids)  # the smallest may vanish
    areas = np.bincount(labels.ravel())[1:]
    np.testing.assert_allclose(np.bincount(up.ravel())[1:][areas > 0], 4 * areas[areas > 0])


def test_the_level_read_is_the_coarsest_not_coarser_than_the_model() -> None:
    sizes = [0.25, 0.5, 1.0, 2.0]
    assert choose_level(sizes, 0.5) == 1 and choose_level(sizes, 0.26) == 0 and choose_level(sizes, 0.7) == 1
    assert choose_level(sizes, 0.49) == 1  # within 5%: read as stored rather than from a level twice as large
    assert choose_level(sizes, 3.0) == 3 and choose_level(sizes, 0.1) == 0 and choose_level([0.5, 1.0], 0.25) == 0


def test_resolution_plan_on_the_real_pyramid(cmu_ome_zarr, region, tmp_path) -> None:
    same = plan_resolution(str(cmu_ome_zarr), 1.0)  # level 1 is 0.998 um/px: within 5%, read as stored
    assert (same.level, same.scale, same.pixel_size_um) == (1, 1.0, pytest.approx(0.998, abs=1e-3))
    up = plan_resolution(str(cmu_ome_zarr), 0.25)
    assert up.level == 0 and up.scale == pytest.approx(0.25 / CMU_UM) and up.pixel_size_um == pytest.approx(0.25)
    down = plan_resolution(str(cmu_ome_zarr), 1.5)
    assert down.level == 1 and down.scale == pytest.approx(1.5 / 0.998, rel=1e-3) and down.resampled
    stored_plan = plan_resolution(str(cmu_ome_zarr), 0.25, resample=False)
    assert (stored_plan.level, stored_plan.scale, stored_plan.reason) == (0, 1.0, "infer.resample is false")
    view = Resampled(open_slide(cmu_ome_zarr), up.scale)
    assert (view.height, view.width) == (round(2967 / up.scale), round(2220 / up.scale))

    plain = tmp_path / "plain.zarr"  # a Zarr array: no pixel size anywhere
    zarr.create_array(plain, data=region[:, :64, :64], chunks=(3, 64, 64))
    with pytest.raises(UserError, match=r"plain.zarr has no pixel size in its metadata; set infer.pixel_size_um"):
        plan_resolution(str(plain), 0.25)
    given = plan_resolution(str(plain), 0.25, pixel_size_um=0.5)
    assert given.scale == 0.5 and given.slide_pixel_size_um == 0.5
    # a size no scan has: 72 dpi, what image editors write, reads as 352.8 um/px; and a level too fine to shrink
    dpi = write_tiff(tmp_path / "dpi.tif", region[:, :64, :64], 25400 / 72)
    with pytest.raises(UserError, match=r"dpi.tif: its pixels \(352.8 um\) are 14\d\d.\dx the model's \(0.25 um\), "
                                        r"more than the 8x it is up-sampled at most; if its metadata is wrong, set "
                                        r"infer.pixel_size_um"):  # fmt: skip
        plan_resolution(str(dpi), 0.25)
    with pytest.raises(UserError, match=r"9.0x finer than the model's 4.5 um/px.*python -m pipelines.convert"):
        plan_resolution(str(plain), 4.5, pixel_size_um=0.5)
    # a zero or NaN pixel size in the metadata is no size at all
    scaled = zarr.open_group(tmp_path / "zero.ome.zarr", mode="w", zarr_format=3)
    scaled.create_array("0", data=region[:, :32, :32], chunks=(3, 32, 32))
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]
    for size in (0.0, float("nan")):
        transforms = [{"type": "scale", "scale": [1.0, size, size]}]
        scaled.attrs["ome"] = {"version": "0.5", "multiscales": [
            {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]}  # fmt: skip
        assert open_slide(tmp_path / "zero.ome.zarr").pixel_size_um is None


def test_tiles_at_the_model_s_resolution_equal_the_whole_resampled_image(trained_model_dir, region, tmp_path) -> None:
    crop = region[:, 100:310, 200:393]  # 210 x 193: not multiples of 16
    slide = write_tiff(tmp_path / "crop.tif", crop, CMU_UM)
    model = model_at(trained_model_dir, tmp_path, 0.25)
    output = tmp_path / "crop-seg.zarr"
    code = infer(tmp_path, model, slide, output, "infer.chunk_size=100", "infer.probability_dtype=float16",
                 "infer.precision=fp32")  # fmt: skip
    assert code == 0
    probability, _ = stored(output)
    resampled = resample_image(crop, 0.25 / CMU_UM)
    assert probability.shape == resampled.shape[1:] == (419, 385)
    expected = whole_image_probability(load_weights(model), resampled.astype(np.float32) / 255, "fp32")
    np.testing.assert_allclose(probability.astype(np.float32), expected, atol=2e-3)  # float16 storage


def test_a_model_at_0_25_upsamples_and_its_outlines_land_on_the_slide(trained_model_dir, region, tmp_path) -> None:
    slide = write_tiff(tmp_path / "slide.tif", region[:, :384, :384], CMU_UM)
    output = tmp_path / "up.ome.zarr"
    assert infer(tmp_path, model_at(trained_model_dir, tmp_path, 0.25), slide, output, "infer.chunk_size=256") == 0
    root = zarr.open_group(output, mode="r")
    lineage = root.attrs["unet_inference"]
    assert lineage["resolution"]["resampled"] and lineage["resolution"]["pixel_size_um"] == pytest.approx(0.25)
    params = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(lineage["mlflow_run_id"]).data.params
    assert float(params["pixel_size_um"]) == pytest.approx(0.25) and "resampled to 0.25 um/px" in params["resolution"]
    assert root["labels/nuclei/0"].shape == (766, 766)  # round(384 * 0.499 / 0.25)
    for group in (root.attrs["ome"], root["labels/nuclei"].attrs["ome"]):  # both overlay the slide's level 0
        scale, translation = group["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert scale["scale"][-2:] == [0.25, 0.25] and translation["translation"][-2:] == [-0.1245, -0.1245]
    table = pd.read_parquet(output / OBJECTS)
    assert len(table) > 20 and table["area"].min() >= np.ceil(0.5 * AREAS["p1"] / 0.25**2)  # the default minimum
    assert table["centroid_x"].max() < 384 and table["centroid_y"].max() < 384  # level-0 pixels of the slide
    np.testing.assert_allclose(table["area_um2"], table["area"] * 0.25**2)
    # the QuPath export is in the slide's level-0 frame: each outline's centroid is the object's, its area in
    # level-0 pixels times their size squared is the object's area in um2
    target, count = export(output, "qupath")
    features = json.loads(Path(target).read_text())["features"]
    assert count == len(features) == len(table)
    polygons = [shapely.geometry.shape(f["geometry"]) for f in features]
    ids = [f["properties"]["measurements"]["Label id"] for f in features]
    rows = table.set_index("id").loc[ids]
    # (outlines run along pixel edges, pixel i covering [i, i + 1]; the table puts pixel centres at integers)
    np.testing.assert_allclose([p.centroid.x - 0.5 for p in polygons], rows["centroid_x"], atol=1e-6)
    np.testing.assert_allclose([p.centroid.y - 0.5 for p in polygons], rows["centroid_y"], atol=1e-6)
    np.testing.assert_allclose([p.area * CMU_UM**2 for p in polygons], rows["area_um2"], rtol=1e-3)


def physical_centres(output: Path) -> np.ndarray:
    """Each object's centre (y, x) in micrometres through the label image's own NGFF transform."""
    root = zarr.open_group(output, mode="r")
    scale, translation = root["labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"][0][
        "coordinateTransformations"
    ]
    labels = np.asarray(root["labels/nuclei/0"])
    ids = np.unique(labels)[1:]
    from scipy import ndimage as ndi

    centres = np.array(ndi.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)
    return centres * np.array(scale["scale"]) + np.array(translation["translation"])


def test_a_slide_and_its_2x_downsample_give_the_same_objects(trained_model_dir, region, tmp_path) -> None:
    """One model (0.998 um/px), one cohort: the slide as scanned (0.499 um/px) and a copy at half its resolution
    (0.998 um/px in its metadata, as a 20x scan of the same tissue): the first is down-sampled per chunk to the
    model's resolution, the second read as stored."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    write_tiff(cohort / "full.tif", region, CMU_UM)
    half = torch.nn.functional.interpolate(torch.from_numpy(region.astype(np.float32))[None], scale_factor=0.5,
                                           mode="bilinear", antialias=True)[0].round().clamp(0, 255)  # fmt: skip
    write_tiff(cohort / "half.tif", half.numpy().astype(np.uint8), 2 * CMU_UM)
    model = model_at(trained_model_dir, tmp_path, 2 * CMU_UM)
    assert infer(tmp_path, model, cohort, tmp_path / "out", "infer.chunk_size=128") == 0
    with open(tmp_path / "out" / "batch_summary.csv") as handle:
        rows = {row["slide"]: row for row in csv.DictReader(handle)}
    assert rows["full"]["slide_um_per_px"] == "0.499" and "resampled to 0.998 um/px" in rows["full"]["resolution"]
    assert (rows["half"]["level"], rows["half"]["um_per_px"]) == ("0", "0.998")
    assert "as stored" in rows["half"]["resolution"]

    full, half = (pd.read_parquet(tmp_path / "out" / f"{name}.ome.zarr" / OBJECTS) for name in ("full", "half"))
    assert abs(len(half) - len(full)) <= 0.05 * len(full), (len(full), len(half))
    # matched by position in micrometres: the half slide's pixel 0 covers the full one's pixels 0 and 1, so its
    # frame sits a quarter of its pixel off (0.25 um): both outputs keep their slide's own frame
    positions = [table[["centroid_y_um", "centroid_x_um"]].to_numpy() for table in (full, half)]
    distance, nearest = cKDTree(positions[1]).query(positions[0])
    matched = distance < 2.0
    assert matched.mean() > 0.9
    assert np.median(distance[matched]) < 0.6
    ratio = half["area_um2"].to_numpy()[nearest[matched]] / full["area_um2"].to_numpy()[matched]
    assert abs(np.median(ratio) - 1) < 0.1 and abs(half["area_um2"].sum() / full["area_um2"].sum() - 1) < 0.1
    # the label images overlay each other in NGFF coordinates, as napari shows them
    for name, table in (("full", full), ("half", half)):
        centres = physical_centres(tmp_path / "out" / f"{name}.ome.zarr")
        np.testing.assert_allclose(centres, table[["centroid_y_um", "centroid_x_um"]].to_numpy(), atol=1e-6)


def test_a_slide_without_pixel_size_is_refused_unless_told(trained_model_dir, region, tmp_path, capsys) -> None:
    slide = write_tiff(tmp_path / "unknown.tif", region[:, :128, :128], None)
    model = model_at(trained_model_dir, tmp_path, CMU_UM)
    capsys.readouterr()
    assert infer(tmp_path, model, slide, tmp_path / "a.ome.zarr", "infer.chunk_size=128") == 2
    assert "unknown.tif has no pixel size in its metadata; set infer.pixel_size_um" in capsys.readouterr().err
    assert not (tmp_path / "a.ome.zarr").exists()
    assert (
        infer(tmp_path, model, slide, tmp_path / "b.ome.zarr", "infer.chunk_size=128", "infer.pixel_size_um=0.25") == 0
    )
    told = zarr.open_group(tmp_path / "b.ome.zarr", mode="r").attrs["unet_inference"]["resolution"]
    assert told["slide_pixel_size_um"] == 0.25 and told["scale"] == pytest.approx(CMU_UM / 0.25)
    assert infer(tmp_path, model, slide, tmp_path / "c.ome.zarr", "infer.chunk_size=128", "infer.resample=false") == 0
    as_stored = zarr.open_group(tmp_path / "c.ome.zarr", mode="r").attrs["unet_inference"]["resolution"]
    assert as_stored["reason"] == "infer.resample is false" and not as_stored["resampled"]
    assert stored(tmp_path / "c.ome.zarr")[0].shape == (128, 128)
