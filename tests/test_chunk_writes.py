"""Writes into Zarr cover whole chunks (unet.chunk_writes) and are checked against the stored bytes
(pipelines.zarr_store), so no write can be lost to two tasks sharing a chunk."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from pipelines.zarr_store import aligned_to, store, verify, write
from unet.chunk_writes import ChunkWriteError, aligned, grid_aligned, write_block


@pytest.mark.parametrize(
    ("region", "expected"),
    [
        ((slice(0, 64), slice(0, 64)), True),
        ((slice(64, 128), slice(0, 100)), True),  # the last chunk along x ends at the array's end
        ((slice(64, None), slice(None)), True),
        ((slice(64, 200), slice(0, 100)), True),  # a stop past the end is clipped to it
        ((slice(0, 128), slice(0, 64)), True),  # several whole chunks
        ((slice(0, 63), slice(0, 64)), False),  # ends inside a chunk
        ((slice(1, 64), slice(0, 64)), False),  # starts inside a chunk
        ((slice(64, 96), slice(0, 100)), False),  # half the last chunk along y (the array is 130 high)
        ((slice(0, 64, 2), slice(0, 64)), False),  # a step
        ((slice(0, 0), slice(0, 64)), False),  # empty
        ((slice(0, 64),), False),  # too few axes
    ],
)
def test_alignment_rule(region: tuple[slice, ...], expected: bool) -> None:
    assert aligned(region, (64, 64), (130, 100)) is expected


def test_grid_alignment_of_blocks() -> None:
    # what map_overlap with depth 31 made of a 1026-wide image in 1024 chunks: the race of issue 11
    assert not grid_aligned(((727,), (995, 31)), (1024, 1024), (727, 1026))
    assert grid_aligned(((727,), (1024, 2)), (1024, 1024), (727, 1026))
    assert grid_aligned(((2048, 500),), (1024,), (2548,))  # blocks of several chunks are fine
    assert not grid_aligned(((1024, 1000),), (1024,), (2048,))  # does not reach the end


def test_write_block_refuses_a_partial_chunk_and_writes_nothing(tmp_path: Path) -> None:
    array = zarr.create_array(tmp_path / "a.zarr", shape=(100, 100), chunks=(64, 64), dtype="uint8", fill_value=0)
    with pytest.raises(ChunkWriteError, match=r"refusing a write to \[0:32, 0:64\] .* chunks \(64, 64\)"):
        write_block(array, (slice(0, 32), slice(0, 64)), np.ones((32, 64)))
    assert not array[:].any()
    write_block(array, (slice(64, 100), slice(0, 64)), np.full((36, 64), 7))
    assert (array[64:, :64] == 7).all() and not array[:64].any()


def test_store_of_a_misaligned_overlap_graph_equals_the_whole_computation(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 1000, (64 + 5, 2 * 64 + 1), dtype=np.int32)
    source = da.from_array(values, chunks=64).map_overlap(lambda b: b * 2 + 1, depth=20, boundary="none")
    assert not grid_aligned(source.chunks, (64, 64), values.shape)  # dask split the 1- and 5-px blocks
    target = zarr.create_array(tmp_path / "t.zarr", shape=values.shape, chunks=(64, 64), dtype="int32")
    assert grid_aligned(aligned_to(source, target).chunks, target.chunks, target.shape)
    store([source], [target], progress=False)
    np.testing.assert_array_equal(target[:], values * 2 + 1)


def test_verify_names_a_chunk_whose_stored_bytes_differ(tmp_path: Path) -> None:
    values = np.arange(100 * 130, dtype=np.float32).reshape(100, 130)
    target = zarr.create_array(tmp_path / "w.zarr", shape=values.shape, chunks=(64, 64), dtype="float32")
    digests = write([da.from_array(values, chunks=50)], [target], progress=False)
    verify([target], digests)  # as computed
    target[64:, 64:128] = 0  # a lost write, as the race produced it
    with pytest.raises(ChunkWriteError, match=r"1 chunk\(s\) read back differ.*first at chunk index \(1, 1\)"):
        verify([target], digests)


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    target = zarr.create_array(tmp_path / "s.zarr", shape=(10, 10), chunks=(4, 4), dtype="uint8")
    with pytest.raises(ChunkWriteError, match=r"cannot store an array of shape \(10, 9\)"):
        store([da.zeros((10, 9), chunks=4, dtype="uint8")], [target], progress=False)
