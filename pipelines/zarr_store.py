"""Storing Dask arrays into Zarr: chunk-aligned by construction, then verified against the stored bytes.

Every Dask-to-Zarr write in the project goes through ``store``. It rechunks each source to its
target's chunks (``unet.chunk_writes`` explains why a misaligned write can silently lose data),
writes block by block while recording a digest of each block as computed, then reads every chunk
back and compares. A mismatch raises before the caller marks its output complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import dask
import dask.array as da
import numpy as np
import zarr
from dask.diagnostics import ProgressBar

from unet.chunk_writes import ChunkWriteError, block_digest, grid_aligned, write_block

__all__ = ["store", "verify", "write"]


def _region(block_info: dict) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in block_info["array-location"])


def _write(block: np.ndarray, target: zarr.Array, block_info: dict | None = None) -> np.ndarray:
    block = np.ascontiguousarray(block, dtype=target.dtype)  # the digest is that of the bytes stored
    write_block(target, _region(block_info[0]), block)
    return np.full((1,) * block.ndim, block_digest(block), np.int64)


def _read_digest(block: np.ndarray) -> np.ndarray:
    return np.full((1,) * block.ndim, block_digest(block), np.int64)


def _digests(source: da.Array, function, *args: object) -> da.Array:
    """One digest per block of ``source``, computed by ``function(block, *args)``."""
    grid = tuple((1,) * len(sizes) for sizes in source.chunks)
    return source.map_blocks(function, *args, dtype=np.int64, chunks=grid, meta=np.array((), np.int64))


def aligned_to(source: da.Array, target: zarr.Array) -> da.Array:
    """``source`` rechunked to ``target``'s chunks, checked so that every block covers whole chunks."""
    if tuple(source.shape) != tuple(target.shape):
        raise ChunkWriteError(f"cannot store an array of shape {source.shape} into {target.name} {target.shape}")
    source = source.rechunk(target.chunks)
    if not grid_aligned(source.chunks, target.chunks, target.shape):  # rechunk guarantees it; keep it proven
        raise ChunkWriteError(f"blocks {source.chunks} do not cover whole chunks {target.chunks} of {target.name}")
    return source


def write(sources: Sequence[da.Array], targets: Sequence[zarr.Array], progress: bool = True) -> list[np.ndarray]:
    """Compute ``sources`` (in one graph, so shared work is done once) into ``targets``; return block digests."""
    graphs = [_digests(aligned_to(s, t), _write, t) for s, t in zip(sources, targets, strict=True)]
    with ProgressBar(minimum=1.0) if progress else nullcontext():
        return list(dask.compute(*graphs))


def verify(targets: Sequence[zarr.Array], digests: Sequence[np.ndarray]) -> None:
    """Read every chunk of ``targets`` back and compare with ``digests``; raise on the first difference."""
    graphs = [
        _digests(da.from_zarr(target, chunks=target.chunks), _read_digest)
        for target in targets  # chunk-sized blocks: the same grid ``write`` used
    ]
    for target, written, stored in zip(targets, digests, dask.compute(*graphs), strict=True):
        differ = np.argwhere(written != stored)
        if len(differ):
            where = str(target.store_path).removeprefix("file://")
            raise ChunkWriteError(
                f"{where}: {len(differ)} chunk(s) read back differ from what was computed (first at "
                f"chunk index {tuple(int(i) for i in differ[0])}); the output is not marked complete"
            )


def store(sources: Sequence[da.Array], targets: Sequence[zarr.Array], progress: bool = True) -> None:
    """Write ``sources`` into ``targets`` chunk-aligned and check that the stored bytes are what was computed."""
    verify(targets, write(sources, targets, progress))
