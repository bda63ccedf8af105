"""Whole chunks of a local Zarr v3 array, encoded or decoded and stored in the calling thread.

zarr-python 3.1 runs every read and write through its event-loop thread, and each chunk's codec and file access
through ``asyncio.to_thread``: about 1 ms of Python a call whatever the chunk's size, and several hand-overs of the
GIL between threads. A GPU node drives its GPU from one process, whose model thread needs the GIL to launch its
kernels; there, Zarr's calls were the largest holder of the GIL (docs/benchmarks.md, "The pipeline around the
model"). Zarr has the synchronous pieces already: each codec's ``_encode_sync`` / ``_decode_sync`` and a local store's
``get_sync`` / ``set_sync`` (zarr-python PRs 3721 and 3725); its synchronous codec pipeline (PR 3885) is not released
in 3.1.6, the version pinned. This module chains those pieces for arrays where every one is present (a local store,
a regular chunk grid, no sharding), and leaves every other array to Zarr's own path. The chunks written are the
bytes Zarr writes (tests/test_chunk_io.py); the store writes each through a temporary file, as Zarr does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

__all__ = ["aligned", "read", "write"]


def aligned(region: Sequence[slice], chunks: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether ``region`` (one slice per axis, no steps) covers whole chunks of an array of ``shape``.

    Each slice must start on a multiple of the chunk size and stop on one or at the array's end.
    """
    if not (len(region) == len(chunks) == len(shape)):
        return False
    for part, chunk, size in zip(region, chunks, shape, strict=True):
        start, stop, step = part.indices(size)
        if step != 1 or start >= stop or start % chunk or (stop % chunk and stop != size):
            return False
    return True


@dataclass(frozen=True)
class _Chunks:
    """How one array's chunks are encoded and where they are kept."""

    store: Any
    prefix: str
    metadata: Any
    chain: list[tuple[Any, Any]]  # (codec, the spec of what it encodes), in encoding order
    shape: tuple[int, ...]
    prototype: Any

    def key(self, coords: tuple[int, ...]) -> str:
        key = self.metadata.encode_chunk_key(coords)
        return f"{self.prefix}/{key}" if self.prefix else key


def _chunks(array: zarr.Array) -> _Chunks | None:
    """The synchronous path for ``array``, or None where Zarr's own is needed."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.codec_pipeline import BatchedCodecPipeline

    inner = array._async_array
    metadata, pipeline, store = inner.metadata, inner.codec_pipeline, inner.store_path.store
    if metadata.zarr_format != 3 or not isinstance(metadata.chunk_grid, RegularChunkGrid):
        return None
    if not (isinstance(pipeline, BatchedCodecPipeline) and hasattr(store, "get_sync") and hasattr(store, "set_sync")):
        return None
    codecs = (*pipeline.array_array_codecs, pipeline.array_bytes_codec, *pipeline.bytes_bytes_codecs)
    if not all(hasattr(codec, "_encode_sync") and hasattr(codec, "_decode_sync") for codec in codecs):
        return None  # sharding, or a codec from elsewhere
    prototype = default_buffer_prototype()
    spec = metadata.get_chunk_spec((0,) * array.ndim, inner.config, prototype)
    chain = []
    for codec in codecs:
        chain.append((codec, spec))
        spec = codec.resolve_metadata(spec)
    return _Chunks(store, inner.store_path.path, metadata, chain, tuple(array.chunks), prototype)


def _bounded(region: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    """``region`` with every slice's start and stop given (unit steps assumed)."""
    return tuple(slice(*part.indices(size)[:2]) for part, size in zip(region, shape, strict=True))


def _pieces(region: Sequence[slice], chunks: _Chunks):
    """Each chunk that ``region`` (whole chunks) covers: its coordinates and its part of the region."""
    ranges = [range(part.start // size, -(-part.stop // size)) for part, size in zip(region, chunks.shape, strict=True)]
    for coords in itertools.product(*ranges):
        yield coords, tuple(slice(c * n - part.start, min((c + 1) * n, part.stop) - part.start)
                            for c, n, part in zip(coords, chunks.shape, region, strict=True))  # fmt: skip


def write(array: zarr.Array, region: Sequence[slice], block: np.ndarray) -> None:
    """Write ``block`` (the array's dtype) at ``region``, which covers whole chunks (``aligned``): in this thread
    where the array allows, through Zarr otherwise."""
    region = _bounded(region, array.shape)
    chunks = _chunks(array)
    if chunks is None or not array._async_array.config.write_empty_chunks:  # Zarr skips chunks of only the fill
        array[region] = block
        return
    for coords, inside in _pieces(region, chunks):
        piece = block[inside]
        if piece.shape != chunks.shape:  # an edge chunk is stored whole, padded with the fill value
            whole = np.full(chunks.shape, chunks.metadata.fill_value, dtype=block.dtype)
            whole[tuple(slice(0, n) for n in piece.shape)] = piece
            piece = whole
        data = chunks.prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(piece))
        for codec, spec in chunks.chain:
            data = codec._encode_sync(data, spec)
        chunks.store.set_sync(chunks.key(coords), data)


def read(array: zarr.Array, region: Sequence[slice]) -> np.ndarray:
    """The pixels of ``region`` (one unit-step slice per axis): in this thread where it covers whole chunks
    (``aligned``) and the array allows, through Zarr otherwise."""
    region = _bounded(region, array.shape)
    chunks = _chunks(array) if aligned(region, array.chunks, array.shape) else None
    if chunks is None:
        return np.asarray(array[region])
    out = np.empty(tuple(part.stop - part.start for part in region), chunks.metadata.dtype.to_native_dtype())
    for coords, inside in _pieces(region, chunks):
        stored = chunks.store.get_sync(chunks.key(coords), prototype=chunks.prototype)
        if stored is None:  # never written: the fill value, as Zarr reads it
            out[inside] = chunks.metadata.fill_value
            continue
        data = stored
        for codec, spec in reversed(chunks.chain):
            data = codec._decode_sync(data, spec)
        out[inside] = data.as_numpy_array()[tuple(slice(0, part.stop - part.start) for part in inside)]
    return out
