"""pipelines.prepare: the training store round trip, input formats, chunking, and bad input."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from pipelines.infer.slide import intensity_range
from pipelines.prepare import overlap_depth, prepare, split_names
from pipelines.train.job import check_store
from tests.helpers import in_the_foreground
from unet.config import load_config
from unet.data.sources import DataError
from unet.data.store import STORE_KEY, StoreError, TrainingStore
from unet.errors import UserError
from unet.io import pixel_size_um
from unet.resample import resample_image, resample_labels
from unet.samples import fetch_samples
from unet.slides import open_slide
from unet.weights import WeightMapParams, target_and_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fluo() -> tuple[np.ndarray, np.ndarray, Path]:
    folder = fetch_samples(["fluo_nuclei"])["fluo_nuclei"]
    image = tifffile.imread(folder / "images" / "dsb2018_0.tif")
    labels = tifffile.imread(folder / "labels" / "dsb2018_0.tif")
    return image, labels, folder


def config_for(tmp_path: Path, images: Path | str, labels: Path | str, channels: int = 1, **extra: str):
    """The fluorescence sample's metadata states no pixel size: ``data.pixel_size_um`` 0.5 unless ``extra`` says."""
    overrides = [f"data.images={images}", f"data.labels={labels}", f"data.store={tmp_path / 'train.zarr'}"]
    extra = {"data.pixel_size_um": "0.5", **extra}
    overrides += [f"model.n_channels={channels}", *(f"{k}={v}" for k, v in extra.items())]
    return load_config(None, overrides)


def test_round_trip_of_real_data(fluo, tmp_path: Path) -> None:
    image, labels, folder = fluo
    config = config_for(tmp_path, folder / "images", folder / "labels", **{"data.pixel_size_um": "0.5"})
    store = TrainingStore(prepare(config, previews=1))
    assert store.names == ["dsb2018_0"] and store.attrs["channels"] == 1
    assert store.attrs["weight_map"] == {"w0": 10.0, "sigma": 5.0, "class_balance": True}
    ex = store.example("dsb2018_0")
    np.testing.assert_array_equal(ex.image[0], image)
    np.testing.assert_array_equal(ex.labels[:], labels)
    target, weights = target_and_weights(labels)
    np.testing.assert_array_equal(ex.target[:], target)
    np.testing.assert_allclose(ex.weights[:], weights, atol=1e-5)
    assert ex.attrs["image_sha256"] == hashlib.sha256((folder / "images/dsb2018_0.tif").read_bytes()).hexdigest()
    assert ex.attrs["source_labels"].endswith("dsb2018_0.tif") and ex.attrs["pixel_size_um"] == 0.5
    lo, hi = ex.attrs["intensity_range"][0]
    assert lo == np.percentile(image, 1, method="inverted_cdf") and hi == np.percentile(
        image, 99.8, method="inverted_cdf"
    )
    assert ex.split == "train"  # a single example is never held out
    assert (tmp_path / "train.zarr.previews" / "dsb2018_0.png").is_file()
    # inference normalises a slide of this image exactly as training did
    zarr.create_array(tmp_path / "slide.zarr", data=image, chunks=(128, 128))
    slide = open_slide(tmp_path / "slide.zarr")
    assert intensity_range(slide) == tuple(map(tuple, ex.attrs["intensity_range"]))


def test_chunk_by_chunk_equals_whole_image(fluo, tmp_path: Path) -> None:
    _, labels, folder = fluo
    store = TrainingStore(prepare(config_for(tmp_path, folder / "images", folder / "labels"), chunk=96, previews=0))
    ex = store.example("dsb2018_0")
    assert ex.weights.chunks == (96, 96)
    target, weights = target_and_weights(labels)
    np.testing.assert_array_equal(ex.target[:], target)
    np.testing.assert_allclose(ex.weights[:], weights, atol=1e-5)


