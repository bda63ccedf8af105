"""Hostile inputs (issue 17): slides and training images with a chunk cut short or full of garbage. Each is refused
in one line naming the file and its chunk, nothing is written, and the user's files stay byte-identical (every
test snapshots its folder before and after)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipelines.convert import convert
from pipelines.prepare import prepare
from tests.hostile import error_line, infer, prepare_config, run_capped, snapshot
from unet.data.sources import DataError

pytestmark = pytest.mark.timeout(180)

# the hostile inputs this file tries: a truncated chunk (infer), a garbage chunk (infer, then convert), a corrupt
# TIFF tile and Zarr chunk (prepare)
TRIED = 4


def test_truncated_chunk_in_a_single_slide_is_one_line_and_writes_nothing(model, state, tmp_path, capsys) -> None:
    """A 16-bit slide: the intensity range reads it before any output exists."""
    user = tmp_path / "user"
    user.mkdir()
    pixels = np.random.default_rng(0).integers(0, 4000, (3, 128, 128), dtype=np.uint16)
    zarr.create_array(user / "cut.zarr", data=pixels, chunks=(3, 64, 64))
    chunk = user / "cut.zarr" / "c" / "0" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # cut short
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert infer(model, state, user / "cut.zarr", tmp_path / "out.ome.zarr") == 2
    line = error_line(capsys.readouterr().err, "infer")
    assert "cut.zarr (level 0): cannot read" in line and "chunk 'c/0/1/0' (Zstd decompression error" in line
    assert snapshot(tmp_path) == before


def test_corrupt_chunk_found_while_segmenting_or_converting(model, state, tmp_path, capsys) -> None:
    """An 8-bit OME-Zarr 0.4 (Zarr v2) with a chunk of garbage: nothing reads it before its chunk is segmented.
    Inference stops in one line naming the chunk and leaves no output under its name (only its hidden partial,
    incomplete, for ``--resume`` once the slide is mended); convert, through its command line, writes nothing."""
    user = tmp_path / "user"
    user.mkdir()
    rgb = np.random.default_rng(1).integers(0, 255, (160, 192, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "source.tif", rgb)
    slide = Path(convert(tmp_path / "source.tif", user / "bad.ome.zarr", chunk=64, ngff="0.4"))
    (tmp_path / "source.tif").unlink()
    (slide / "0" / "0" / "1" / "2").write_bytes(b"\x00garbage" * 40)
    before = snapshot(user)
    capsys.readouterr()
    assert infer(model, state, slide, tmp_path / "out.ome.zarr") == 2
    line = error_line(capsys.readouterr().err, "infer")
    assert "bad.ome.zarr (level 0): cannot read" in line and "chunk '0/1/2'" in line
    assert snapshot(user) == before
    assert sorted(os.listdir(tmp_path)) == [".out.ome.zarr.partial", "user"]
    assert not zarr.open_group(tmp_path / ".out.ome.zarr.partial").attrs["unet_inference"]["complete"]

    result = run_capped("pipelines.convert", str(slide), str(tmp_path / "again.ome.zarr"), cwd=tmp_path)
    assert result.returncode == 2
    assert "chunk '0/1/2'" in error_line(result.stderr, "convert")
    assert snapshot(user) == before and not list(tmp_path.glob("*again*")) and not list(tmp_path.glob(".again*"))


@pytest.mark.parametrize("which", ["image tile", "labels chunk"])
def test_corrupt_chunk_in_prepare_is_one_line_and_writes_no_store(tmp_path: Path, which: str) -> None:
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "labels").mkdir()
    image = np.random.default_rng(2).random((128, 128)).astype(np.float32)
    labels = np.zeros((128, 128), np.uint16)
    labels[20:40, 20:40] = 1
    if which == "image tile":
        tifffile.imwrite(user / "images" / "a.tif", image, tile=(64, 64), compression="zlib")
        tifffile.imwrite(user / "labels" / "a.tif", labels)
        with tifffile.TiffFile(user / "images" / "a.tif") as tif:
            offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
        data = bytearray((user / "images" / "a.tif").read_bytes())
        data[offset : offset + count] = b"x" * count
        (user / "images" / "a.tif").write_bytes(bytes(data))
        message = r"a\.tif: cannot read .*chunk \(0, 1\)"
    else:
        tifffile.imwrite(user / "images" / "a.tif", image)
        zarr.create_array(user / "labels" / "a.zarr", data=labels, chunks=(64, 64))
        chunk = user / "labels" / "a.zarr" / "c" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[:7])
        message = r"a\.zarr: cannot read .*chunk 'c/0/0' \(Zstd decompression error"
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=message):
        prepare(prepare_config(tmp_path, user / "images", user / "labels"), previews=0)
    assert snapshot(tmp_path) == before
