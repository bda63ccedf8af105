"""Intensity normalisation, one rule for training and inference: 8-bit images map 0..255 to (0, 1), others
their per-channel (1, 99.8) percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unet.errors import UserError

# an integer image's intensity range is a histogram as long as its value span: wider ones are refused
MAX_INTENSITY_SPAN = 2**24


def intensity_bounds(image: Any) -> tuple[Any, Any] | None:
    """The lowest and highest value of an image that ``check_intensity`` must see before its intensity range is
    built, lazy for a Dask image (one pass, however large): floating-point images (NaN or infinite pixels) and
    32/64-bit integer images (their span); None for others (8 and 16 bits), which need no check."""
    dtype = np.dtype(image.dtype)
    if dtype.kind == "f" or (dtype.kind in "iu" and dtype.itemsize > 2):
        return image.min(), image.max()  # NaN propagates through both
    return None


def check_intensity(name: str, dtype: Any, low: Any, high: Any, error: type[Exception] = UserError) -> None:
    """Refuse, as ``error`` in one line naming ``name``, an image whose lowest and highest value (its computed
    ``intensity_bounds``) are not finite, or, for integers, span more than ``MAX_INTENSITY_SPAN``."""
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise error(f"{name}: NaN or infinite pixels")
    if np.dtype(dtype).kind in "iu" and high - low > MAX_INTENSITY_SPAN:
        raise error(
            f"{name}: {dtype} values from {low:.0f} to {high:.0f} span more than {MAX_INTENSITY_SPAN:,}, too many "
            "for the intensity histogram; convert it to float32 or 16 bits"
        )


def intensity_checks(image: Any) -> dict[str, Any]:
    """The deferred part of ``check_intensity`` for a (Dask) image, to compute with other checks:
    ``{"bounds": (min, max)}``, or ``{}`` for an image that needs no check. ``refuse_by`` reads the result."""
    return {"bounds": bounds} if (bounds := intensity_bounds(image)) is not None else {}


def refuse_by(computed: dict[str, Any], name: str, dtype: Any, error: type[Exception] = UserError) -> None:
    """``check_intensity`` on the computed ``intensity_checks`` (other keys are ignored)."""
    if "bounds" in computed:
        check_intensity(name, dtype, *computed["bounds"], error)


def intensity_range_from_histogram(counts: np.ndarray, low: float = 1.0, high: float = 99.8) -> tuple[float, float]:
    """Exact (``low``, ``high``) percentiles of an integer channel from its value histogram."""
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    if total == 0:
        return 0.0, 1.0
    lo = int(np.searchsorted(cumulative, total * low / 100.0))
    hi = int(np.searchsorted(cumulative, total * high / 100.0))
    return float(lo), float(max(hi, lo + 1))


def intensity_ranges(image: Any) -> tuple[tuple[float, float], ...]:
    """Per-channel normalisation range of a CYX image (NumPy, lazy Dask, or a ``unet.slides.Slide``), the same
    rule for training and inference: 8-bit images 0..255, others their (1, 99.8) percentiles, exact for integer
    images (from a histogram; Dask merges per-chunk percentiles of floating-point images: close, not exact)."""
    if np.dtype(image.dtype) == np.uint8:  # nothing to read
        return ((0.0, 255.0),) * image.shape[0]
    if isinstance(image, np.ndarray):  # in memory already: NumPy alone, no Dask
        return tuple(_channel_range(channel) for channel in image)
    import dask.array as da  # lazy images only: the library stays importable without a scheduler

    image = image.to_dask() if hasattr(image, "to_dask") else da.asarray(image)
    ranges = []
    for channel in image:
        if image.dtype.kind in "iu":
            values = channel.ravel().astype(np.int64)
            shift = int(values.min().compute())
            lo, hi = intensity_range_from_histogram(da.bincount(values - shift).compute())
            ranges.append((lo + shift, hi + shift))
        else:
            lo, hi = da.percentile(channel.ravel().astype(np.float64), [1.0, 99.8]).compute()
            ranges.append((float(lo), float(max(hi, lo + 1e-6))))
    return tuple(ranges)


def _channel_range(channel: np.ndarray) -> tuple[float, float]:
    """``intensity_ranges``' rule for one in-memory channel."""
    if channel.dtype.kind in "iu":
        values = channel.ravel().astype(np.int64)
        shift = int(values.min())
        lo, hi = intensity_range_from_histogram(np.bincount(values - shift))
        return lo + shift, hi + shift
    lo, hi = np.percentile(channel.ravel().astype(np.float64), [1.0, 99.8])
    return float(lo), float(max(hi, lo + 1e-6))


def scale_intensity(image: Any, ranges: Sequence[tuple[float, float]] | np.ndarray) -> Any:
    """Image(s) ``(..., C, Y, X)`` to float32 with channel ``c`` mapped from ``ranges[c]`` = (lo, hi) to (0, 1).

    The one normalisation rule of training and inference. ``image`` is a NumPy array, or a PyTorch tensor (on any
    device, so that inference can scale 8-bit pixels after copying them to a GPU); both compute in float32.
    """
    ranges = np.asarray(ranges, np.float32).reshape(-1, 2)
    lo = ranges[:, 0].reshape(-1, 1, 1)
    span = np.maximum(ranges[:, 1].reshape(-1, 1, 1) - lo, np.float32(1e-6))
    if isinstance(image, np.ndarray):
        scaled = image.astype(np.float32)  # one new array, then in place: this runs on every inference chunk
        scaled -= lo
        scaled /= span
        return scaled
    import torch  # a tensor was given: PyTorch is already loaded

    scaled = image.to(torch.float32, copy=True)
    scaled -= torch.as_tensor(lo, device=image.device)
    scaled /= torch.as_tensor(span, device=image.device)
    return scaled
