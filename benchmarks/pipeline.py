"""The pipeline around the model: everything ``pipelines.infer`` does but the network, per CPU core and per stage.

On a GPU node the model is fast; what decides the end-to-end throughput is whether the CPU side (read, decode,
normalise, store, label, merge, objects, pyramid, encode, write, the receipt) keeps up. At 100 Mpx/s on a 16-core
node every core must carry >= 6.25 Mpx/s of it; the goal here is **8 Mpx/s per core** with the default outputs.

The network is replaced by a nearly free stand-in (``StandIn``: an elementwise function of the pixels, the
darkness of hematoxylin above a threshold, about a thousand nucleus-sized objects per Mpx on this H&E, a
realistic density at 20x), so the job measures the rest. The slide: the real CMU slide mirrored about its borders
to ``--side`` x ``--side`` (real tissue, made-up layout), Zarr in 512-px chunks, at the model's pixel size (no
resampling). Each job: ``pipelines.infer`` with ``configs/infer.yaml`` (probability, labels, pyramid, objects
table, receipt, QC picture, MLflow) in a process pinned to its cores (``sched_setaffinity``): 1 core; N cores in one
process (N Dask threads, N torch threads); N cores in N worker processes (``infer.workers``). "Mpx/s per core" is the
job's own segmentation throughput (past start-up; the objects table included) divided by N; "the stand-in's own
time left out" subtracts the time inside its forward.

GPU-like rows: the stand-in also waits as long as a GPU at the given input Mpx/s would take (80% of what N cores
managed in one process), in 100 steps per pass that each give the GIL back as a kernel launch does, with a GPU
worker's 8 tasks; "stand-in busy" is the share of the wall time it spent in its forward. They compare Python's GIL
switch interval (5 ms), a GPU worker's (0.5 ms), and that with labelling in post-processing processes
(``infer.postprocess_processes``). On a single slide the label pass, the pyramid and the finishing come after the
last prediction, so the stand-in idles then.

The profile (1 core): the wall time spent in each stage, measured by wrapping the functions that do it (only the
outermost stage counts within a thread: the slide's own reads inside the read stage, say); "Mpx/s alone" is the
rate that stage alone would allow on one core. On one core the threads take turns, so the stages add up to about
the wall time; what is left is Dask, the stream and Python. Then which steps give the GIL back (two threads against
one), and the candidates for two stages (hole filling and labelling; Zarr codecs), on one chunk of dense H&E.

    python -m benchmarks.pipeline [--side 10240] [--cores 2] [--slides FOLDER] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLE = "The pipeline around the model: Mpx/s per CPU core, by stage"
GOAL_PER_CORE = 8.0
PIXEL_SIZE_UM = 0.499  # the CMU slide's
STANDIN_ENV = "UNET_BENCHMARK_STANDIN"  # the stand-in's GPU-like rate, for worker processes
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
    import zarr

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
        (zarr.Array, "__getitem__", "read outputs back"),
        (slide, "_write_objects", "objects table"),
        (slide, "_write_qc_picture", "QC picture"),
        (slide, "_track", "MLflow run"),
        (output, "finalize_output", "metadata, rename"),
        (slide, "tissue_mask_for", "tissue mask"),
    ]:
        stages.wrap(owner, name, stage)


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


def dask_setup(worker) -> None:
    """Dask's preload hook: worker processes of a job with ``infer.workers`` > 1 predict with the stand-in too."""
    install_standin(float(os.environ[STANDIN_ENV]))


