"""The parts of ``benchmarks.pipeline``: the stand-in network, the profile of stages, and the measurements on one
chunk (which steps give the GIL back; the candidates for labelling and for the output's codec)."""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from pathlib import Path

LAUNCHES = 100  # kernel launches of one U-Net forward pass on a GPU (depth 4: ~25 layers, a few kernels each)
DARK = 0.45  # the stand-in's threshold on the mean of the normalised channels (H&E nuclei are the darkest)


def standin_class():
    """The stand-in network (a ``UNet`` subclass, so the predictor prepares it as it would the real one)."""
    import torch

    from unet.model import UNet

    class StandIn(UNet):
        seconds_per_mpx = 0.0  # > 0: also wait this long per input Mpx, as for a GPU (the GIL released)
        busy = 0.0  # seconds inside forward (one pass at a time: the predictor's model thread)
        pixels = 0  # input pixels seen (the chunks and their halos)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            started = time.perf_counter()
            darkness = (DARK - x.float().mean(dim=1, keepdim=True)) * 40
            logits = torch.cat([torch.zeros_like(darkness), darkness], dim=1)
            if self.seconds_per_mpx:  # in as many steps as a U-Net launches kernels, each giving the GIL back
                seconds = x.shape[0] * x.shape[-2] * x.shape[-1] / 1e6 * self.seconds_per_mpx
                for _ in range(LAUNCHES):
                    time.sleep(seconds / LAUNCHES)
            type(self).busy += time.perf_counter() - started
            type(self).pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
            return logits

    return StandIn


class Stages:
    """Wall seconds per stage, counted by the outermost wrapped function of each thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock, self._inside = threading.Lock(), threading.local()

    def wrap(self, owner: object, name: str, stage: str) -> None:
        function = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if getattr(self._inside, "stage", None):
                return function(*args, **kwargs)
            self._inside.stage, started = stage, time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._inside.stage = None
                with self._lock:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
                    self.calls[stage] = self.calls.get(stage, 0) + 1

        setattr(owner, name, timed)


def instrument(stages: Stages) -> None:
    """Wrap the functions of each stage (see ``Stages``)."""
    import pipelines.infer.output as output
    import pipelines.infer.slide as slide
    import pipelines.infer.tasks as tasks
    import unet.inference as inference
    import unet.instances as instances
    from unet.segmentation import ObjectRule
    from unet.slides.base import Slide

    for owner, name, stage in [
        (Slide, "read", "read, decode input"),
        (inference, "scale_intensity", "normalise"),
        (inference.ChunkPredictor, "probabilities", "model (stand-in)"),
        (ObjectRule, "store", "store probability"),
        (ObjectRule, "label_chunk", "label chunk"),
        (instances.ChunkEdges, "of", "label chunk"),
        (instances, "merge_chunks", "merge seams"),
        (tasks, "relabel", "relabel"),
        (tasks, "chunk_counts", "receipt counts"),
        (tasks, "chunk_sums", "objects"),
        (tasks, "mean_2x2", "pyramid"),
        (tasks, "nearest_2x2", "pyramid"),
        (tasks, "write_block", "encode, write"),
        (tasks, "read", "read outputs back"),
        (slide, "_write_objects", "objects table"),
        (slide, "_write_qc_picture", "QC picture"),
        (slide, "_track", "MLflow run"),
        (output, "finalize_output", "metadata, rename"),
        (slide, "tissue_mask_for", "tissue mask"),
    ]:
        stages.wrap(owner, name, stage)


GPU_WORK = "a GPU's work"


def device_work() -> Stages:
    """Seconds this process spends, as the stage ``GPU_WORK``, on what a GPU worker does on its GPU: normalising the
    pixels (``scale_intensity``, after the copy on CUDA) and the model thread's pass
    (``ChunkPredictor._probabilities``: memory layout, forward, probability)."""
    import unet.inference as inference

    work = Stages()
    for owner, name in ((inference, "scale_intensity"), (inference.ChunkPredictor, "_probabilities")):
        work.wrap(owner, name, GPU_WORK)
    return work


def install_standin(gpu_mpx_s: float):
    """Make ``pipelines.models.load_model`` in this process return the stand-in (the model it loads, its forward
    replaced); returns the stand-in's class (its ``busy`` seconds)."""
    import pipelines.models

    load, standin = pipelines.models.load_model, standin_class()
    standin.seconds_per_mpx = 1 / gpu_mpx_s if gpu_mpx_s else 0.0

    def stand_in(uri: str, **kwargs):
        model = load(uri, **kwargs)
        model.__class__ = standin
        return model

    pipelines.models.load_model = stand_in
    return standin


