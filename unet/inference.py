"""Predicting one output chunk of a slide: the chunk and its halo read once, then one forward pass
(or equal tiles when one pass would not fit in memory), optional mirror test-time augmentation and
Gaussian blending. Framework-free; ``pipelines.infer`` schedules it.

Several threads may share one ``ChunkPredictor``: forward passes run one at a time on its model
thread, so one chunk is read, normalised, written and labelled while the model runs on another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from unet.config import InferConfig
from unet.devices import compute_precision, pass_budget_mb
from unet.errors import UserError
from unet.fused import inference_model
from unet.geometry import round_up
from unet.intensity import scale_intensity
from unet.model import UNet, autocast_context
from unet.tiling import Region, crop, grid, input_region, read_mirrored, tiles_of

Reader = Callable[[int, int, int, int], np.ndarray]
Ranges = Sequence[tuple[float, float]]
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
# Measured peak memory of one forward pass, per pixel and per base channel (docs/benchmarks.md: about 14 bytes
# in bf16, 25 in fp32, on top of the model); rounded up so that the estimate errs on the safe side.
PASS_BYTES_PER_PIXEL_AND_CHANNEL = {"bf16": 16, "fp16": 16, "fp32": 32}

log = logging.getLogger(__name__)
_INFER = InferConfig.model_fields


class InputDataError(UserError):
    """Slide pixels that cannot be segmented (e.g. NaN)."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a chunk is predicted (see ``InferConfig`` for the meaning of each field; its defaults are the
    ``infer`` section's, and ``from_config`` builds the settings from a config)."""

    tile: int | None = _INFER["tile_size"].default  # output tile side; None: the whole chunk in one pass
    batch_size: int = _INFER["batch_size"].default
    precision: str = _INFER["precision"].default
    channels_last: bool = _INFER["channels_last"].default
    tta: bool = _INFER["tta"].default
    blend: str = _INFER["blend"].default
    overlap: float = _INFER["blend_overlap"].default  # Gaussian blending only
    device: str = _INFER["device"].default
    pass_memory_mb: int | None = _INFER["pass_memory_mb"].default  # of one pass; None: the device's; 0: no limit
    compile: bool = _INFER["compile"].default  # torch.compile the model

    @classmethod
    def from_config(cls, infer: InferConfig, device: str | None = None) -> InferenceSettings:
        """The settings of the ``infer`` section: the one place they are built, for every predicting job
        (inference, evaluation, validation during training); ``device`` overrides ``infer.device``."""
        return cls(
            tile=infer.tile_size,
            batch_size=infer.batch_size,
            precision=infer.precision,
            channels_last=infer.channels_last,
            tta=infer.tta,
            blend=infer.blend,
            overlap=infer.blend_overlap,
            device=device or infer.device,
            pass_memory_mb=infer.pass_memory_mb,
            compile=infer.compile,
        )


def pass_memory_mb(model: UNet, height: int, width: int, batch: int, precision: str) -> float:
    """Estimated peak memory (MB) of one forward pass over ``batch`` inputs of ``height`` x ``width`` pixels."""
    per_pixel = model.base_channels * PASS_BYTES_PER_PIXEL_AND_CHANNEL[precision] + 4 * model.n_channels
    return batch * height * width * per_pixel / 1e6


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """(N, H, W) probability of any class but background (class 0) from (N, K, H, W) logits: the softmax's; for
    two classes the sigmoid of their difference (the same function, in half the time)."""
    if logits.shape[1] == 2:
        return torch.sigmoid(logits[:, 1] - logits[:, 0])
    return logits.softmax(dim=1)[:, 1:].sum(1)


