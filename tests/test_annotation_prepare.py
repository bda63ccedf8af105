"""pipelines.prepare from QuPath annotations on slides (data.annotations): real nuclei outlined as our exporter
outlines them (QuPath detections of class Nucleus), regions drawn around them, the store's labels compared with the
labels they came from; the checks of bad annotations; the split by slide."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr

from pipelines.export import export
from pipelines.prepare import prepare
from tests.helpers import ROOT
from tests.test_export import write_output
from unet.config import load_config
from unet.data.store import TrainingStore
from unet.errors import UserError
from unet.outlines import outline, qupath_feature
from unet.samples import fetch_samples

# Two regions per crop (QuPath annotations of class "Region*"; a "Training area" is one too), as (x0, y0, x1, y1)
REGIONS = [(10, 12, 120, 240), (130, 12, 246, 240)]


def region(box: tuple[int, int, int, int], name: str | None = "Region*") -> dict:
    """A rectangle annotation as QuPath 0.4+ exports it (classification with name and colour)."""
    x0, y0, x1, y1 = box
    properties = {"objectType": "annotation"}
    if name:
        properties["classification"] = {"name": name, "color": [0, 0, 180]}
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "id": f"region-{x0}-{y0}", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": properties}  # fmt: skip


def nuclei(labels: np.ndarray, name: str) -> list[dict]:
    """Every object as ``pipelines.export --format qupath`` writes it."""
    return [qupath_feature(outline(labels == i), {"id": int(i)}, name) for i in np.unique(labels)[1:]]


def write_geojson(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four real H&E crops (0.25 um/px, no metadata) with their annotations and a manifest pairing them."""
    folder, out = fetch_samples(["he_nuclei"])["he_nuclei"], tmp_path_factory.mktemp("annotated")
    labels, rows = {}, []
    for image in sorted((folder / "images").iterdir())[:4]:
        labels[image.stem] = tifffile.imread(folder / "labels" / image.name)
        features = [region(REGIONS[0]), region(REGIONS[1], "Training area"), *nuclei(labels[image.stem], image.stem)]
        rows.append(f"{image},{write_geojson(out / f'{image.stem}.geojson', features)}")
    (out / "manifest.csv").write_text("slide,annotations\n" + "\n".join(rows) + "\n")
    return {"folder": out, "labels": labels, "manifest": out / "manifest.csv"}


def settings(store: Path, *extra: str) -> list[str]:
    return [f"data.store={store}", "data.labels=null", "data.pixel_size_um=0.25", *extra]


def config_for(*overrides: str):
    return load_config(ROOT / "configs" / "prepare.yaml", list(overrides))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same objects pixel for pixel, whatever their ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    one_to_one = len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    return bool(np.array_equal(a > 0, b > 0)) and one_to_one


def test_regions_give_back_the_labels_their_outlines_came_from(crops, tmp_path: Path) -> None:
    """Each region is one example: its objects whole (also where they cross the region's border), the mask the
    region, the weights 0 outside it; split by slide, both regions of a crop fall on one side."""
    overrides = settings(tmp_path / "a.zarr", f"data.annotations={crops['manifest']}", "data.split_by=slide",
                         "data.val_fraction=0.5")  # fmt: skip
    store = TrainingStore(prepare(config_for(*overrides), previews=0))
    assert len(store.names) == 8 and len(store.names_in("val")) == 4
    cut = 0
    for name in store.names:
        ex, crop = store.example(name), name.rsplit("-", 1)[0]
        y0, x0, y1, x1 = ex.attrs["box"]
        x0r, y0r, x1r, y1r = REGIONS[int(ex.attrs["region"])]
        original = crops["labels"][crop]
        inside = np.zeros(original.shape, bool)
        inside[y0r:y1r, x0r:x1r] = True
        meeting = np.unique(original[inside & (original > 0)])
        expected = np.where(np.isin(original, meeting), original, 0)
        assert expected[:y0].max(initial=0) == expected[y1:].max(initial=0) == 0  # the box holds the objects whole
        assert same_partition(ex.labels[:], expected[y0:y1, x0:x1]), name
        np.testing.assert_array_equal(ex.mask[:].astype(bool), inside[y0:y1, x0:x1])
        assert (ex.weights[:][~inside[y0:y1, x0:x1]] == 0).all() and (ex.weights[:][inside[y0:y1, x0:x1]] > 0).all()
        assert ex.attrs["split"] == store.example(f"{crop}-region{1 - ex.attrs['region']:03d}").attrs["split"]
        assert ex.attrs["annotations_sha256"] and ex.attrs["source_image"].endswith(f"{crop}.tif")
        cut += len(np.setdiff1d(np.unique(expected[~inside]), [0]))
    assert cut > 10, "some objects should cross the regions' borders"