def test_sizes_just_above_a_chunk_multiple_store_exactly_the_whole_image_result(fluo, tmp_path: Path) -> None:
    """Issue 11: map_overlap split blocks narrower than its depth, two tasks wrote one Zarr chunk, one write was
    lost. Every size from chunk + 1 to chunk + depth, in both axes, must store the whole-image target and weights."""
    image, labels, _ = fluo
    chunk, depth = 64, overlap_depth(WeightMapParams())
    for k in range(1, depth + 1):  # height chunk + k, width chunk + depth + 1 - k: every offset in both axes
        shape = (chunk + k, chunk + depth + 1 - k)
        top, left = 7 * k, 11 * k  # different real crops
        window = (slice(top, top + shape[0]), slice(left, left + shape[1]))
        write_pair(tmp_path / "in", f"k{k:02d}", image[window], labels[window])
    config = config_for(tmp_path, tmp_path / "in" / "images", tmp_path / "in" / "labels", **{"data.val_fraction": 0})
    store = TrainingStore(prepare(config, chunk=chunk, previews=0))
    assert len(store.names) == depth
    for name in store.names:
        ex = store.example(name)
        assert ex.weights.chunks == (chunk, chunk)
        target, weights = target_and_weights(ex.labels[:])
        assert ex.labels.shape[0] - chunk in range(1, depth + 1) and ex.labels.shape[1] - chunk in range(1, depth + 1)
        np.testing.assert_array_equal(ex.target[:], target, err_msg=name)
        np.testing.assert_allclose(ex.weights[:], weights, atol=1e-5, err_msg=name)


def test_every_input_format(fluo, tmp_path: Path) -> None:
    image, labels, _ = fluo
    images, label_dir = tmp_path / "in" / "images", tmp_path / "in" / "labels"
    images.mkdir(parents=True), label_dir.mkdir(parents=True)
    tifffile.imwrite(images / "a.tif", image)
    Image.fromarray(image).save(images / "b.png")
    np.save(images / "c.npy", image)
    zarr.create_array(images / "d.zarr", data=image, chunks=(128, 128))
    tifffile.imwrite(label_dir / "a.tiff", labels)
    Image.fromarray(labels).save(label_dir / "b.png")
    np.save(label_dir / "c.npy", labels)
    zarr.create_array(label_dir / "d.zarr", data=labels, chunks=(100, 100))
    store = TrainingStore(prepare(config_for(tmp_path, images, label_dir), previews=0))
    assert sorted(store.names) == ["a", "b", "c", "d"]
    first = store.example("a")
    for name in "bcd":
        ex = store.example(name)
        np.testing.assert_array_equal(ex.image[:], first.image[:])
        np.testing.assert_array_equal(ex.weights[:], first.weights[:])


