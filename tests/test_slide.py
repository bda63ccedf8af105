"""Lazy slide access (unet.slides) and TIFF/SVS -> OME-Zarr conversion (pipelines.convert), on the real CMU slide."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import ome_zarr_models.v04.image
import ome_zarr_models.v05.image
import pytest
import tifffile
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.writer import write_multiscales_metadata

from pipelines.convert import convert
from unet.samples import fetch_samples
from unet.slides import SlideError, open_slide

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"0.4": FormatV04, "0.5": FormatV05}
VALIDATORS = {"0.4": ome_zarr_models.v04.image.Image, "0.5": ome_zarr_models.v05.image.Image}
WINDOWS = [(0, 1, 0, 1), (500, 530, 509, 515), (1000, 1600, 700, 1300), (2900, 2967, 2200, 2220)]


@pytest.fixture(scope="module")
def svs() -> Path:
    return fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def svs_cyx(svs: Path) -> np.ndarray:
    return np.ascontiguousarray(tifffile.imread(svs, level=0).transpose(2, 0, 1))


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def converted(request: pytest.FixtureRequest, svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"ngff{request.param}") / "cmu.ome.zarr"
    assert convert(svs, out, chunk=512, ngff=request.param) == str(out)
    return out


def mean2x2(image: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean of a CYX image, odd last row/column dropped, rounded back to the dtype."""
    c, h, w = image.shape
    blocks = image[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2)
    return np.round(blocks.mean(axis=(2, 4))).astype(image.dtype)


def test_svs_is_read_directly_and_lazily(svs: Path, svs_cyx: np.ndarray) -> None:
    with open_slide(svs) as slide:
        assert (slide.shape, slide.axes, slide.levels, slide.dtype) == ((3, 2967, 2220), "yxc", 1, np.uint8)
        assert slide.pixel_size_um == pytest.approx(0.499)
        for y0, y1, x0, x1 in WINDOWS:
            np.testing.assert_array_equal(slide.read(y0, y1, x0, x1), svs_cyx[:, y0:y1, x0:x1])
    with pytest.raises(SlideError, match=r"level 1 does not exist; it has 1 level \(0 to 0\)"):
        open_slide(svs, level=1)