def job(slide: str, model: str, output: str, cores: int, tracking: str, profile: bool, gpu_mpx_s: float,
        workers: int = 1, switch: bool = True, postprocess: int = 0) -> dict:  # fmt: skip
    """(In its own process) ``pipelines.infer`` with the stand-in (``gpu_mpx_s`` > 0: as slow as a GPU that
    predicts so many input Mpx/s), on ``cores`` cores, in one process or ``workers`` worker processes; its stats,
    stages and the stand-in's busy seconds (in this process)."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from pipelines.infer.job import infer
    from unet.config import load_config
    from unet.config.infer import DEFAULT_TASKS_PER_WORKER

    standin = install_standin(gpu_mpx_s)
    if gpu_mpx_s:  # as a GPU worker sets it (pipelines.infer.tasks); ``switch`` 0: Python's default
        from pipelines.infer.tasks import GPU_SWITCH_INTERVAL_S

        sys.setswitchinterval(GPU_SWITCH_INTERVAL_S if switch else sys.getswitchinterval())
    os.environ[STANDIN_ENV] = str(gpu_mpx_s)  # worker processes (Dask's preload hook) and their affinity inherit it
    os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"] = '["benchmarks.pipeline"]'
    stages = Stages()
    if profile:
        instrument(stages)
    threads = DEFAULT_TASKS_PER_WORKER["cuda"] if gpu_mpx_s else max(1, cores // workers)  # a GPU worker runs 8
    overrides = [f"infer.input={slide}", f"infer.output={output}", f"infer.model={model}", f"infer.workers={workers}",
                 f"infer.postprocess_processes={postprocess}",
                 f"infer.tasks_per_worker={threads}", f"infer.pixel_size_um={PIXEL_SIZE_UM}",
                 f"tracking.tracking_uri={tracking}"]  # fmt: skip
    stats = infer(load_config(ROOT / "configs" / "infer.yaml", overrides))
    return {
        "cores": cores,
        "workers": workers,
        "switch": switch,
        "postprocess": postprocess,
        "gpu_mpx_s": gpu_mpx_s,
        "stats": stats,
        "stages": stages.seconds,
        "busy": standin.busy,
        "input_mpx": standin.pixels / 1e6,
    }


def make_slide(folder: Path, side: int) -> Path:
    """The real CMU slide mirrored to ``side`` x ``side`` (``benchmarks.inference.mirrored``)."""
    from benchmarks.inference import mirrored
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    path = folder / f"mirrored-{side}.zarr"
    if path.exists():
        return path
    real = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    return mirrored(real.read(0, real.height, 0, real.width), side, side, path)


def make_model(folder: Path) -> Path:
    """A U-Net folder (its weights unused) that says it was trained at the slide's pixel size."""
    import torch

    from benchmarks.models import with_resolution
    from unet.model import UNet
    from unet.model_files import save_weights

    torch.manual_seed(0)
    plain = save_weights(UNet(3, 2, base_channels=8).eval(), folder / "unet8")
    return with_resolution(plain, folder, PIXEL_SIZE_UM, {"p1": 2.9, "p50": 40.0, "p99": 120.0})


