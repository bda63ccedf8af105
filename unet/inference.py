"""Predicting one output chunk of a slide: overlap tiles, batched forward passes, optional mirror
test-time augmentation and Gaussian blending. Framework-free; ``pipelines.infer`` schedules it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from unet.errors import UserError
from unet.geometry import round_up
from unet.model import UNet, autocast_context
from unet.tiling import Region, crop_to_tile, input_region, read_mirrored, tiles_of

Reader = Callable[[int, int, int, int], np.ndarray]
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class InputDataError(UserError):
    """Slide pixels that cannot be segmented (e.g. NaN)."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a chunk is predicted (see ``InferConfig`` for the meaning of each field)."""

    tile: int = 512
    batch_size: int = 4
    precision: str = "bf16"
    channels_last: bool = True
    tta: bool = False
    blend: str = "none"
    overlap: float = 0.25  # Gaussian blending only
    device: str = "cpu"


class ChunkPredictor:
    """Foreground probability of slide chunks with one model (prepared once, reused per chunk)."""

    def __init__(self, model: UNet, settings: InferenceSettings) -> None:
        if settings.tile % model.size_multiple:
            raise ValueError(f"tile {settings.tile} is not a multiple of {model.size_multiple}")
        self.device = torch.device(settings.device)
        self.model = model.eval().to(self.device)
        self.settings = settings
        if settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Foreground probability (N, H, W) of normalised images (N, C, H, W), mirror TTA if enabled."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total = None
        flips = FLIPS if self.settings.tta else FLIPS[:1]
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            with autocast_context(self.device.type, self.settings.precision):
                logits = self.model(xi)
            p = logits.float().softmax(dim=1)[:, 1:].sum(1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
        return (total / len(flips)).cpu().numpy()

    def predict_chunk(
        self,
        read: Reader,
        height: int,
        width: int,
        chunk: Region,
        normalize: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """Foreground probability (chunk.height, chunk.width) of one chunk of a (C, height, width) slide."""
        if self.settings.blend == "gaussian":
            return self._gaussian(read, height, width, chunk, normalize)
        halo, tile = self.model.halo, self.settings.tile
        out = np.zeros((chunk.height, chunk.width), np.float32)
        regions = tiles_of(chunk, tile, height, width)
        for start in range(0, len(regions), self.settings.batch_size):
            group = regions[start : start + self.settings.batch_size]
            inputs = np.stack([self._input(read, height, width, input_region(r, tile, halo), normalize) for r in group])
            for region, probability in zip(group, self.probabilities(inputs), strict=True):
                out[region.relative_to(chunk)] = crop_to_tile(probability, region, halo)
        return out

    def _input(self, read: Reader, height: int, width: int, region: Region, normalize) -> np.ndarray:
        window = read_mirrored(read, height, width, region)
        if window.dtype.kind == "f" and not np.isfinite(window).all():
            raise InputDataError(
                f"NaN or infinite pixels in the input around rows {max(region.y0, 0)}-{min(region.y1, height)}, "
                f"columns {max(region.x0, 0)}-{min(region.x1, width)}"
            )
        return normalize(window)

    def _gaussian(self, read: Reader, height: int, width: int, chunk: Region, normalize) -> np.ndarray:
        """MONAI sliding windows (Gaussian-weighted, ``overlap``) over the chunk and its halo."""
        from monai.inferers import sliding_window_inference

        halo, tile, multiple = self.model.halo, self.settings.tile, self.model.size_multiple
        region = Region(
            chunk.y0 - halo,
            chunk.y0 + round_up(chunk.height, multiple) + halo,
            chunk.x0 - halo,
            chunk.x0 + round_up(chunk.width, multiple) + halo,
        )
        image = self._input(read, height, width, region, normalize)[None]
        window = min(tile + 2 * halo, region.height, region.width)
        window -= window % multiple
        probability = sliding_window_inference(
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            roi_size=(window, window),
            sw_batch_size=self.settings.batch_size,
            predictor=lambda x: torch.from_numpy(self.probabilities(x.numpy()))[:, None],
            overlap=self.settings.overlap,
            mode="gaussian",
            padding_mode="reflect",
        )
        return probability[0, 0, halo : halo + chunk.height, halo : halo + chunk.width].numpy()
