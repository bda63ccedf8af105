"""Tiling geometry of the U-Net, derived from its architecture.

Overlap-tile inference (the paper's Fig. 2) needs to know how far the value of one output pixel
reaches into the input. This module follows the dependency of one output index back through the
network on an unbounded 1-D grid (the network is separable in that respect: every layer acts
the same way along rows and columns):

- a 3x3 'same' convolution reads indices ``i - 1 .. i + 1`` of its input;
- a 2x2 max-pool reads ``2i, 2i + 1`` of the finer level;
- a 2x2 stride-2 transposed convolution reads ``i // 2`` of the coarser level; bilinear
  up-sampling reads ``i // 2`` and a neighbour on either side (counted on both, to be safe);
- an ``Up`` block reads the skip connection and the up-sampled coarser level.

The reach of one pixel depends on where it sits within the ``2**depth`` pooling grid (pooling
windows look right, so pixels at the start of a grid cell reach less far left than right).
Overlap-tile inference only cuts tiles on that grid, so what a tile needs is the *aligned*
reach: how far beyond a whole grid cell its outputs read. The halo is that rounded up to
``2**depth``, which keeps every tile's input on the pooling grid as well.
"""

from __future__ import annotations

CONVS_PER_BLOCK = 2  # DoubleConv: two 3x3 convolutions
Span = tuple[int, int]


def _encoder_span(level: int, lo: int, hi: int) -> Span:
    """Input indices read by encoder outputs ``lo..hi`` at ``level``."""
    lo, hi = lo - CONVS_PER_BLOCK, hi + CONVS_PER_BLOCK
    if level == 0:
        return lo, hi
    return _encoder_span(level - 1, 2 * lo, 2 * hi + 1)


def _decoder_span(level: int, lo: int, hi: int, depth: int, bilinear: bool) -> Span:
    """Input indices read by decoder (``Up`` block) outputs ``lo..hi`` at ``level < depth``."""
    lo, hi = lo - CONVS_PER_BLOCK, hi + CONVS_PER_BLOCK
    skip_lo, skip_hi = _encoder_span(level, lo, hi)
    coarse_lo, coarse_hi = lo // 2, hi // 2
    if bilinear:
        coarse_lo, coarse_hi = coarse_lo - 1, coarse_hi + 1
    if level + 1 == depth:
        deep_lo, deep_hi = _encoder_span(depth, coarse_lo, coarse_hi)
    else:
        deep_lo, deep_hi = _decoder_span(level + 1, coarse_lo, coarse_hi, depth, bilinear)
    return min(skip_lo, deep_lo), max(skip_hi, deep_hi)


def receptive_field_reach(depth: int, bilinear: bool = False) -> int:
    """How far (input pixels, either side) one output pixel's value depends on the input, at most."""
    reach = 0
    for position in range(2**depth):
        lo, hi = _decoder_span(0, position, position, depth, bilinear)
        reach = max(reach, position - lo, hi - position)
    return reach


def aligned_reach(depth: int, bilinear: bool = False) -> int:
    """How far the outputs of one ``2**depth`` grid cell (aligned to the grid) read beyond the cell."""
    cell = 2**depth
    lo, hi = _decoder_span(0, 0, cell - 1, depth, bilinear)
    return max(-lo, hi - (cell - 1))


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def halo_for(depth: int, bilinear: bool = False) -> int:
    """Margin a grid-aligned tile needs on every side: the aligned reach rounded up to ``2**depth``.

    Note: bilinear up-sampling with ``align_corners=True`` (the seed's choice) is local but not
    shift-equivariant, so tiles of such a model match whole-image inference only approximately.
    """
    return round_up(aligned_reach(depth, bilinear), 2**depth)