def gil_speedups(repeats: int = 8) -> dict[str, float]:
    """How much faster two threads run each CPU-side step than one (2.0: it gives the GIL back; 1.0: it holds it),
    on a dense 1024-px chunk of the real slide; ``zlib.compress`` for reference (it gives the GIL back)."""
    import zlib

    import numpy as np
    from scipy import ndimage as ndi

    from unet.instances import ChunkEdges, fill_holes_of, label_chunk
    from unet.objects import chunk_sums
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    real = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    image = real.read(1024, 2048, 1024, 2048)
    foreground = image.mean(axis=0) / 255 < DARK
    labels, count = label_chunk(foreground, True, 6)
    probability = np.random.default_rng(0).random(labels.shape)
    noise = np.random.default_rng(0).integers(0, 4, 4_000_000, np.uint8).tobytes()
    steps = {"zlib.compress (reference)": lambda: zlib.compress(noise, 1),
             "scipy ndimage.label": lambda: ndi.label(foreground),
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
    (scipy's iterated-dilation fill against the background labelling ``unet.instances`` does; cc3d and OpenCV when
    installed) and encoding + writing a chunk to Zarr (the output's probability and labels) with each codec."""
    import numpy as np
    import zarr
    from scipy import ndimage as ndi
    from zarr.codecs import BloscCodec, ZstdCodec

    from unet.instances import fill_holes_of
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    real = open_slide(fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs")
    foreground = real.read(1024, 2048, 1024, 2048).mean(axis=0) / 255 < DARK
    square = np.ones((3, 3), bool)
    ways = {"scipy: binary_fill_holes + label": lambda: ndi.label(ndi.binary_fill_holes(foreground, square)),
            "scipy: background labelling + label (used)": lambda: ndi.label(fill_holes_of(foreground))}  # fmt: skip
    with contextlib.suppress(ImportError):
        import cc3d

        ways["cc3d: background labelling + label"] = lambda: cc3d.connected_components(
            fill_holes_of(foreground), connectivity=4)  # fmt: skip
    labels = ndi.label(fill_holes_of(foreground))[0].astype(np.int32)
    probability = np.where(foreground, 230, 20).astype(np.uint8)
    codecs = {"zstd level 0 (Zarr's default, used)": ZstdCodec(level=0), "zstd level 1": ZstdCodec(level=1),
              "blosc lz4 + shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), "none": None}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, codec in codecs.items():
            for kind, data in (("probability uint8", probability), ("labels int32", labels)):
                array = zarr.create_array(f"{tmp}/{len(ways)}", shape=data.shape, chunks=data.shape, dtype=data.dtype,
                                          compressors=codec)  # fmt: skip
                ways[f"write {kind}, {name}"] = functools.partial(array.__setitem__, slice(None), data)
        return {name: _best_ms(way, repeats) for name, way in ways.items()}


def _best_ms(step, repeats: int) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def run(side: int = 10240, cores: int = 2, folder: Path | None = None, quick: bool = False) -> dict:
    """The jobs of the table, each in its own process: on 1 core (profiled), on ``cores`` cores in one process and
    in as many worker processes, then on ``cores`` with the stand-in as slow as a GPU feeding 80% of what one
    process managed, with Python's GIL switch interval, with a GPU worker's, and with its post-processing processes
    too (``quick``: only the last)."""
    load = os.getloadavg()[0]  # other processes on the machine share its cores: said with the figures
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        slide, model = make_slide(folder or work, side), make_model(work)
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        from pipelines import registry

        registry.connect(tracking)  # the database exists, as a user's does
        rows = [_job(slide, model, work, tracking, 1, profile=True)]
        if cores > 1:
            rows += [_job(slide, model, work, tracking, cores), _job(slide, model, work, tracking, cores, cores)]
        fastest = rows[-2] if cores > 1 else rows[0]
        mpx_s = 0.8 * fastest["stats"]["mpx_per_s"] * fastest["input_mpx"] / fastest["stats"]["megapixels"]
        ways = ((False, 0), (True, 0), (True, max(1, cores // 2)))  # the last: a GPU worker's
        for switch, postprocess in ways[-1:] if quick else ways:
            rows.append(
                _job(slide, model, work, tracking, cores, gpu_mpx_s=mpx_s, switch=switch, postprocess=postprocess)
            )
    return {
        "title": TITLE,
        "side": side,
        "rows": rows,
        "gil": gil_speedups(2 if quick else 8),
        "load": load,
        "libraries": libraries(2 if quick else 10),
    }


def _job(slide: Path, model: Path, work: Path, tracking: str, cores: int, workers: int = 1, profile: bool = False,
         gpu_mpx_s: float = 0.0, switch: bool = True, postprocess: int = 0) -> dict:  # fmt: skip
    out = work / f"out-{cores}-{workers}-{gpu_mpx_s:.0f}-{switch}-{postprocess}.ome.zarr"
    command = [sys.executable, "-m", "benchmarks.pipeline", "job", str(slide), str(model), str(out), "--tracking",
               tracking, "--cores", str(cores), "--workers", str(workers), "--gpu-mpx-s", str(gpu_mpx_s)]  # fmt: skip
    command += ["--profile"] if profile else []
    command += ([] if switch else ["--python-switch"]) + ["--postprocess", str(postprocess)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the job on {cores} core(s) failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {_described(row)}: {row['stats']['mpx_per_s']:.2f} Mpx/s, {row['stats']['objects']} objects", flush=True)
    return row


def _described(row: dict) -> str:
    where = "one process" if row["workers"] == 1 else f"{row['workers']} worker processes"
    if not row["gpu_mpx_s"]:
        return f"{where}, stand-in nearly free"
    interval = "a GPU worker's" if row["switch"] else "Python's default"
    pool = f", labelling in {row['postprocess']} post-processing process(es)" if row["postprocess"] else ""
    gpu = f"stand-in as slow as a GPU at {row['gpu_mpx_s']:.1f} input Mpx/s"
    return f"{where}, {gpu}, {interval} GIL switch interval{pool}"


def to_markdown(result: dict) -> str:
    lines = [f"Load average of the machine when the run began: {result['load']:.1f} (other processes than these jobs "
             "take cores from them).", "",
             "| cores | job | objects per Mpx | Mpx/s (past start-up) | Mpx/s per core | per core, the stand-in's own "
             "time left out | stand-in busy | goal (per core, stand-in left out) |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in result["rows"]:
        s, n, gpu = row["stats"], row["cores"], row["gpu_mpx_s"]
        in_process = row["workers"] == 1
        per_core = s["megapixels"] / (n * s["seconds"] - (row["busy"] if in_process else 0))
        busy = f"{row['busy'] / s['seconds']:.0%}" if in_process else ""
        goal = "" if gpu else f"{'met' if per_core >= GOAL_PER_CORE else 'not met'} (>= {GOAL_PER_CORE:g})"
        lines.append(f"| {n} | {_described(row)} | {s['objects'] / s['megapixels']:.0f} | {s['mpx_per_s']:.2f} | "
                     f"{s['mpx_per_s'] / n:.2f} | {'' if gpu else f'{per_core:.2f}'} | {busy} | {goal} |")  # fmt: skip
    profiled = result["rows"][0]
    mpx, wall = profiled["stats"]["megapixels"], profiled["stats"]["seconds"]
    lines += ["", f"Profile on 1 core, {mpx:.0f} Mpx in {wall:.1f} s (segmenting, the objects table included; the "
              "slide's MLflow run, NGFF metadata and rename come after):", "",
              "| stage | seconds | share of the wall time | Mpx/s alone |", "|---|---:|---:|---:|"]  # fmt: skip
    for stage, seconds in sorted(profiled["stages"].items(), key=lambda item: -item[1]):
        lines.append(f"| {stage} | {seconds:.2f} | {seconds / wall:.0%} | {mpx / seconds:.1f} |")
    lines += [
        "",
        "Which steps give the GIL back (two threads against one on a dense 1024-px chunk, in this process; "
        "2.0: fully parallel, 1.0: the GIL held):",
        "",
        "| step | speed-up with 2 threads |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {speedup:.2f} |" for name, speedup in result["gil"].items()]
    lines += [
        "",
        "Candidates per stage, one 1024-px chunk of dense H&E (best of 10; cc3d only where installed: "
        "`pip install connected-components-3d`):",
        "",
        "| way | ms per chunk |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in result["libraries"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="run", choices=["run", "job"])
    parser.add_argument("paths", nargs="*", help="job: SLIDE MODEL OUTPUT")
    parser.add_argument("--side", type=int, default=10240, help="the mirrored slide's side (px)")
    parser.add_argument("--cores", type=int, default=2, help="the most cores a job gets (job: its cores)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tracking", default="sqlite:///mlflow.db")
    parser.add_argument("--python-switch", action="store_true", help="job, GPU-like: Python's GIL switch interval")
    parser.add_argument("--postprocess", type=int, default=0, help="job: infer.postprocess_processes")
    parser.add_argument("--workers", type=int, default=1, help="job: Dask worker processes (1: in this process)")
    parser.add_argument("--gpu-mpx-s", type=float, default=0.0, help="job: make the stand-in as slow as such a GPU")
    parser.add_argument("--slides", type=Path, default=None, help="keep the made-up slide here between runs")
    parser.add_argument("--quick", action="store_true", help="a 2048-px slide, 1 core: a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if args.what == "job":
        print(json.dumps(job(*args.paths, args.cores, args.tracking, args.profile, args.gpu_mpx_s, args.workers,
                             not args.python_switch, args.postprocess),
                         default=float))  # fmt: skip
        return 0
    side, cores = (2048, 1) if args.quick else (args.side, args.cores)
    result = run(side, cores, args.slides, args.quick)
    table = to_markdown(result)
    print(table)
    if not args.quick:
        from benchmarks.run import write_section

        command = "python -m benchmarks.pipeline " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(args.output, TITLE, (__doc__ or "").strip(), table, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
