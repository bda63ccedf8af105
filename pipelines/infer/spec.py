"""What a worker needs to process a slide's chunks: the model (``ModelSpec``) and the slide's own settings
(``JobSpec``). Both are small and picklable: they travel with every task, and a worker caches by them."""

from __future__ import annotations

from dataclasses import dataclass

from unet.inference import InferenceSettings
from unet.segmentation import ObjectRule
from unet.tiling import Region


@dataclass(frozen=True)
class ModelSpec:
    """Which model a worker predicts with, and how (small and picklable; one per job, whatever the slides)."""

    model_uri: str  # resolved: models:/NAME/VERSION or a local folder
    tracking_uri: str | None
    settings: InferenceSettings
    threads: int  # torch threads per worker process; 0 leaves them as they are


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to process chunks of one slide (small and picklable)."""

    input: str
    level: int  # the level read
    scale: float  # its pixels per output pixel (unet.resolution): 1 reads it as stored
    output: str  # the Zarr group being written
    model: ModelSpec
    chunk: int
    intensity_range: tuple[tuple[float, float], ...]
    levels: tuple[tuple[int, int], ...]  # (height, width) of each pyramid level, level 0 first
    objects: bool  # measure every object for the objects table
    rule: ObjectRule  # how its probability becomes objects
    resumed: bool = False  # its output holds chunks done before an interruption (else no completion record is read)
    postprocess_processes: int | None = None  # processes per worker labelling and measuring chunks (0: the task;
    # None: infer.postprocess_processes's default, taken on the worker, whose cores it counts)
    read_cache_mb: int = 0  # decoded input chunks kept per worker process (unet.slides.tiles)

    def region(self, key: tuple[int, int], height: int, width: int) -> Region:
        row, col = key
        y0, x0 = row * self.chunk, col * self.chunk
        return Region(y0, min(y0 + self.chunk, height), x0, min(x0 + self.chunk, width))