def test_converted_svs_equals_the_slide_at_every_level(converted: Path, svs: Path, svs_cyx: np.ndarray) -> None:
    ngff = converted.parent.name[4:7]
    group = zarr.open_group(converted, mode="r")
    assert group.metadata.zarr_format == (2 if ngff == "0.4" else 3)
    attrs = group.attrs.asdict()
    meta = attrs["ome"] if ngff == "0.5" else attrs  # NGFF 0.5 nests its metadata under "ome"
    assert (meta.get("version") or meta["multiscales"][0]["version"]) == ngff
    assert [c["color"] for c in meta["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    VALIDATORS[ngff].from_zarr(group)  # valid NGFF of its version, as the ome-zarr-models validator reads it
    source = attrs["unet_source"]
    assert source["sha256"] == hashlib.sha256(svs.read_bytes()).hexdigest()
    assert source["shape"] == [3, 2967, 2220] and source["pixel_size_um"] == pytest.approx(0.499)

    level0 = open_slide(converted)
    assert (level0.shape, level0.dtype, level0.levels, level0.axes) == ((3, 2967, 2220), np.uint8, 4, "cyx")
    assert level0.array.chunks == (3, 512, 512) and level0.pixel_size_um == pytest.approx(0.499)
    np.testing.assert_array_equal(level0.read(0, 2967, 0, 2220), svs_cyx)
    for y0, y1, x0, x1 in WINDOWS:
        np.testing.assert_array_equal(level0.read(y0, y1, x0, x1), svs_cyx[:, y0:y1, x0:x1])

    level1 = open_slide(converted, level=1)
    assert (level1.shape, level1.dtype, level1.pixel_size_um) == ((3, 1483, 1110), np.uint8, pytest.approx(0.998))
    np.testing.assert_array_equal(level1.to_dask(256).compute(), mean2x2(svs_cyx))
    np.testing.assert_array_equal(level1.read(100, 140, 1000, 1110), mean2x2(svs_cyx)[:, 100:140, 1000:1110])
    assert [open_slide(converted, level).shape[1:] for level in (2, 3)] == [(741, 555), (370, 277)]
    with pytest.raises(SlideError, match=r"level 4 does not exist; it has 4 levels"):
        open_slide(converted, level=4)
    with pytest.raises(SlideError, match=r"outside level 0 \(2967 x 2220"):
        level0.read(0, 2968, 0, 10)


def test_ome_zarr_reader_reads_the_output(converted: Path, svs_cyx: np.ndarray) -> None:
    ngff = converted.parent.name[4:7]
    location = parse_url(converted, fmt=FORMATS[ngff]())
    assert location is not None and location.fmt.version == ngff
    node = next(iter(Reader(location)()))
    shapes = [tuple(level.shape) for level in node.data]
    print(f"ome-zarr reads {len(node.data)} multiscale levels from NGFF {ngff}: {shapes}")
    assert shapes == [(3, 2967, 2220), (3, 1483, 1110), (3, 741, 555), (3, 370, 277)]
    assert [axis["name"] for axis in node.metadata["axes"]] == ["c", "y", "x"]
    assert node.metadata["channel_names"] == ["red", "green", "blue"]
    np.testing.assert_array_equal(node.data[0][:, 500:530, 509:515].compute(), svs_cyx[:, 500:530, 509:515])


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("layout", ["yx", "yxc", "cyx"])
def test_plain_zarr_arrays(tmp_path: Path, zarr_format: int, layout: str) -> None:
    cyx = np.random.default_rng(0).integers(0, 60000, size=(3 if "c" in layout else 1, 37, 53), dtype=np.uint16)
    stored = {"yx": cyx[0], "yxc": cyx.transpose(1, 2, 0), "cyx": cyx}[layout]
    array = zarr.create_array(tmp_path / "a.zarr", shape=stored.shape, dtype=stored.dtype, zarr_format=zarr_format)
    array[:] = stored
    slide = open_slide(tmp_path / "a.zarr")
    assert (slide.axes, slide.shape, slide.levels, slide.pixel_size_um) == (layout, cyx.shape, 1, None)
    np.testing.assert_array_equal(slide.read(5, 30, 7, 50), cyx[:, 5:30, 7:50])
    np.testing.assert_array_equal(slide.to_dask(16).compute(), cyx)
    with pytest.raises(SlideError, match=r"a\.zarr: level 1 does not exist; it has 1 level"):
        open_slide(tmp_path / "a.zarr", level=1)


@pytest.mark.parametrize("layout", ["cyx", "yxc", "tczyx"])
def test_reads_through_a_tile_cache_equal_direct_reads(tmp_path: Path, layout: str) -> None:
    """Windows read from whole stored chunks kept in a ``TileCache`` are the pixels of a direct read, wherever they
    fall (inside a chunk, across many, at the level's edges, chunks of several channels or one); each stored chunk is
    decoded once while kept, and a budget smaller than a row of them only costs decodes."""
    from unet.slides.tiles import TileCache

    rng = np.random.default_rng(0)
    cyx = rng.integers(0, 255, (3, 150, 170), np.uint8)
    array = {"cyx": cyx, "yxc": cyx.transpose(1, 2, 0), "tczyx": cyx[None, :, None]}[layout]
    chunks = {"cyx": (1, 32, 48), "yxc": (32, 48, 3), "tczyx": (1, 3, 1, 32, 48)}[layout]
    path = tmp_path / "slide.zarr"
    zarr.create_array(path, data=array, chunks=chunks, dimension_names=tuple(layout))
    direct = open_slide(path)
    windows = [(0, 150, 0, 170), (5, 9, 7, 11), (30, 70, 40, 100), (140, 150, 160, 170), (0, 1, 0, 170)]
    windows += [tuple(sorted(rng.integers(0, 150, 2))) + tuple(sorted(rng.integers(0, 170, 2))) for _ in range(30)]
    for budget in (2**20, 3 * 32 * 48 * 2):  # all of it; two stored chunks (of every channel)
        tiles = TileCache(budget)
        cached = direct.with_tiles(tiles)
        for y0, y1, x0, x1 in windows:
            np.testing.assert_array_equal(cached.read(y0, y1, x0, x1), direct.read(y0, y1, x0, x1))
            np.testing.assert_array_equal(cached.read(y0, y1, x0, x1), cyx[:, y0:y1, x0:x1])
        assert tiles.held_bytes <= budget
        if budget == 2**20:
            assert tiles.decoded == 5 * 4 and tiles.hits > tiles.decoded  # 5 x 4 stored chunks, each decoded once


def test_a_window_decodes_the_stored_chunks_it_lacks_in_one_read(tmp_path: Path, monkeypatch) -> None:
    """The stored chunks a window needs and the cache lacks are read in one call (one Zarr call decodes them
    concurrently; one call each held the GIL ~1 ms apiece), each kept once; a cache too small to keep them all
    reads them one by one as the window needs them."""
    from unet.io import GuardedReads
    from unet.slides.tiles import TileCache

    cyx = np.random.default_rng(1).integers(0, 255, (3, 160, 200), np.uint8)
    path = tmp_path / "slide.zarr"
    zarr.create_array(path, data=cyx, chunks=(3, 32, 32), dimension_names=("c", "y", "x"))
    reads = []
    real = GuardedReads.__getitem__
    monkeypatch.setattr(GuardedReads, "__getitem__", lambda self, key: reads.append(key) or real(self, key))
    tiles = TileCache(2**20)
    slide = open_slide(path).with_tiles(tiles)
    np.testing.assert_array_equal(slide.read(10, 100, 20, 110), cyx[:, 10:100, 20:110])  # 4 x 4 stored chunks
    assert len(reads) == 1 and tiles.decoded == 16
    np.testing.assert_array_equal(slide.read(40, 130, 50, 150), cyx[:, 40:130, 50:150])  # 4 x 4, 9 of them kept
    assert len(reads) == 2 and tiles.decoded == 16 + 7 and tiles.hits == 16 + 16  # every tile served kept
    reads.clear()
    small = open_slide(path).with_tiles(TileCache(3 * 32 * 32 * 4))  # four stored chunks
    np.testing.assert_array_equal(small.read(10, 100, 20, 110), cyx[:, 10:100, 20:110])
    assert len(reads) == 16


def test_zarr_v3_dimension_names_beat_the_shape_guess(tmp_path: Path) -> None:
    cyx = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # YXC by shape alone: last dim <= 4
    array = zarr.create_array(tmp_path / "n.zarr", shape=cyx.shape, dtype=cyx.dtype, dimension_names=["c", "y", "x"])
    array[:] = cyx
    slide = open_slide(tmp_path / "n.zarr")
    assert slide.axes == "cyx" and slide.shape == (2, 3, 4)
    np.testing.assert_array_equal(slide.read(0, 3, 0, 4), cyx)


def write_tczyx(path: Path, ngff: str, z: int = 1) -> np.ndarray:
    """A two-level NGFF image with axes tczyx (singleton t, ``z`` planes), 0.25 um pixels; returns level 0."""
    fmt = FORMATS[ngff]()
    group = zarr.open_group(path, mode="w-", zarr_format=fmt.zarr_format)
    data = np.random.default_rng(1).integers(0, 255, size=(1, 2, z, 40, 30), dtype=np.uint8)
    datasets = []
    for level, image in enumerate([data, data[..., ::2, ::2]]):
        group.create_array(str(level), shape=image.shape, dtype=image.dtype, chunks=(1, 1, 1, 16, 16))[:] = image
        scale = [1.0, 1.0, 1.0, 0.25 * 2**level, 0.25 * 2**level]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    units = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}
    write_multiscales_metadata(group, datasets, fmt=fmt, axes="tczyx", axes_units=units)
    return data


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_ngff_tczyx_with_singleton_t_and_z(tmp_path: Path, ngff: str) -> None:
    data = write_tczyx(tmp_path / "img.zarr", ngff)
    slide = open_slide(tmp_path / "img.zarr")
    assert (slide.axes, slide.shape, slide.levels, slide.pixel_size_um) == ("tczyx", (2, 40, 30), 2, 0.25)
    np.testing.assert_array_equal(slide.read(3, 20, 4, 30), data[0, :, 0, 3:20, 4:30])
    low = open_slide(tmp_path / "img.zarr", level=1)
    assert (low.shape, low.pixel_size_um) == ((2, 20, 15), 0.5)
    np.testing.assert_array_equal(low.to_dask(8).compute(), data[0, :, 0, ::2, ::2])

    write_tczyx(tmp_path / "stack.zarr", ngff, z=3)
    with pytest.raises(SlideError, match=r"stack\.zarr: .*non-singleton z=3; only c, y and x"):
        open_slide(tmp_path / "stack.zarr")


def test_open_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"slide not found: .*nope\.zarr"):
        open_slide(tmp_path / "nope.zarr")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SlideError, match=r"notes\.txt is neither a readable TIFF"):
        open_slide(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match=r"empty is neither a Zarr array or group nor a TIFF"):
        open_slide(tmp_path / "empty")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    with pytest.raises(SlideError, match=r"plain\.zarr is a Zarr group without OME-NGFF multiscales"):
        open_slide(tmp_path / "plain.zarr")


