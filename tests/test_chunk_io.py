"""Whole chunks read and written in the calling thread (``unet.chunk_io``): the same bytes and pixels as Zarr's own
path, and that path still taken where the synchronous one does not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ShardingCodec, ZstdCodec

from unet import chunk_io


def _stored(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("dtype", "compressors", "shape", "chunks"),
    [
        ("uint8", ZstdCodec(level=1), (1, 300, 250), (1, 128, 128)),  # the probability's layout, edge chunks
        ("int32", ZstdCodec(level=1), (300, 250), (128, 128)),  # labels
        ("float32", BloscCodec(cname="lz4", shuffle="shuffle"), (3, 100, 70), (3, 32, 32)),
        ("uint16", None, (65, 65), (64, 64)),  # no compressor
    ],
)
def test_writes_the_bytes_zarr_writes_and_reads_what_zarr_reads(tmp_path: Path, dtype, compressors, shape, chunks):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 200).astype(dtype)
    data[..., :40, :40] = 0  # a chunk of only the fill value is written too (write_empty_chunks)
    arrays = {}
    for name in ("zarr", "sync"):
        group = zarr.open_group(tmp_path / name, mode="w")
        array = group.create_array("a", shape=shape, chunks=chunks, dtype=dtype, compressors=compressors)
        arrays[name] = array.with_config({"write_empty_chunks": True})
    assert chunk_io._chunks(arrays["sync"]) is not None  # the fast path applies here
    everything = tuple(slice(0, n) for n in shape)
    arrays["zarr"][everything] = data
    chunk_io.write(arrays["sync"], everything, data)
    assert _stored(tmp_path / "sync") == _stored(tmp_path / "zarr")
    np.testing.assert_array_equal(chunk_io.read(arrays["sync"], everything), data)
    tail = tuple(slice(c, n) for c, n in zip(chunks, shape, strict=True))  # starts on a chunk, ends at the edge
    np.testing.assert_array_equal(chunk_io.read(arrays["sync"], tail), data[tail])
    odd = tuple(slice(1, n - 1) for n in shape)  # not whole chunks: Zarr's own path
    np.testing.assert_array_equal(chunk_io.read(arrays["sync"], odd), data[odd])


def test_chunks_never_written_read_as_the_fill_value(tmp_path: Path) -> None:
    array = zarr.create_array(tmp_path / "a.zarr", shape=(64, 64), chunks=(32, 32), dtype="int16", fill_value=7)
    array[:32, :32] = 1
    got = chunk_io.read(array, (slice(0, 64), slice(0, 64)))
    np.testing.assert_array_equal(got, np.asarray(array[:]))
    assert got[40, 40] == 7 and got[0, 0] == 1


def test_arrays_the_synchronous_path_cannot_serve_go_through_zarr(tmp_path: Path) -> None:
    """Sharded arrays, Zarr v2, arrays that skip empty chunks and stores without synchronous access (fsspec's, as for
    s3://) are read and written by Zarr itself, with the same results."""
    data = np.arange(64 * 64, dtype="int32").reshape(64, 64)
    whole = (slice(0, 64), slice(0, 64))
    sharded = zarr.create_array(tmp_path / "s.zarr", shape=(64, 64), chunks=(16, 16), shards=(32, 32), dtype="int32")
    v2 = zarr.create_array(tmp_path / "v2.zarr", shape=(64, 64), chunks=(32, 32), dtype="int32", zarr_format=2)
    remote = zarr.storage.FsspecStore.from_url(f"memory://{tmp_path.name}/r.zarr")  # an object store's kind
    fsspec = zarr.create_array(remote, shape=(64, 64), chunks=(32, 32), dtype="int32")
    skipping = zarr.create_array(tmp_path / "e.zarr", shape=(64, 64), chunks=(32, 32), dtype="int32")
    assert isinstance(sharded.metadata.codecs[0], ShardingCodec)
    assert chunk_io._chunks(sharded) is None and chunk_io._chunks(v2) is None and chunk_io._chunks(fsspec) is None
    for array in (sharded, v2, fsspec, skipping):
        chunk_io.write(array, whole, data)
        np.testing.assert_array_equal(np.asarray(array[:]), data)
        np.testing.assert_array_equal(chunk_io.read(array, whole), data)
    zeros = np.zeros((32, 32), "int32")
    chunk_io.write(skipping.with_config({"write_empty_chunks": False}), (slice(0, 32), slice(0, 32)), zeros)
    assert not (tmp_path / "e.zarr" / "c" / "0" / "0").exists()  # Zarr's rule for an all-fill chunk kept
