"""Training examples from image/label pairs (``data.images`` and ``data.labels``), for ``pipelines.prepare``:
opened lazily with Dask, checked, renumbered and resampled to the store's pixel size as needed. Annotated regions of
slides are ``pipelines.prepare_regions``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from unet.config import Config
from unet.intensity import intensity_checks, refuse_by

if TYPE_CHECKING:  # heavy modules are imported where they are used, so that --help answers at once
    import dask.array as da

    from unet.data.sources import Pair

log = logging.getLogger("prepare")
INT32_MAX = 2**31 - 1  # labels are stored as int32


class Prepared:
    """Lazy (Dask) arrays of one example plus what is known about it before computing anything."""

    def __init__(self, pair: Pair, config: Config, chunk: int) -> None:
        import dask.array as da

        from unet.data.sources import DataError, check_pair, open_lazy, stated_pixel_size_um

        self.pair = pair
        limit = config.data.max_image_pixels  # from the header, before any pixel: training reads images whole
        image, labels = open_lazy(pair.image, limit), open_lazy(pair.labels, limit)
        check_pair(pair, image, labels)
        image_d = da.from_array(image, chunks=(chunk, chunk, *image.shape[2:]))
        self.image = image_d[None] if image_d.ndim == 2 else da.moveaxis(image_d, -1, 0)  # CYX
        self.labels = da.from_array(labels, chunks=(chunk, chunk))
        self.channels = int(self.image.shape[0])
        if self.channels != config.model.n_channels:
            raise DataError(
                f"image {pair.image} has {self.channels} channels but model.n_channels is {config.model.n_channels}"
            )
        self.stated_pixel_size = stated_pixel_size_um(pair.image)  # from its metadata, None if it states none
        self.renumbered = self.resampled = False
        self.mask = None  # labelled everywhere (an annotated region's example has one)

    @property
    def name(self) -> str:
        return self.pair.name

    def checks(self) -> dict[str, Any]:
        """What ``check`` needs, as Dask scalars: the image's bounds (``unet.intensity.intensity_bounds``) and
        whether the labels hold negative ids."""
        checks = intensity_checks(self.image)
        if np.dtype(self.labels.dtype).kind == "i":
            checks["negative"] = (self.labels < 0).any()
        return checks

    def check(self, computed: dict[str, Any]) -> None:
        """Refuse the example (``DataError``) by its computed ``checks()``."""
        from unet.data.sources import DataError

        refuse_by(computed, f"image {self.pair.image}", self.image.dtype, DataError)
        if computed.get("negative"):
            raise DataError(f"labels {self.pair.labels} contain negative ids")

    def renumber_if_needed(self, largest: int) -> None:
        """Renumber the labels 1..n in the order of their ids if ``largest`` (their largest id) does not fit int32,
        the stored type (``renumbered`` says whether it did). Every distinct id stays one object."""
        if largest <= INT32_MAX:
            return
        import dask.array as da

        ids = np.union1d(np.zeros(1, self.labels.dtype), da.unique(self.labels).compute())  # background first
        self.labels = self.labels.map_blocks(lambda block: np.searchsorted(ids, block).astype(np.int32), dtype=np.int32)
        log.info("labels %s: ids up to %d do not fit int32; stored renumbered 1..%d", self.pair.labels, largest,
                 len(ids) - 1)  # fmt: skip
        self.renumbered = True

    def resample_to(self, pixel_size: float, chunk: int, max_pixels: int) -> None:
        """Image and labels at ``pixel_size`` (um/px) when the size their metadata states differs by more than
        ``unet.resample.TOLERANCE`` (an image that states none has the store's): one task per array (training reads
        an example whole anyway), computed only when the example is, so examples are not all in memory at once.
        A resampled image of more than ``max_pixels`` is refused, as a stored one is."""
        from unet.data.sources import DataError
        from unet.resample import resample_image, resample_labels, resampled_length, same_size

        own = self.stated_pixel_size
        if own is None or same_size(own, pixel_size):
            return
        scale = pixel_size / own  # source pixels per stored pixel (2: a stored pixel is twice as wide)
        height, width = (resampled_length(n, scale) for n in self.labels.shape)
        if height * width > max_pixels:
            raise DataError(
                f"image {self.pair.image} states {own:.4g} um/px: at data.pixel_size_um={pixel_size:g} it would have "
                f"{height:,} x {width:,} pixels, more than data.max_image_pixels={max_pixels:,}; check its metadata"
            )
        self.image = resampled(self.image, scale, resample_image, (self.channels, chunk, chunk))
        self.labels = resampled(self.labels, scale, resample_labels, (chunk, chunk))
        self.resampled = True
        log.info("image %s: resampled from %.4g um/px to %.4g um/px, now %d x %d pixels", self.pair.image, own,
                 pixel_size, *self.labels.shape)  # fmt: skip

    def attrs(self, split: str, pixel_size: float) -> dict[str, Any]:
        """The example's attributes in the store (``pixel_size`` that of its stored pixels)."""
        from unet import storage
        from unet.intensity import intensity_ranges

        return {
            "split": split,
            "source_image": str(self.pair.image),
            "source_labels": str(self.pair.labels),
            "image_sha256": storage.sha256(self.pair.image),
            "labels_sha256": storage.sha256(self.pair.labels),
            "labels_renumbered": self.renumbered,
            "shape": list(self.labels.shape),
            "channels": self.channels,
            "dtype": str(self.image.dtype),
            "intensity_range": intensity_ranges(self.image),
            "pixel_size_um": pixel_size,  # of the stored pixels
            "source_pixel_size_um": self.stated_pixel_size,  # None: data.pixel_size_um was taken
            "resampled": self.resampled,
        }


def resampled(array: da.Array, scale: float, function: Any, chunks: tuple[int, ...]) -> da.Array:
    """``function(whole array, scale)`` (``unet.resample``: (..., H, W) to the resampled size) as a lazy array."""
    import dask
    import dask.array as da

    from unet.resample import resampled_length

    shape = (*array.shape[:-2], *(resampled_length(n, scale) for n in array.shape[-2:]))
    whole = da.from_delayed(dask.delayed(function, pure=True)(array, scale), shape, dtype=array.dtype)
    return whole.rechunk(chunks)


def open_examples(config: Config, chunk: int) -> tuple[list[Prepared], list[str]]:
    """The image/label pairs of ``data.images`` and ``data.labels``, opened lazily, and the folders they come
    from (that ``data.store`` must keep clear of)."""
    from unet.data.sources import DataError, find_pairs
    from unet.samples import resolve_location

    data = config.data
    if not data.images or not data.labels:
        raise DataError("set data.images and data.labels (folders or glob patterns), e.g. --set data.images=DIR")
    images, labels = resolve_location(data.images), resolve_location(data.labels)
    pairs = find_pairs(images, labels)
    log.info("found %d image/label pairs in %s and %s", len(pairs), data.images, data.labels)
    return [Prepared(pair, config, chunk) for pair in pairs], [images, labels]