class ChunkPredictor:
    """Foreground probability of slide chunks with one model (prepared once, reused per chunk and thread)."""

    def __init__(self, model: UNet, settings: InferenceSettings) -> None:
        if settings.tile is not None and settings.tile % model.size_multiple:
            raise ValueError(f"tile {settings.tile} is not a multiple of {model.size_multiple}")
        self.device = torch.device(settings.device)
        self.model = inference_model(model, settings.channels_last).to(self.device)
        if self.device.type == "cuda" and not torch.backends.cudnn.deterministic:  # train.deterministic keeps its own
            torch.backends.cudnn.benchmark = True  # a handful of pass shapes per slide: tune each once
        if settings.compile:
            self.model = torch.compile(self.model)
        self.settings = settings
        self.precision = compute_precision(settings.precision, self.device)  # infer.precision's auto made concrete
        self.pass_limit_mb = pass_budget_mb(self.device) if settings.pass_memory_mb is None else settings.pass_memory_mb
        self.halo, self.multiple = model.halo, model.size_multiple
        self.largest_tile: int | None = None  # set once a pass did not fit
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet-model")
        self._fallback_lock = threading.Lock()
        self._copy_streams = threading.local()  # CUDA: each calling thread copies its inputs on its own stream

    def close(self) -> None:
        """Stop the model thread (a predictor made for one validation pass is not kept)."""
        self._model_thread.shutdown(wait=True)

    def __enter__(self) -> ChunkPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probabilities(self, batch: np.ndarray, intensity_range: Ranges | None = None) -> np.ndarray:
        """Foreground probability (N, H, W) of images (N, C, H, W), normalised already or by ``intensity_range``
        (see ``predict_chunk``), mirror TTA if enabled.

        Every pass runs on the predictor's one model thread, whichever thread asks: one pass at a time, and
        one OpenMP team (teams of several calling threads would spin against each other on a CPU). On CUDA the
        calling thread copies its batch to the GPU first, on its own stream, while the model runs the pass before.
        """
        x, copied = self._to_device(batch, intensity_range)
        return self._model_thread.submit(self._probabilities, x, copied).result()

    def _to_device(self, batch: np.ndarray, intensity_range: Ranges | None) -> tuple[torch.Tensor, object | None]:
        """The batch as a float tensor on the device (normalised if a range is given), and on CUDA the event that
        marks the end of its copy."""
        if self.device.type != "cuda":
            if intensity_range is not None:
                batch = scale_intensity(batch, intensity_range)
            return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)), None
        stream = getattr(self._copy_streams, "stream", None)
        if stream is None:
            stream = self._copy_streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            x = torch.from_numpy(np.ascontiguousarray(batch))
            x = x.pin_memory().to(self.device, non_blocking=True)  # pinned blocks come from torch's host cache
            x = scale_intensity(x, intensity_range) if intensity_range is not None else x.float()
            return x, stream.record_event()

    @torch.inference_mode()
    def _probabilities(self, x: torch.Tensor, copied: torch.cuda.Event | None) -> np.ndarray:
        if copied is not None:  # the pass waits for the copy, and the copy's memory lives until the pass is done
            torch.cuda.current_stream(self.device).wait_event(copied)
            x.record_stream(torch.cuda.current_stream(self.device))
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total = None
        flips = FLIPS if self.settings.tta else FLIPS[:1]
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            with autocast_context(self.device.type, self.precision):
                logits = self.model(xi)
            p = foreground_probability(logits.float())
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
        return (total / len(flips)).cpu().numpy()

    def predict_chunk(
        self,
        read: Reader,
        height: int,
        width: int,
        chunk: Region,
        intensity_range: Ranges | None = None,
    ) -> np.ndarray:
        """Foreground probability (chunk.height, chunk.width) of one chunk of a (C, height, width) slide.

        ``intensity_range`` (per channel, lo and hi) is mapped to (0, 1) by the training rule
        (``unet.intensity.scale_intensity``): on a CPU right after reading, on a GPU after the copy (8-bit pixels
        cross the bus as they are stored); None uses the pixels as they are.
        """
        window_region = input_region(chunk, self.halo, self.multiple)
        window = self._read(read, height, width, window_region)  # the chunk and its halo, read once
        if intensity_range is not None and (self.device.type != "cuda" or self.settings.blend == "gaussian"):
            window, intensity_range = scale_intensity(window, intensity_range), None
        if self.settings.blend == "gaussian":
            return self._gaussian(window, chunk)  # MONAI's own windows over the chunk and its halo
        while True:
            tile = self.tile_for(chunk)
            try:
                return self._predict_tiles(window, window_region, chunk, tile, intensity_range)
            except torch.cuda.OutOfMemoryError:
                if tile <= self.multiple:
                    raise
                torch.cuda.empty_cache()
                self._fall_back(round_up(tile // 2, self.multiple), f"{self.settings.device} ran out of memory")

    def tile_for(self, chunk: Region) -> int:
        """The output tile side for ``chunk``: the configured tile (or the whole chunk), halved while one
        pass would exceed ``pass_limit_mb`` (``infer.pass_memory_mb``, or the device's budget)."""
        tile = wanted = self.settings.tile or max(chunk.height, chunk.width)
        if self.largest_tile is not None:
            tile = min(tile, self.largest_tile)
        limit = self.pass_limit_mb
        while limit and tile > self.multiple and self._estimate(chunk, tile) > limit:
            tile = round_up(tile // 2, self.multiple)
        if tile < wanted:
            self._fall_back(tile, f"one pass over {wanted} px would need more than infer.pass_memory_mb={limit}")
        return tile

    def _estimate(self, chunk: Region, tile: int) -> float:
        tiles = tiles_of(chunk, tile, chunk.y1, chunk.x1)
        largest = input_region(tiles[0], self.halo, self.multiple)  # the first tile is a whole one
        batch = min(self.settings.batch_size, len(tiles))
        return pass_memory_mb(self.model, largest.height, largest.width, batch, self.precision)

    def _fall_back(self, tile: int, reason: str) -> None:
        with self._fallback_lock:
            if self.largest_tile is None or tile < self.largest_tile:
                log.info("%s: predicting chunks in tiles of %d px from now on", reason, tile)
                self.largest_tile = tile

    def _predict_tiles(
        self, window: np.ndarray, window_region: Region, chunk: Region, tile: int, intensity_range: Ranges | None
    ) -> np.ndarray:
        """Predict ``chunk`` from its ``window`` in output tiles of ``tile``, batching tiles of equal input size."""
        out = np.empty((chunk.height, chunk.width), np.float32)
        by_shape: dict[tuple[int, int], list[Region]] = {}
        for region in tiles_of(chunk, tile, chunk.y1, chunk.x1):
            needed = input_region(region, self.halo, self.multiple)
            by_shape.setdefault((needed.height, needed.width), []).append(region)
        for regions in by_shape.values():
            for start in range(0, len(regions), self.settings.batch_size):
                group = regions[start : start + self.settings.batch_size]
                needed = [input_region(r, self.halo, self.multiple) for r in group]
                views = [window[(slice(None), *n.relative_to(window_region))] for n in needed]
                inputs = views[0][None] if len(views) == 1 else np.stack(views)  # one tile: no copy yet
                probabilities = self.probabilities(inputs, intensity_range)
                for region, n, probability in zip(group, needed, probabilities, strict=True):
                    out[region.relative_to(chunk)] = crop(probability, region, n)
        return out

    def _read(self, read: Reader, height: int, width: int, region: Region) -> np.ndarray:
        window = read_mirrored(read, height, width, region)
        if window.dtype.kind == "f" and not np.isfinite(window).all():
            raise InputDataError(
                f"NaN or infinite pixels in the input around rows {max(region.y0, 0)}-{min(region.y1, height)}, "
                f"columns {max(region.x0, 0)}-{min(region.x1, width)}"
            )
        return window

    def _gaussian(self, window: np.ndarray, chunk: Region) -> np.ndarray:
        """MONAI sliding windows (Gaussian-weighted, ``overlap``) over the chunk and its halo."""
        from monai.inferers import sliding_window_inference

        halo, multiple = self.halo, self.multiple
        tile = self.settings.tile or round_up(max(chunk.height, chunk.width), multiple)
        size = min(tile + 2 * halo, window.shape[1], window.shape[2])
        size -= size % multiple
        window_region = input_region(chunk, halo, multiple)
        probability = sliding_window_inference(
            torch.from_numpy(np.ascontiguousarray(window[None], dtype=np.float32)),
            roi_size=(size, size),
            sw_batch_size=self.settings.batch_size,
            predictor=lambda x: torch.from_numpy(self.probabilities(x.numpy()))[:, None],
            overlap=self.settings.overlap,
            mode="gaussian",
            padding_mode="reflect",
        )
        return crop(probability[0, 0].numpy(), chunk, window_region)


def predict_image(
    predictor: ChunkPredictor, image: np.ndarray, intensity_range: Ranges | None, chunk: int
) -> np.ndarray:
    """Foreground probability (H, W) of a whole (C, H, W) image, predicted chunk by chunk exactly as
    ``pipelines.infer`` predicts a slide with ``infer.chunk_size`` = ``chunk``: the one prediction path of
    validation, evaluation, the MLflow model and inference. ``intensity_range`` normalises the pixels as stored
    (None: they are normalised already)."""
    height, width = image.shape[-2:]
    probability = np.empty((height, width), np.float32)
    read = lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1]  # noqa: E731
    for _, region in grid(height, width, chunk):
        probability[region.slices] = predictor.predict_chunk(read, height, width, region, intensity_range)
    return probability
