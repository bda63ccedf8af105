"""Slide files read through OpenSlide (unet.slides, pipelines.convert): the reader is chosen by content.

The vendor file is a Trestle TIFF written here with tifffile (Software "MedScan", tiled, lossless deflate) holding
the real CMU slide's pixels; OpenSlide detects it as "trestle", a vendor the content check sends to OpenSlide.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image

from pipelines.convert import convert
from unet.slides import READABLE, SlideError, open_slide
from unet.slides.openslide import OpenSlideLevel, _over_white, open_openslide, openslide_vendor

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.499  # the CMU slide's pixel size; Trestle keeps it, non-standardly, in XResolution
HEIGHT, WIDTH = 1536, 1024  # a crop of the real slide whose levels halve exactly: OpenSlide downsamples 1, 2, 4


def mean2x2(image: np.ndarray) -> np.ndarray:
    """2x2 mean of an HWC image, rounded back to uint8 (the written file's lower levels)."""
    h, w, c = image.shape
    return np.round(image.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))).astype(np.uint8)


def openslide_rgb(path: Path, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """OpenSlide's own read_region of a level window (corner in level-0 pixels) as CYX RGB; it must be opaque."""
    with openslide.OpenSlide(path) as handle:
        ds = handle.level_downsamples[level]
        rgba = np.asarray(handle.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0)))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3].transpose(2, 0, 1)


@pytest.fixture(scope="module")
def svs_pixels(cmu_slide: Path) -> np.ndarray:
    return tifffile.imread(cmu_slide, level=0)


