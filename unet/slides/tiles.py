"""Decoded stored chunks of slide levels, kept for the next window that needs them.

Overlap-tile inference reads every chunk with its halo, so the windows of neighbouring chunks overlap, and a window
that does not line up with the stored chunks decodes each chunk it touches whole: a 1216-px window (a 1024-px chunk
and its 96-px halo) over 512-px stored chunks decodes 16 of them, 4.2 Mpx for the 1.5 Mpx it needs, and each is
decoded again by the next window. Through a ``TileCache`` each stored chunk is decoded once while it is kept: one
row of chunks after another, with two rows of stored chunks kept the whole slide is decoded once (docs/benchmarks.md,
"The pipeline around the model"). Zarr itself keeps no decoded chunks (zarr-python 3.1).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np


class TileCache:
    """Decoded tiles by key, the least recently used dropped once they hold more than ``budget_bytes``; shared by
    the threads of a process (a tile two threads want at once may be decoded twice, never stored twice)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = self.hits = self.decoded = 0  # decoded: tiles decoded, kept or not
        self._tiles: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The tile ``key`` (read-only), decoded by ``decode()`` unless kept."""
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                self.hits += 1
                return tile
        return self.put(key, np.asarray(decode()))

    def missing(self, keys: list[Hashable]) -> list[Hashable]:
        """Those of ``keys`` not kept now (to decode them together, then ``put`` each)."""
        with self._lock:
            return [key for key in keys if key not in self._tiles]

    def put(self, key: Hashable, tile: np.ndarray) -> np.ndarray:
        """Keep ``tile``, just decoded (made read-only), as ``key`` if it fits the budget; returns it."""
        tile.flags.writeable = False  # callers copy out of it; nobody changes what another window will read
        with self._lock:
            self.decoded += 1  # a decode
            if tile.nbytes <= self.budget_bytes:
                if key not in self._tiles:
                    self._tiles[key] = tile
                    self.held_bytes += tile.nbytes
                self._trim()
        return tile

    def resize(self, budget_bytes: int) -> None:
        """Keep at most ``budget_bytes`` from now on."""
        with self._lock:
            self.budget_bytes = budget_bytes
            self._trim()

    def _trim(self) -> None:
        while self.held_bytes > self.budget_bytes and self._tiles:
            self.held_bytes -= self._tiles.popitem(last=False)[1].nbytes