def test_rgb_sample_and_validation_split(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={tmp_path / 'he.zarr'}"])
    store = TrainingStore(prepare(config, previews=0))
    assert len(store.names_in("val")) == 3 and len(store.names_in("train")) == 12
    ex = store.example(store.names[0])
    assert ex.image.shape == (3, 256, 256) and ex.image.dtype == np.uint8
    assert split_names(store.names, 0.2, 0) == split_names(list(reversed(store.names)), 0.2, 0)
    # the crops' metadata states no pixel size: they are stored as they are, at data.pixel_size_um
    assert store.pixel_size_um == 0.25 and (ex.attrs["source_pixel_size_um"], ex.attrs["resampled"]) == (None, False)
    sources = [tifffile.imread(store.example(name).attrs["source_labels"]) for name in store.names]
    areas = np.concatenate([areas_of(labels) for labels in sources])  # every whole object of the store, both splits
    objects = store.object_area_um2
    assert objects["count"] == len(areas) > 100
    assert objects["p50"] == pytest.approx(np.median(areas) * 0.25**2, rel=1e-12)
    percentiles = [objects[f"p{p}"] for p in (1, 5, 25, 50, 75, 95, 99)]
    assert percentiles == sorted(percentiles) and objects["p1"] < objects["p99"]


def areas_of(labels: np.ndarray) -> np.ndarray:
    """Pixels of each whole object of a label image: those not cut by its border."""
    from skimage.measure import regionprops

    height, width = labels.shape
    inside = lambda box: box[0] > 0 and box[1] > 0 and box[2] < height and box[3] < width  # noqa: E731
    return np.array([region.area for region in regionprops(labels) if inside(region.bbox)], np.int64)


def write_at(folder: Path, name: str, image: np.ndarray, labels: np.ndarray, pixel_size: float | None) -> Path:
    """A pair whose image states ``pixel_size`` (um/px) in its TIFF resolution tags (None: states none)."""
    write_pair(folder, name, image, labels)
    if pixel_size is not None:
        per_cm = 1e4 / pixel_size
        tifffile.imwrite(folder / "images" / f"{name}.tif", image, resolution=(per_cm, per_cm),
                         resolutionunit="CENTIMETER")  # fmt: skip
        assert pixel_size_um(folder / "images" / f"{name}.tif") == pytest.approx(pixel_size)  # it reads back
    return folder / "images" / f"{name}.tif"


def test_images_of_two_pixel_sizes_are_stored_at_one(fluo, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An image whose metadata states another pixel size than data.pixel_size_um is resampled to it, labels too,
    before its target and weight map are computed; one at the store's size is stored as it is."""
    image, labels, _ = fluo
    fine = write_at(tmp_path / "in", "fine", image, labels, 0.25)
    write_at(tmp_path / "in", "coarse", image, labels, 0.5)
    config = config_for(tmp_path, tmp_path / "in" / "images", tmp_path / "in" / "labels",
                        **{"data.pixel_size_um": "0.5", "data.val_fraction": "0"})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="prepare"):
        store = TrainingStore(prepare(config, chunk=96, previews=0))
    assert store.pixel_size_um == 0.5
    coarse = store.example("coarse")
    assert {k: coarse.attrs[k] for k in ("pixel_size_um", "source_pixel_size_um", "resampled")} == {
        "pixel_size_um": 0.5, "source_pixel_size_um": 0.5, "resampled": False}  # fmt: skip
    np.testing.assert_array_equal(coarse.image[0], image)
    np.testing.assert_array_equal(coarse.labels[:], labels)

    ex = store.example("fine")
    assert {k: ex.attrs[k] for k in ("pixel_size_um", "source_pixel_size_um", "resampled")} == {
        "pixel_size_um": 0.5, "source_pixel_size_um": 0.25, "resampled": True}  # fmt: skip
    assert ex.image.shape == (1, 256, 256) and ex.labels.shape == (256, 256) and ex.attrs["shape"] == [256, 256]
    np.testing.assert_array_equal(ex.image[:], resample_image(image[None], 2.0))
    np.testing.assert_array_equal(ex.labels[:], resample_labels(labels, 2.0))
    assert set(np.unique(ex.labels[:])) <= set(np.unique(labels))  # ids kept, none blended
    target, weights = target_and_weights(ex.labels[:])  # computed at the stored resolution
    np.testing.assert_array_equal(ex.target[:], target)
    np.testing.assert_allclose(ex.weights[:], weights, atol=1e-5)
    source_median = np.median(areas_of(labels)) * 0.25**2  # um2
    assert np.median(areas_of(ex.labels[:])) * 0.5**2 == pytest.approx(source_median, rel=0.1)
    assert f"image {fine}: resampled from 0.25 um/px to 0.5 um/px, now 256 x 256 pixels" in caplog.messages

    config.data.pixel_size_um = None  # without it the two sizes are refused, never mixed
    with pytest.raises(DataError) as refused:
        prepare(config, overwrite=True, previews=0)
    assert str(refused.value) == (
        f"images {fine} (0.25 um/px) and {tmp_path / 'in' / 'images' / 'coarse.tif'} (0.5 um/px) differ in pixel "
        "size by more than 5%; set data.pixel_size_um (micrometres per pixel) to resample them to one"
    )
    assert TrainingStore(config.data.store).names == ["coarse", "fine"]  # the store made before is kept

    # a stated size that would make an image larger than data.max_image_pixels (72 dpi reads as 352.8 um/px)
    config.data.pixel_size_um, config.data.max_image_pixels = 0.0625, 512 * 512 * 4
    refused = r"coarse.tif states 0.5 um/px: at data.pixel_size_um=0.0625 it would have 4,096 x 4,096 pixels, more "
    with pytest.raises(DataError, match=refused + "than data.max_image_pixels=1,048,576"):
        prepare(config, overwrite=True, previews=0)


def test_the_pixel_size_comes_from_the_metadata_or_data_pixel_size_um(fluo, tmp_path: Path) -> None:
    image, labels, folder = fluo
    config = config_for(tmp_path, folder / "images", folder / "labels", **{"data.pixel_size_um": "null"})
    with pytest.raises(DataError) as refused:  # the sample states none
        prepare(config)
    assert str(refused.value) == (
        f"image {folder / 'images' / 'dsb2018_0.tif'} has no pixel size in its metadata; set data.pixel_size_um "
        "(micrometres per pixel) to the size its pixels have"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
    # sizes within 5% of each other are one resolution: stored as they are, at the size they state
    write_at(tmp_path / "in", "a", image, labels, 0.5)
    write_at(tmp_path / "in", "b", image, labels, 0.51)
    config = config_for(tmp_path, tmp_path / "in" / "images", tmp_path / "in" / "labels",
                        **{"data.pixel_size_um": "null", "data.val_fraction": "0"})  # fmt: skip
    store = TrainingStore(prepare(config, previews=0))
    assert store.pixel_size_um == pytest.approx(0.505)
    assert [store.example(name).attrs["resampled"] for name in "ab"] == [False, False]
    assert store.example("b").attrs["source_pixel_size_um"] == pytest.approx(0.51)
    # one image that states none among images that do: data.pixel_size_um is still needed
    unstated = write_at(tmp_path / "in", "c", image, labels, None)
    with pytest.raises(DataError, match=rf"^image {unstated} has no pixel size in its metadata; set data\."):
        prepare(config, overwrite=True, previews=0)


def test_training_refuses_a_store_that_records_no_pixel_size(tmp_path: Path) -> None:
    """A store prepared before stores recorded their pixel size cannot give its model one: prepare it again."""
    for name in ("a", "b"):
        write_pair(tmp_path / "in", name, GOOD_IMAGE, GOOD_LABELS)
    config = config_for(tmp_path, tmp_path / "in" / "images", tmp_path / "in" / "labels",
                        **{"data.val_fraction": "0.5"})  # fmt: skip
    location = prepare(config, previews=0)
    config.data.pixel_size_um = None  # a training config need not say it: the run records the store's
    assert check_store(config).pixel_size_um == 0.5 and config.data.pixel_size_um == 0.5
    root = zarr.open_group(location, mode="r+")
    older = {k: v for k, v in root.attrs[STORE_KEY].items() if k not in {"pixel_size_um", "object_area_um2"}}
    root.attrs[STORE_KEY] = older  # as versions before this one wrote it
    store = TrainingStore(location)
    assert (store.pixel_size_um, store.object_area_um2) == (None, None)
    with pytest.raises(UserError) as refused:
        check_store(config)
    assert str(refused.value) == f"{store.location} records no pixel size: prepare it again (data.pixel_size_um)"


def write_pair(folder: Path, name: str, image: np.ndarray, labels: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "images" / f"{name}.tif", image)
    tifffile.imwrite(folder / "labels" / f"{name}.tif", labels)


GOOD_IMAGE = np.random.default_rng(0).random((64, 64)).astype(np.float32)
GOOD_LABELS = np.zeros((64, 64), np.uint16)
GOOD_LABELS[10:20, 10:20] = 3


@pytest.mark.parametrize(
    ("image", "labels", "message"),
    [
        (GOOD_IMAGE[:60], GOOD_LABELS, r"image .*bad\.tif has shape \(60, 64\) but labels .*bad\.tif have \(64, 64\)"),
        (GOOD_IMAGE, GOOD_LABELS.astype(np.float32), r"labels .*bad\.tif: instance labels must be integers"),
        (np.where(GOOD_LABELS > 0, np.nan, GOOD_IMAGE), GOOD_LABELS, r"image .*bad\.tif: NaN or infinite pixels"),
        (GOOD_IMAGE, GOOD_LABELS.astype(np.int32) - 1, r"labels .*bad\.tif contain negative ids"),
        (np.stack([GOOD_IMAGE] * 2, -1), GOOD_LABELS, r"image .*bad\.tif has 2 channels but model.n_channels is 1"),
    ],
)
def test_bad_input_names_the_file_and_writes_nothing(tmp_path: Path, image, labels, message: str) -> None:
    write_pair(tmp_path / "in", "good", GOOD_IMAGE, GOOD_LABELS)
    write_pair(tmp_path / "in", "bad", image, labels)
    config = config_for(tmp_path, tmp_path / "in" / "images", tmp_path / "in" / "labels")
    with pytest.raises(DataError, match=message):
        prepare(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no store, no partial store


def test_empty_folder_and_missing_labels(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match=r"no images found in .*images"):
        prepare(config_for(tmp_path, tmp_path / "images", tmp_path / "labels"))
    tifffile.imwrite(tmp_path / "images" / "lonely.tif", GOOD_IMAGE)
    with pytest.raises(DataError, match=r"no label file for image .*lonely\.tif"):
        prepare(config_for(tmp_path, tmp_path / "images", tmp_path / "labels"))
    with pytest.raises(DataError, match="input folder not found"):
        prepare(config_for(tmp_path, tmp_path / "nope", tmp_path / "labels"))


def test_existing_store_is_kept_unless_overwrite(tmp_path: Path) -> None:
    write_pair(tmp_path / "in", "a", GOOD_IMAGE, GOOD_LABELS)
    config = config_for(tmp_path, tmp_path / "in" / "images", tmp_path / "in" / "labels")
    first = Path(prepare(config, previews=0))
    before = sorted(p.relative_to(first) for p in first.rglob("*"))
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        prepare(config)
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before
    write_pair(tmp_path / "in", "b", GOOD_IMAGE, GOOD_LABELS)
    assert TrainingStore(prepare(config, overwrite=True, previews=0)).names == ["a", "b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_killed_run_leaves_no_store_that_looks_valid(tmp_path: Path) -> None:
    big = np.tile(tifffile.imread(fetch_samples(["fluo_nuclei"])["fluo_nuclei"] / "labels" / "dsb2018_0.tif"), (6, 6))
    write_pair(tmp_path / "in", "big", big.astype(np.float32), big)
    store = tmp_path / "train.zarr"
    cmd = [sys.executable, "-m", "pipelines.prepare", "--set", f"data.images={tmp_path / 'in' / 'images'}",
           "--set", f"data.labels={tmp_path / 'in' / 'labels'}", "--set", f"data.store={store}",
           "--set", "model.n_channels=1", "--set", "data.pixel_size_um=0.5", "--chunk-size", "128"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".train.zarr.partial-*/big/weights")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.exists()
    partial = next(tmp_path.glob(".train.zarr.partial-*"))
    with pytest.raises(StoreError, match="incomplete"):
        TrainingStore(partial)
    shutil.rmtree(partial)


def test_ctrl_c_stops_at_once_and_leaves_the_old_store_as_it_was(tmp_path: Path) -> None:
    big = np.tile(tifffile.imread(fetch_samples(["fluo_nuclei"])["fluo_nuclei"] / "labels" / "dsb2018_0.tif"), (3, 3))
    write_pair(tmp_path / "in", "big", big.astype(np.float32), big)
    store = tmp_path / "train.zarr"
    zarr.open_group(store).attrs["mine"] = "an earlier store the job is asked to replace"
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    cmd = [sys.executable, "-m", "pipelines.prepare", "--set", f"data.images={tmp_path / 'in' / 'images'}",
           "--set", f"data.labels={tmp_path / 'in' / 'labels'}", "--set", f"data.store={store}",
           "--set", "model.n_channels=1", "--set", "data.pixel_size_um=0.5", "--chunk-size", "128",
           "--overwrite"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=in_the_foreground)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".train.zarr.partial-*/big/weights")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-2000:]
    assert output.strip().splitlines()[-1] == (
        f"python -m pipelines.prepare: interrupted; {store} was not written (the partial store is removed; a store "
        "already there is unchanged): run the same command again"
    )
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".train.zarr*"))


def test_missing_or_foreign_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="training store not found"):
        TrainingStore(tmp_path / "nope.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="is not a training store"):
        TrainingStore(tmp_path / "other.zarr")


def test_cli_exit_code_and_one_line_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pipelines.prepare", "--set", f"data.images={tmp_path}"]
    result = subprocess.run([*cmd, "--set", f"data.labels={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no images found" in result.stderr
