"""Hostile inputs (issue 17): slides, label images and configs from outside that claim absurd sizes, are cut short
or hold huge label ids (corrupt or truncated chunks: ``test_corrupt.py``; outputs pointed outside their folder
or at an input: ``test_paths.py``).

Each is refused in one line naming the file (huge label ids instead train exactly like ids 1..n), nothing is
written, and the user's files stay byte-identical: every test snapshots its whole folder before and after.
The runs that would allocate gigabytes if a check were missing go through the real command lines with their
address space capped (``RLIMIT_AS``); the others may grow this process's by as much, no more, so a regression
fails a test instead of hurting the machine. ``TRIED`` counts the inputs tried (docs/operations.md).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from pipelines.convert import convert
from pipelines.prepare import prepare
from tests.helpers import ROOT
from tests.hostile import (
    SMALL,
    error_line,
    infer,
    prepare_config,
    run_capped,
    small_zarr,
    snapshot,
)
from unet.data.sources import DataError
from unet.data.store import TrainingStore
from unet.slides import SlideError, open_slide
from unet.slides.openslide import openslide_vendor
from unet.weights import target_and_weights

pytestmark = pytest.mark.timeout(180)  # a check gone missing can also mean a loop over 10**18 chunks
TERA = 10**12


# --- hostile files, made small -------------------------------------------------------------------------------


def tiff_bomb(path: Path, height: int, width: int, tile: bool = False, samples: int = 1, trestle: bool = False) -> Path:
    """A classic TIFF of ~150 bytes whose header claims ``height`` x ``width`` pixels, stored (deflate) as one
    strip, or as one tile, of that size: whoever believes it decodes gigabytes to read a single pixel. ``trestle``:
    tagged as a Trestle slide, which OpenSlide reads (and tifffile is not asked to)."""
    data = zlib.compress(bytes(64))
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 2 if samples == 3 else 1),
            (277, 3, samples), (284, 3, 1)]  # fmt: skip
    if tile:  # TileWidth, TileLength, TileOffsets, TileByteCounts
        tags += [(322, 4, width), (323, 4, height), (324, 4, "data"), (325, 4, len(data))]
    else:  # StripOffsets, RowsPerStrip, StripByteCounts
        tags += [(273, 4, "data"), (278, 4, height), (279, 4, len(data))]
    texts = {270: b"OverlapsXY=0 0;Objective Power=20\0", 305: b"MedScan\0"} if trestle else {}
    tags += [(tag, 2, text) for tag, text in texts.items()]  # ImageDescription, Software
    offset = 8 + 2 + 12 * len(tags) + 4  # the pixel data, then the texts, follow the one IFD
    blobs = {"data": data, **texts}
    places = dict(zip(blobs, np.cumsum([offset] + [len(b) for b in blobs.values()]).tolist(), strict=False))
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(tags)))
    for tag, kind, value in sorted(tags):
        if kind == 2:
            out += struct.pack("<HHII", tag, kind, len(value), places[tag])
        else:
            value = places[value] if value == "data" else value
            out += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, value, *([0] if kind == 3 else []))
    path.write_bytes(bytes(out + struct.pack("<I", 0) + b"".join(blobs.values())))
    return path


def png_bomb(path: Path, height: int, width: int) -> Path:
    """A 1-pixel PNG whose header (IHDR) claims ``height`` x ``width`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # after the signature, the IHDR chunk's length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def npy_bomb(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npy file whose header claims ``shape`` (uint8) over 64 bytes of data."""
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
        handle.write(bytes(64))
    return path


def edit_zarr_shape(path: Path, shape: list[int]) -> Path:
    """Rewrite the shape a Zarr v3 array's metadata claims."""
    meta = json.loads((path / "zarr.json").read_text())
    meta["shape"] = shape
    (path / "zarr.json").write_text(json.dumps(meta))
    return path


def absurd_zarr(path: Path, zarr_format: int, shape: tuple[int, ...] = (3, TERA, TERA)) -> Path:
    """A Zarr array claiming ``shape`` (3 x 10**12 x 10**12), one chunk written."""
    chunks = (*shape[:-2], 256, 256)
    array = zarr.create_array(path, shape=shape, chunks=chunks, dtype="uint8", zarr_format=zarr_format)
    array[tuple(slice(0, n) for n in chunks)] = 200
    return path


def ngff(path: Path, shapes: list[tuple[int, ...]], chunk: int = 256, dtype: str = "uint8") -> Path:
    """An OME-Zarr (NGFF 0.5) image whose levels claim ``shapes`` (CYX); no chunk is written."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    for level, shape in enumerate(shapes):
        root.create_array(str(level), shape=shape, chunks=(shape[0], chunk, chunk), dtype=dtype)
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    datasets = [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0**level,
                 2.0**level]}]} for level in range(len(shapes))]  # fmt: skip
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return path


def _many_channels(path: Path) -> Path:
    zarr.create_array(path, shape=(100_000, 64, 64), chunks=(1, 64, 64), dtype="uint8", dimension_names=["c", "y", "x"])
    return path


def _huge_chunks(path: Path) -> Path:
    zarr.create_array(path, shape=(3, 40_000, 40_000), chunks=(3, 40_000, 40_000), dtype="uint8")
    return path


# (name, builder, message): each a slide whose metadata claims what no slide has
ABSURD_SLIDES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("v2.zarr", lambda p: absurd_zarr(p, 2), "claims 1,000,000,000,000 x 1,000,000,000,000 pixels"),
    ("v3.zarr", lambda p: absurd_zarr(p, 3), "claims 1,000,000,000,000 x 1,000,000,000,000 pixels"),
    ("ngff.ome.zarr", lambda p: ngff(p, [(3, TERA, TERA)]), "claims 1,000,000,000,000 x 1,000,000,000,000 pixels"),
    ("int128.zarr", lambda p: edit_zarr_shape(small_zarr(p), [3, 2**70, 64]), "claims 1,180,591,620,717,411,303,424 x"),
    ("negative.zarr", lambda p: edit_zarr_shape(small_zarr(p), [3, -5, 64]), "Expected all values to be non-negative"),
    ("empty.zarr", lambda p: small_zarr(p, (3, 0, 64)), "level 0 has no pixels (shape (3, 0, 64))"),
    ("channels.zarr", _many_channels, "claims 100,000 channels"),
    ("chunks.zarr", _huge_chunks, "stored in chunks of (3, 40000, 40000) (4,578 MiB decoded)"),
    ("strip_bomb.tif", lambda p: tiff_bomb(p, 100_000, 100_000), "stored in chunks of (100000, 100000)"),
    ("rgb_bomb.tif", lambda p: tiff_bomb(p, 100_000, 100_000, samples=3), "stored in chunks of (100000, 100000, 3)"),
    ("tile_bomb.tif", lambda p: tiff_bomb(p, 2**31, 2**31, tile=True), "claims 2,147,483,648 x 2,147,483,648"),
]


# --- absurd shapes and TIFF bombs as slides -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "build", "message"), ABSURD_SLIDES, ids=[case[0] for case in ABSURD_SLIDES])
def test_absurd_slide_metadata_is_refused_before_any_read(model, state, tmp_path, capsys, name, build, message):
    (tmp_path / "user").mkdir()
    slide = build(tmp_path / "user" / name)
    before = snapshot(tmp_path)
    with pytest.raises(SlideError, match=re.escape(message)):
        open_slide(slide)
    with pytest.raises(SlideError, match=re.escape(message)):
        convert(slide, tmp_path / "converted.ome.zarr")
    capsys.readouterr()
    assert infer(model, state, slide, tmp_path / "out.ome.zarr") == 2
    line = error_line(capsys.readouterr().err, "infer")
    assert name in line and message in line
    assert snapshot(tmp_path) == before  # the slide byte-identical, nothing written (no output, no partial)


def test_absurd_slides_through_the_command_lines_with_memory_capped(tmp_path: Path) -> None:
    """Also a Trestle slide, read by OpenSlide, in one tile of 100,000 x 100,000: OpenSlide would decode the whole
    tile (40 GB) to read one pixel and abort the process when it cannot."""
    user = tmp_path / "user"
    user.mkdir()
    v3, bomb = absurd_zarr(user / "v3.zarr", 3), tiff_bomb(user / "bomb.tif", 100_000, 100_000)
    trestle = tiff_bomb(user / "trestle.tif", 100_000, 100_000, tile=True, samples=3, trestle=True)
    assert openslide_vendor(trestle) == "trestle"
    message = "trestle.tif: level 0 is stored in tiles of 100,000 x 100,000 pixels (38,147 MiB decoded)"
    with pytest.raises(SlideError, match=re.escape(message)):
        open_slide(trestle)
    before = snapshot(user)
    result = run_capped("pipelines.convert", str(trestle), str(tmp_path / "trestle.ome.zarr"), cwd=tmp_path)
    assert result.returncode == 2 and message in error_line(result.stderr, "convert")
    result = run_capped("pipelines.convert", str(bomb), str(tmp_path / "bomb.ome.zarr"), cwd=tmp_path)
    assert result.returncode == 2
    assert "bomb.tif: level 0 is stored in chunks of (100000, 100000)" in error_line(result.stderr, "convert")
    result = run_capped("pipelines.convert", str(v3), str(tmp_path / "v3.ome.zarr"), cwd=tmp_path)
    assert result.returncode == 2 and "claims 1,000,000,000,000 x" in error_line(result.stderr, "convert")
    assert snapshot(user) == before and sorted(os.listdir(tmp_path)) == ["user"]


def test_absurd_slide_through_infer_with_memory_capped(model: Path, tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    slide = absurd_zarr(user / "v2.zarr", 2)
    before = snapshot(tmp_path)
    result = run_capped("pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml"),
                        "--set", f"infer.model={model}", "--set", f"infer.input={slide}",
                        "--set", f"infer.output={tmp_path / 'out.ome.zarr'}",
                        "--set", f"tracking.tracking_uri=sqlite:///{model.parent / 'mlflow.db'}", cwd=user)  # fmt: skip
    assert result.returncode == 2
    assert "v2.zarr: level 0 claims 1,000,000,000,000 x 1,000,000,000,000" in error_line(result.stderr, "infer")
    assert snapshot(tmp_path) == before


def test_a_pyramid_whose_lowest_level_is_huge_or_an_integer_slide_of_absurd_range(model, state, tmp_path, capsys):
    """What is read whole (the lowest level, for the tissue mask) or counted in a histogram (an integer slide's
    values) must be small: a hostile pyramid and a 32-bit slide spanning 0..2**32-1 are refused."""
    user = tmp_path / "user"
    user.mkdir()
    pyramid = ngff(user / "flat.ome.zarr", [(3, 9000, 9000), (3, 9000, 9000)])
    wide = user / "wide.zarr"
    values = np.zeros((3, 64, 64), np.uint32)
    values[0, 0, 0] = 2**32 - 1
    zarr.create_array(wide, data=values, chunks=(3, 32, 32))
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert infer(model, state, pyramid, tmp_path / "a.ome.zarr", "infer.tissue_mask=true") == 2
    line = error_line(capsys.readouterr().err, "infer")
    assert "flat.ome.zarr: its lowest level (1) has 9,000 x 9,000 pixels, more than the 67,108,864" in line
    assert infer(model, state, wide, tmp_path / "b.ome.zarr") == 2
    line = error_line(capsys.readouterr().err, "infer")
    assert "wide.zarr: uint32 values from 0 to 4294967295 span more than 16,777,216" in line
    assert snapshot(tmp_path) == before


def test_a_slide_in_tiny_chunks_is_refused_in_one_line_naming_the_fix(model, state, tmp_path, capsys) -> None:
    """8 x 8-px chunks: every 1024-px window would decode 16,384 of them (hours for a slide); the job says how to
    rechunk it, and ``pipelines.convert`` does, into a slide that segments."""
    user = tmp_path / "user"
    user.mkdir()
    tiny = user / "tiny.zarr"
    zarr.create_array(tiny, data=np.full((3, 256, 256), 200, np.uint8), chunks=(3, 8, 8))
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert infer(model, state, tiny, tmp_path / "out.ome.zarr") == 2
    line = error_line(capsys.readouterr().err, "infer")
    assert "tiny.zarr: level 0 is stored in 1,024 chunks of 8 x 8 px, too small to read in reasonable time" in line
    assert "rechunk it once: python -m pipelines.convert" in line
    assert snapshot(tmp_path) == before
    rechunked = convert(tiny, tmp_path / "rechunked.ome.zarr", chunk=64)
    assert infer(model, state, Path(rechunked), tmp_path / "out.ome.zarr", *SMALL) == 0


# --- images far above prepare's limit ---------------------------------------------------------------------------

# (image file, builder, extra setting, message): each refused from its header by data.max_image_pixels
TOO_LARGE = [
    ("bomb.tif", lambda p: tiff_bomb(p, 100_000, 100_000), (),
     "bomb.tif has 10,000,000,000 pixels (shape (100000, 100000)), more than data.max_image_pixels = 268,435,456"),
    ("bomb.npy", lambda p: npy_bomb(p, (100_000, 100_000)), (), "bomb.npy has 10,000,000,000 pixels"),
    ("bomb.zarr", lambda p: absurd_zarr(p, 3, (TERA, TERA)), (), "bomb.zarr has 1,000,000,000,000,000,000,000,000"),
    ("small.png", lambda p: Image.new("L", (64, 64)).save(p) or p, ("data.max_image_pixels=1000",),
     "small.png has 4,096 pixels (shape (64, 64)), more than data.max_image_pixels = 1,000"),
    ("bomb.png", lambda p: png_bomb(p, 100_000, 100_000), (), "exceeds limit of 178956970 pixels"),  # Pillow's
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "extra", "message"), TOO_LARGE, ids=[case[0] for case in TOO_LARGE])
def test_prepare_refuses_an_image_above_the_limit_from_its_header(tmp_path, name, build, extra, message) -> None:
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "labels").mkdir()
    build(user / "images" / name)
    tifffile.imwrite(user / "labels" / f"{name.split('.')[0]}.tif", np.zeros((64, 64), np.uint16))
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(prepare_config(tmp_path, user / "images", user / "labels", *extra), previews=0)
    assert snapshot(tmp_path) == before


def test_prepare_command_line_refuses_a_tiff_bomb_with_memory_capped(tmp_path: Path) -> None:
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "labels").mkdir()
    tiff_bomb(user / "images" / "a.tif", 100_000, 100_000)
    tiff_bomb(user / "labels" / "a.tif", 100_000, 100_000)
    before = snapshot(tmp_path)
    result = run_capped("pipelines.prepare", "--config", str(ROOT / "configs" / "prepare.yaml"),
                        "--set", f"data.images={user / 'images'}", "--set",
                        f"data.labels={user / 'labels'}", "--set", f"data.store={tmp_path / 'train.zarr'}",
                        "--set", "model.n_channels=1", cwd=user)  # fmt: skip
    assert result.returncode == 2
    line = error_line(result.stderr, "prepare")
    assert "a.tif has 10,000,000,000 pixels" in line and "(--set data.max_image_pixels=N)" in line
    assert snapshot(tmp_path) == before


def test_prepare_refuses_an_integer_image_of_absurd_range(tmp_path: Path) -> None:
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "labels").mkdir()
    image = np.zeros((64, 64), np.int64)
    image[0, 0] = 2**40
    tifffile.imwrite(user / "images" / "a.tif", image)
    tifffile.imwrite(user / "labels" / "a.tif", np.zeros((64, 64), np.uint16))
    before = snapshot(tmp_path)
    message = r"image .*a\.tif: int64 values from 0 to 1099511627776 span more than 16,777,216"
    with pytest.raises(DataError, match=message):
        prepare(prepare_config(tmp_path, user / "images", user / "labels"), previews=0)
    assert snapshot(tmp_path) == before


# --- label images with huge ids -------------------------------------------------------------------------------

# the same three objects (two touching) under ids 1..3 and under hostile ids of several types
HUGE_IDS = {
    "int64": (np.int64, (2**31 - 1, 2**31 + 5, 2**40)),
    "uint32": (np.uint32, (2**31, 2**32 - 2, 2**32 - 1)),
    "uint64": (np.uint64, (2**63 + 1, 2**64 - 2, 2**64 - 1)),
    "uint8": (np.uint8, (1, 254, 255)),  # 255 + 1 overflows uint8
}


def test_huge_label_ids_give_the_weights_of_ids_1_to_n_with_memory_capped(tmp_path: Path) -> None:
    """The weight map's ``find_objects`` allocates a list as long as the largest id (2**40: terabytes); the ids are
    renumbered where they would, and stored renumbered where they do not fit int32. Run through the command line
    with the address space capped, so an allocation by id would fail the run."""
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "labels").mkdir()
    objects = np.zeros((96, 80), np.int64)
    objects[10:30, 10:30], objects[30:50, 10:30], objects[60:80, 40:70] = 1, 2, 3  # 1 and 2 touch
    image = np.random.default_rng(4).random((96, 80)).astype(np.float32)
    for name, (dtype, ids) in {"ref": (np.uint16, (1, 2, 3)), **HUGE_IDS}.items():
        tifffile.imwrite(user / "images" / f"{name}.tif", image)
        tifffile.imwrite(user / "labels" / f"{name}.tif", np.array((0, *ids), dtype)[objects])
    before = snapshot(user)
    result = run_capped("pipelines.prepare", "--config", str(ROOT / "configs" / "prepare.yaml"),
                        "--set", f"data.images={user / 'images'}", "--set",
                        f"data.labels={user / 'labels'}", "--set", f"data.store={tmp_path / 'train.zarr'}",
                        "--set", "model.n_channels=1", "--set", "data.val_fraction=0", "--chunk-size", "32",
                        "--previews", "0", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert snapshot(user) == before
    store = TrainingStore(tmp_path / "train.zarr")
    reference = store.example("ref")
    target, weights = target_and_weights(objects.astype(np.int32))
    np.testing.assert_array_equal(reference.target[:], target)
    np.testing.assert_allclose(reference.weights[:], weights, atol=1e-5)
    for name, (_, ids) in HUGE_IDS.items():
        example = store.example(name)
        assert example.attrs["labels_renumbered"] == (max(ids) > 2**31 - 1), name
        expected = objects if max(ids) > 2**31 - 1 else np.array((0, *ids))[objects]
        np.testing.assert_array_equal(example.labels[:], expected, err_msg=name)
        np.testing.assert_array_equal(example.target[:], reference.target[:], err_msg=name)
        np.testing.assert_array_equal(example.weights[:], reference.weights[:], err_msg=name)


# the hostile inputs this file tries; with test_hostile_paths.py's, docs/operations.md gives their count
TRIED = (
    len(ABSURD_SLIDES)  # absurd shapes, channels, chunks; TIFF bombs
    + 1  # a Trestle (OpenSlide) bomb
    + 2  # a pyramid whose lowest level is huge, a 32-bit slide of absurd range
    + 1  # a slide in tiny chunks
    + len(TOO_LARGE)
    + 1  # an integer training image of absurd range
    + len(HUGE_IDS)
)