@pytest.fixture(scope="module")
def trestle(svs_pixels: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A three-level Trestle TIFF of a crop of the real slide; returns its path and its levels (HWC)."""
    levels = [np.ascontiguousarray(svs_pixels[:HEIGHT, :WIDTH])]
    for _ in range(2):
        levels.append(mean2x2(levels[-1]))
    path = tmp_path_factory.mktemp("trestle") / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        for image in levels:  # Trestle pyramids are consecutive top-level directories
            tif.write(
                image,
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                software="MedScan",
                description="OverlapsXY=0 0 0 0 0 0;Objective Power=20",
                resolution=(MPP, MPP),
                metadata=None,
            )
    assert openslide_vendor(path) == "trestle"
    return path, levels


@pytest.fixture(scope="module")
def trestle_zarr(trestle: tuple[Path, list[np.ndarray]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(convert(trestle[0], tmp_path_factory.mktemp("out") / "trestle.ome.zarr", chunk=256))


def test_aperio_reads_the_same_through_openslide_and_tifffile(cmu_slide: Path, svs_pixels: np.ndarray) -> None:
    assert openslide_vendor(cmu_slide) == "aperio"
    with open_slide(cmu_slide) as by_content, open_openslide(cmu_slide) as by_openslide:
        assert isinstance(by_content.array, zarr.Array)  # Aperio stays with tifffile
        assert isinstance(by_openslide.array, OpenSlideLevel)
        assert (by_openslide.shape, by_openslide.dtype, by_openslide.levels) == ((3, 2967, 2220), np.uint8, 1)
        assert by_openslide.pixel_size_um == pytest.approx(by_content.pixel_size_um) == pytest.approx(MPP)
        # both decoders give the same JPEG pixels, exactly
        np.testing.assert_array_equal(by_openslide.read(0, 2967, 0, 2220), by_content.read(0, 2967, 0, 2220))
        np.testing.assert_array_equal(by_openslide.to_dask(512).compute(), svs_pixels.transpose(2, 0, 1))


def test_convert_of_a_vendor_file_equals_openslide(trestle: tuple[Path, list[np.ndarray]], trestle_zarr: Path) -> None:
    path, levels = trestle
    written = open_slide(trestle_zarr)
    assert (written.shape, written.dtype, written.levels, written.axes) == ((3, HEIGHT, WIDTH), np.uint8, 4, "cyx")
    assert written.pixel_size_um == pytest.approx(MPP)
    level0 = written.read(0, HEIGHT, 0, WIDTH)
    np.testing.assert_array_equal(level0, levels[0].transpose(2, 0, 1))  # the written pixels, exactly
    np.testing.assert_array_equal(level0, openslide_rgb(path, 0, 0, HEIGHT, 0, WIDTH))
    assert [open_slide(trestle_zarr, level).shape[1:] for level in (1, 2, 3)] == [(768, 512), (384, 256), (192, 128)]
    source = zarr.open_group(trestle_zarr, mode="r").attrs["unet_source"]
    assert source["shape"] == [3, HEIGHT, WIDTH] and source["pixel_size_um"] == pytest.approx(MPP)


def test_open_slide_of_a_vendor_file(trestle: tuple[Path, list[np.ndarray]]) -> None:
    path, levels = trestle
    for level, image in enumerate(levels):
        with open_slide(path, level) as slide:
            assert isinstance(slide.array, OpenSlideLevel)  # by content: the Trestle vendor goes to OpenSlide
            height, width = image.shape[:2]
            assert (slide.levels, slide.axes, slide.shape, slide.dtype) == (3, "yxc", (3, height, width), np.uint8)
            assert slide.pixel_size_um == pytest.approx(MPP * 2**level)
            y0, y1, x0, x1 = height // 3, height // 3 + 70, width // 5, width - 3
            window = slide.read(y0, y1, x0, x1)
            np.testing.assert_array_equal(window, openslide_rgb(path, level, y0, y1, x0, x1))
            np.testing.assert_array_equal(window, image[y0:y1, x0:x1].transpose(2, 0, 1))
            np.testing.assert_array_equal(slide.to_dask(200).compute(), image.transpose(2, 0, 1))
            with pytest.raises(SlideError, match=rf"slide\.tif: window .* outside level {level} \({height} x {width}"):
                slide.read(0, height + 1, 0, 1)
    with pytest.raises(SlideError, match=r"slide\.tif: level 3 does not exist; it has 3 levels \(0 to 2\)"):
        open_slide(path, level=3)


def test_the_reader_is_chosen_by_content_not_name(trestle: tuple[Path, list[np.ndarray]], tmp_path: Path) -> None:
    disguised = tmp_path / "trestle.svs"
    shutil.copy(trestle[0], disguised)
    assert isinstance(open_slide(disguised).array, OpenSlideLevel)
    # OpenSlide calls a 16-bit tiled TIFF "generic-tiff" but would read it as RGB: tifffile keeps it, bits intact
    image = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)
    tifffile.imwrite(tmp_path / "grey.scn", image, tile=(64, 64))
    assert openslide_vendor(tmp_path / "grey.scn") == "generic-tiff"
    with open_slide(tmp_path / "grey.scn") as slide:
        assert isinstance(slide.array, zarr.Array) and (slide.shape, slide.dtype) == ((1, 300, 200), np.uint16)
        np.testing.assert_array_equal(slide.read(0, 300, 0, 200)[0], image)


def test_transparent_pixels_become_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    expected = [[[10, 20, 30], [255, 255, 255], [227, 177, 127]]]  # 200*128/255 + 127 = 227.4 -> 227, ...
    np.testing.assert_array_equal(_over_white(rgba), np.array(expected, dtype=np.uint8))


def test_openslide_refusal_is_a_slide_error(tmp_path: Path) -> None:
    (tmp_path / "notes.mrxs").write_text("[GENERAL]\n")
    with pytest.raises(SlideError, match=r"notes\.mrxs: OpenSlide cannot read it .*; readable: OME-Zarr"):
        open_openslide(tmp_path / "notes.mrxs")


def write_random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(3).bytes(4096))


def write_png(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")


def write_text(path: Path) -> None:
    path.write_text("not a slide\n")


@pytest.mark.parametrize(("name", "write"), [("x.ndpi", write_random), ("x.png", write_png), ("x.svs", write_text)])
def test_cli_rejects_an_unreadable_file_in_one_line(tmp_path: Path, name: str, write: Callable[[Path], None]) -> None:
    bad, out = tmp_path / name, tmp_path / "out.ome.zarr"
    write(bad)
    command = [sys.executable, "-m", "pipelines.convert", str(bad), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m pipelines.convert: error: {bad} is neither a readable TIFF nor a slide OpenSlide reads; "
        f"readable: {READABLE}"
    ]
    assert "MIRAX .mrxs" in READABLE and "Zeiss .czi" in READABLE
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written at or beside out.ome.zarr