def gil_speedups(repeats: int = 8) -> dict[str, float]:
    """How much faster two threads run each CPU-side step than one (2.0: it gives the GIL back; 1.0: it holds it),
    on a dense 1024-px chunk of the real slide; ``zlib.compress`` for reference (it gives the GIL back)."""
    import zlib

    import numpy as np
    from scipy import ndimage as ndi

    from unet.instances import ChunkEdges, connected, fill_holes_of, label_chunk
    from unet.objects import chunk_sums
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    real = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    image = real.read(1024, 2048, 1024, 2048)
    foreground = image.mean(axis=0) / 255 < DARK
    labels, count, _ = label_chunk(foreground, True, 6)
    probability = np.random.default_rng(0).random(labels.shape)
    noise = np.random.default_rng(0).integers(0, 4, 4_000_000, np.uint8).tobytes()
    steps = {"zlib.compress (reference)": lambda: zlib.compress(noise, 1),
             "scipy ndimage.label": lambda: ndi.label(foreground),
             "cc3d connected components (unet.instances.connected, used)": lambda: connected(foreground, 4),
             "hole filling (unet.instances)": lambda: fill_holes_of(foreground),
             "seam edges (ChunkEdges.of)": lambda: ChunkEdges.of(labels, count),
             "objects' sums (unet.objects.chunk_sums)": lambda: chunk_sums(labels, probability, image, 0, 0),
             "np.bincount with weights": lambda: np.bincount(labels.ravel(), probability.ravel())}  # fmt: skip
    speedups = {}
    for name, step in steps.items():

        def work(step=step) -> None:
            for _ in range(repeats):
                step()

        work()
        started = time.perf_counter()
        work(), work()
        alone = time.perf_counter() - started
        threads = [threading.Thread(target=work) for _ in range(2)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        speedups[name] = alone / (time.perf_counter() - started)
    return speedups


def libraries(repeats: int = 10) -> dict[str, float]:
    """Milliseconds per 1024-px chunk of dense H&E of the candidates for two stages: labelling with hole filling
    (scipy's iterated-dilation fill, the background labelled once with scipy, and with cc3d as ``unet.instances``
    does) and encoding + writing a chunk to Zarr (the stand-in's probability as stored, and its labels) with each
    codec, Zarr's check for an empty chunk on and off."""
    import numpy as np
    import zarr
    from scipy import ndimage as ndi
    from zarr.codecs import BloscCodec, ZstdCodec

    from unet.instances import connected, fill_holes_of
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    real = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    darkness = (DARK - real.read(1024, 2048, 1024, 2048).mean(axis=0) / 255) * 40
    probability = np.round(255 / (1 + np.exp(-darkness))).astype(np.uint8)  # the stand-in's, as stored
    foreground = probability > 127
    square = np.ones((3, 3), bool)

    def scipy_background() -> tuple:  # unet.instances.fill_holes_of before cc3d
        background, count = ndi.label(~foreground, structure=square)
        open_to_border = np.zeros(count + 1, bool)
        open_to_border[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
        open_to_border[0] = False
        return ndi.label(~open_to_border[background])

    ways = {"scipy: binary_fill_holes + label": lambda: ndi.label(ndi.binary_fill_holes(foreground, square)),
            "scipy: background labelling + label": scipy_background,
            "cc3d: background labelling + label (used)": lambda: connected(fill_holes_of(foreground), 4)}  # fmt: skip
    labels = connected(fill_holes_of(foreground), 4)[0]
    codecs = {"zstd level 3 (Zarr's default)": ZstdCodec(level=0), "zstd level 1": ZstdCodec(level=1),
              "blosc lz4 + shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), "none": None}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, codec in codecs.items():
            for empty in (False, True):
                for kind, data in (("probability uint8", probability), ("labels int32", labels)):
                    array = zarr.create_array(f"{tmp}/{len(ways)}", shape=data.shape, chunks=data.shape,
                                              dtype=data.dtype, compressors=codec,
                                              config={"write_empty_chunks": empty})  # fmt: skip
                    used = " (used)" if empty and name == "zstd level 1" else ""
                    check = "no empty-chunk check" if empty else "empty-chunk check"
                    write = functools.partial(array.__setitem__, slice(None), data)
                    write()
                    stored = sum(f.stat().st_size for f in Path(tmp, str(len(ways)), "c").rglob("*") if f.is_file())
                    ways[f"write {kind}, {name}, {check}{used} ({data.nbytes / stored:.1f}x smaller)"] = write
        return {name: _best_ms(way, repeats) for name, way in ways.items()}


def _best_ms(step, repeats: int) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best * 1000


HANDOFF_CHUNK = 2048  # a GPU worker's chunk (``DEFAULT_CHUNK_SIZE['cuda']``)
HANDOFF_RATE = 24  # chunks a second: 100 Mpx/s, the GPU goal


def handoff(chunks: int = 48) -> dict[str, float]:
    """A GPU worker's model thread (``LAUNCHES`` launches a pass, each a little Python and a wait with the GIL given
    back, a pass per chunk at ``HANDOFF_RATE``) beside the hand-off of ``chunks`` 2048-px chunks of real H&E to a
    post-processing process at that rate: its median pass (ms) alone, with each chunk's probability and pixels sent
    to the process (pickled, as before), and with neither sent (the process reads them back from Zarr, as now)."""
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import zarr

    from unet.samples import fetch_samples
    from unet.slides import open_slide

    real = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    image = np.pad(real.read(0, min(real.height, HANDOFF_CHUNK), 0, min(real.width, HANDOFF_CHUNK)),
                   [(0, 0), (0, max(0, HANDOFF_CHUNK - real.height)), (0, max(0, HANDOFF_CHUNK - real.width))],
                   mode="reflect")  # fmt: skip
    probability = np.round(255 / (1 + np.exp((image.mean(axis=0) / 255 - DARK) * 40))).astype(np.uint8)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # a GPU worker's (pipelines.infer.tasks.GPU_SWITCH_INTERVAL_S)
    try:
        with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
            zarr.create_array(f"{tmp}/probability", data=probability, chunks=probability.shape)
            zarr.create_array(f"{tmp}/image", data=image, chunks=(3, 512, 512))
            pool.submit(_post_process, tmp, None, None).result()  # started and warm
            sent = {"model thread alone": None, "chunks handed off, their pixels sent": (probability, image),
                    "chunks handed off, read back from Zarr (used)": (None, None)}  # fmt: skip
            return {name: _model_passes(pool, tmp, pixels, chunks) for name, pixels in sent.items()}
    finally:
        sys.setswitchinterval(switch)


def _model_passes(pool, folder: str, pixels: tuple | None, chunks: int) -> float:
    """The model thread's median pass (ms) while ``chunks`` chunks are handed off (``pixels`` None: none)."""
    import numpy as np

    stop, passes = threading.Event(), []

    def model() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            for _ in range(LAUNCHES):
                sum(range(200))  # a launch's Python
                time.sleep(1 / HANDOFF_RATE / LAUNCHES * 0.8)  # the GPU at work, the GIL given back
            passes.append(time.perf_counter() - started)

    thread = threading.Thread(target=model)
    thread.start()
    futures = []
    for _ in range(chunks):
        if pixels is not None:
            futures.append(pool.submit(_post_process, folder, *pixels))
        time.sleep(1 / HANDOFF_RATE)
    for future in futures:
        future.result()
    stop.set()
    thread.join()
    return float(np.median(passes)) * 1000


def _post_process(folder: str, probability, image) -> int:
    """The post-processing process's side of ``handoff``: the chunk as sent, or read back from Zarr."""
    import numpy as np
    import zarr

    if probability is None:
        probability = np.asarray(zarr.open_array(f"{folder}/probability", mode="r")[:])
        image = np.asarray(zarr.open_array(f"{folder}/image", mode="r")[:])
    return int(probability.size + image.size)