def test_the_export_of_an_inference_output_comes_back_exactly(tmp_path: Path) -> None:
    """``pipelines.export --format qupath`` of an output, a region added, prepared: the output's labels inside the
    region, object for object and pixel for pixel (real fluorescence nuclei, many touching)."""
    folder = fetch_samples(["fluo_nuclei"])["fluo_nuclei"]
    labels = tifffile.imread(folder / "labels" / "dsb2018_0.tif")
    image = tifffile.imread(folder / "images" / "dsb2018_0.tif")
    output = write_output(tmp_path, "slide.ome.zarr", labels.astype(np.int32), image, 0.5)
    exported, count = export(output, "qupath", destination=tmp_path / "slide.qupath.geojson")
    features = json.loads(Path(exported).read_text())["features"]
    write_geojson(tmp_path / "edited.geojson", [region((0, 0, 512, 512)), *features])
    tifffile.imwrite(tmp_path / "slide.tif", image)
    overrides = settings(tmp_path / "f.zarr", f"data.images={tmp_path / 'slide.tif'}", "model.n_channels=1",
                         f"data.annotations={tmp_path / 'edited.geojson'}", "data.pixel_size_um=0.5",
                         "data.val_fraction=0")  # fmt: skip
    store = TrainingStore(prepare(config_for(*overrides), previews=0))
    stored = store.example(store.names[0])
    assert count == len(np.unique(labels)) - 1 and stored.attrs["box"] == [0, 0, 512, 512]
    assert same_partition(stored.labels[:], np.asarray(zarr.open_group(output)["labels/nuclei/0"]))
    np.testing.assert_array_equal(stored.image[0], image)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("outside", r"object \(feature \d+ \(id .*\)\) lies outside the slide: x 500\.\.540"),
        ("no region", r"marks no region: draw one"),
        ("missing slide", r"not found"),
        ("one slide by slide", r"data.split_by=slide .* needs annotations of 2 slides"),
        ("labels too", r"set data.labels or data.annotations, not both"),
        ("not geojson", r"not QuPath GeoJSON"),
        ("too large", r"region 0 is 240 x 120 pixels at 0.25 um/px, more than data.max_image_pixels=1,000"),
    ],
)
def test_bad_annotations_are_refused_in_one_line(crops, tmp_path: Path, change: str, message: str) -> None:
    crop = sorted(crops["labels"])[0]
    slide = fetch_samples(["he_nuclei"])["he_nuclei"] / "images" / f"{crop}.tif"
    features = [region(REGIONS[0]), *nuclei(crops["labels"][crop], crop)]
    extra = []
    if change == "outside":
        features.append(qupath_feature(outline(np.ones((10, 40), bool), 10, 500), {"id": 1}, "x"))
    elif change == "no region":
        features = features[1:]
    elif change == "missing slide":
        slide = tmp_path / "gone.svs"
    elif change == "one slide by slide":
        extra = ["data.split_by=slide"]
    elif change == "too large":
        extra = ["data.max_image_pixels=1000"]
    elif change == "labels too":
        extra = [f"data.labels={tmp_path}"]
    annotations = write_geojson(tmp_path / f"{crop}.geojson", features)
    if change == "not geojson":
        annotations.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    overrides = [*settings(tmp_path / "x.zarr", f"data.images={slide}", f"data.annotations={annotations}"), *extra]
    with pytest.raises(UserError, match=message) as raised:
        prepare(config_for(*overrides), previews=0)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "x.zarr").exists()


def test_the_command_line_takes_a_folder_of_annotations(crops, tmp_path: Path) -> None:
    """Slides in one folder, NAME.geojson in another; exit 0 and the store's examples named by slide and region."""
    images = fetch_samples(["he_nuclei"])["he_nuclei"] / "images"
    cmd = [sys.executable, "-m", "pipelines.prepare", "--previews", "0"]
    for override in settings(tmp_path / "c.zarr", f"data.images={images}", f"data.annotations={crops['folder']}"):
        cmd += ["--set", override]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no slide for the annotations" not in result.stderr
    store = TrainingStore(tmp_path / "c.zarr")
    assert sorted(store.names) == sorted(f"{crop}-region{i:03d}" for crop in crops["labels"] for i in (0, 1))


def test_a_slide_is_read_and_rasterised_at_the_training_pixel_size(cmu_slide: Path, tmp_path: Path) -> None:
    """The real Aperio slide (0.499 um/px) for a 0.25 um/px store: the region's box, image and outlines at twice
    the slide's pixels per side, in QuPath's level-0 frame."""
    square = shapely.box(1040, 830, 1060, 850)  # x0, y0, x1, y1 in level-0 pixels, inside the region
    crossing = shapely.box(990, 880, 1010, 896)  # crosses the region's left edge: kept whole
    features = [region((1000, 800, 1100, 900)), *(qupath_feature(box, {"id": i}, "cmu") for i, box in
                                                  enumerate((square, crossing), start=1))]  # fmt: skip
    annotations = write_geojson(tmp_path / "cmu.geojson", features)
    overrides = settings(tmp_path / "cmu.zarr", f"data.images={cmu_slide}", f"data.annotations={annotations}",
                         "data.val_fraction=0")  # fmt: skip
    store = TrainingStore(prepare(config_for(*overrides), previews=0))
    ex = store.example(store.names[0])
    s = ex.attrs["source_pixel_size_um"] / 0.25  # stored pixels per level-0 pixel: 1.996 for this slide
    box = [math.floor(800 * s), math.floor(990 * s), math.ceil(900 * s), math.ceil(1100 * s)]  # y0, x0, y1, x1
    assert ex.attrs["box"] == box and ex.attrs["resampled"] and 1.99 < s < 2.0
    assert ex.image.shape == (3, box[2] - box[0], box[3] - box[1]) == (3, *ex.labels.shape)

    def centres(a: float, b: float) -> int:  # stored pixels whose centre lies in [a, b) level-0 pixels
        return len(np.flatnonzero((np.arange(4000) + 0.5 >= a * s) & (np.arange(4000) + 0.5 < b * s)))

    areas = sorted(np.bincount(ex.labels[:].ravel())[1:].tolist())
    assert areas == sorted([centres(1040, 1060) * centres(830, 850), centres(990, 1010) * centres(880, 896)])
    assert int(ex.mask[:].sum()) == centres(1000, 1100) * centres(800, 900) and store.pixel_size_um == 0.25