@pytest.fixture
def small_tiff(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A pyramidal OME-TIFF (YX uint16, 300 x 200, 0.5 um pixels) with one sub-resolution."""
    image = np.random.default_rng(2).integers(0, 65535, size=(300, 200), dtype=np.uint16)
    path = tmp_path / "small.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, tile=(64, 64), metadata={"axes": "YX", "PhysicalSizeX": 0.5})
        tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64))
    return path, image


def test_convert_small_ome_tiff_and_overwrite(small_tiff: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, image = small_tiff
    with open_slide(path, level=1) as low:  # a TIFF's own pyramid is readable too
        assert (low.levels, low.shape, low.pixel_size_um) == (2, (1, 150, 100), 1.0)

    out = tmp_path / "out" / "small.zarr"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlideError, match=r"small\.zarr already exists; pass --overwrite"):
        convert(path, out, chunk=64)
    assert [p.name for p in out.parent.iterdir()] == ["small.zarr"] and (out / "keep.txt").read_text() == "mine"

    convert(path, out, chunk=64, ngff="0.4", overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["small.zarr"] and not (out / "keep.txt").exists()
    slides = [open_slide(out, level) for level in range(4)]
    assert [s.shape for s in slides] == [(1, 300, 200), (1, 150, 100), (1, 75, 50), (1, 37, 25)]
    assert [s.pixel_size_um for s in slides] == [0.5, 1.0, 2.0, 4.0] and slides[0].dtype == np.uint16
    expected = image[None]
    for slide in slides:
        np.testing.assert_array_equal(slide.to_dask(64).compute(), expected)
        expected = mean2x2(expected)


def test_failed_conversion_leaves_nothing_behind(
    small_tiff: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("pipelines.convert.write_metadata", fail)
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        convert(small_tiff[0], tmp_path / "out" / "x.zarr", chunk=64)
    assert list((tmp_path / "out").iterdir()) == []


def run_convert(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipelines.convert", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_converts_and_fails_in_one_line(small_tiff: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = small_tiff
    out = tmp_path / "cli.ome.zarr"
    result = run_convert(str(path), str(out), "--chunk", "128")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (OME-NGFF 0.5, Zarr v3): 3 levels" in result.stdout
    assert "level 2: 1 x 75 x 50 (CYX) uint16, 2 um/px" in result.stdout

    before = sorted(p.name for p in out.rglob("*"))
    result = run_convert(str(path), str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m pipelines.convert: error: {out} already exists; pass --overwrite to replace it"
    ]
    assert sorted(p.name for p in out.rglob("*")) == before

    result = run_convert(str(tmp_path / "missing.svs"), str(tmp_path / "x.zarr"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "slide not found" in result.stderr and not (tmp_path / "x.zarr").exists()
