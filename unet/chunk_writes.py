"""Writes into Zarr arrays that cannot lose data: every write covers whole chunks.

Zarr stores an array as separate chunk objects. Writing a region that covers only part of a chunk
is a read-modify-write of that chunk, so two writers touching the same chunk at once can lose one
another's data without any error. This happened: ``pipelines.prepare`` built weight maps with
``map_overlap``, Dask split a block narrower than the overlap depth (1026 = 995 + 31 px wide), and
two tasks wrote the same 1024-px Zarr chunk; one write was lost and the store was marked complete.

The rule here makes that impossible by construction: a write must start on a chunk boundary and
end on one (or at the array's end), so every chunk has exactly one writer. ``write_block`` refuses
anything else; ``block_digest`` of a block as written, and of the chunk read back later, proves that what was stored
is what was computed (``pipelines.zarr_store``). Whole chunks are also what ``unet.chunk_io`` encodes and
stores in the writing thread, off Zarr's event loop.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import zarr

from unet.chunk_io import aligned, write

__all__ = ["ChunkWriteError", "aligned", "block_digest", "grid_aligned", "write_block"]


class ChunkWriteError(RuntimeError):
    """A write that does not cover whole chunks, or stored bytes that differ from the computed ones."""


def grid_aligned(block_chunks: Sequence[Sequence[int]], chunks: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether every block of a blocked array (Dask's ``.chunks``) covers whole Zarr chunks."""
    if len(block_chunks) != len(chunks):
        return False
    for sizes, chunk, size in zip(block_chunks, chunks, shape, strict=True):
        edges = np.cumsum([0, *sizes])
        if edges[-1] != size or any(edge % chunk and edge != size for edge in edges):
            return False
    return True


def block_digest(block: np.ndarray) -> int:
    """CRC-32 of a block's values in C order (cheap: gigabytes per second)."""
    return zlib.crc32(np.ascontiguousarray(block).data)


def write_block(array: zarr.Array, region: Sequence[slice], block: np.ndarray) -> None:
    """Write ``block`` (cast to the array's dtype) at ``region`` of ``array`` if it covers whole chunks."""
    region = tuple(region)
    if not aligned(region, array.chunks, array.shape):
        bounds = ", ".join(f"{s.start}:{s.stop}" for s in region)
        raise ChunkWriteError(
            f"refusing a write to [{bounds}] of {array.name or 'array'} {array.shape}: it does not cover whole "
            f"chunks {array.chunks}, so a concurrent write to the same chunk could be lost"
        )
    write(array, region, np.ascontiguousarray(block, dtype=array.dtype))
