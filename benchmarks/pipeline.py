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
process (N Dask threads, N torch threads); N cores in N worker processes (``infer.workers``); all in the CPU's
default 1024-px chunks; and 1 core in a GPU worker's chunks (2048 px, one pass each, as a GPU's memory holds).
"Mpx/s per core" is the job's own segmentation throughput (past start-up; the objects table included) divided by
N; "the stand-in's own time left out" subtracts the time inside its forward (the goal is judged on it); "a GPU's
work left out" also subtracts what a GPU worker does on its GPU: normalising the pixels (after the copy on CUDA)
and the model thread's pass (memory layout, forward, probability).

GPU-like rows (a GPU worker's chunks): the stand-in also waits as long as a GPU at the given input Mpx/s would take
(80% of what N cores managed in one process), in 100 steps per pass that each give the GIL back as a kernel launch
does, with a GPU worker's 8 tasks; "stand-in busy" is the share of the wall time it spent in its forward. They
compare Python's GIL switch interval (5 ms), a GPU worker's (0.5 ms), and that with labelling in post-processing
processes (``infer.postprocess_processes``). On a single slide the label pass, the pyramid and the finishing come
after the last prediction, so the stand-in idles then.

Then the GIL that the job's process holds, by part, in a GPU worker's layout (its chunks, labelling in
post-processing processes, the stand-in nearly free), sampled by py-spy (``--gil``) in ``GIL_REPEATS`` runs: one
process drives a GPU node's GPU, and what holds its GIL runs on one core at a time, so ``megapixels / held seconds``
bounds what that process can drive however many cores the node has. Then how a GPU worker's model thread fares
beside the hand-off of chunks to a post-processing process at 100 Mpx/s, with their pixels sent (pickled) or read
back from Zarr by that process (as the job does).

The profile (1 core, the first row): the wall time spent in each stage, measured by wrapping the functions that do
it (only the outermost stage counts within a thread: the slide's own reads inside the read stage, say); "Mpx/s
alone" is the rate that stage alone would allow on one core. On one core the threads take turns, so the stages add
up to about the wall time; what is left is Dask, the stream and Python. The stages marked "after" come once the
slide is segmented (not in its time). Then which steps give the GIL back (two threads against one), and the
candidates for two stages (labelling with hole filling; the output's codec, and Zarr's check for an all-zero
chunk), on one 1024-px chunk of dense H&E.

    python -m benchmarks.pipeline [--side 10240] [--cores 2] [--slides FOLDER] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import gil_profile
from benchmarks.pipeline_parts import (
    GPU_WORK,
    HANDOFF_CHUNK,
    HANDOFF_RATE,
    LAUNCHES,
    Stages,
    device_work,
    gil_speedups,
    handoff,
    install_standin,
    instrument,
    libraries,
)

ROOT = Path(__file__).resolve().parents[1]
TITLE = "The pipeline around the model: Mpx/s per CPU core, by stage"
GOAL_PER_CORE = 8.0
GIL_REPEATS = 3  # the GIL-held seconds vary by ~15% from run to run (the holder preempted on busy cores counts)
AFTER = ("MLflow run", "metadata, rename", "QC picture")  # profiled stages after the slide's segmenting time
PIXEL_SIZE_UM = 0.499  # the CMU slide's
STANDIN_ENV = "UNET_BENCHMARK_STANDIN"  # the stand-in's GPU-like rate, for worker processes


def dask_setup(worker) -> None:
    """Dask's preload hook: worker processes of a job with ``infer.workers`` > 1 predict with the stand-in too."""
    install_standin(float(os.environ[STANDIN_ENV]))


def job(slide: str, model: str, output: str, cores: int, tracking: str, profile: bool, gpu_mpx_s: float,
        workers: int = 1, switch: bool = True, postprocess: int = 0, gpu_chunks: bool = False) -> dict:  # fmt: skip
    """(In its own process) ``pipelines.infer`` with the stand-in (``gpu_mpx_s`` > 0: as slow as a GPU that
    predicts so many input Mpx/s), on ``cores`` cores, in one process or ``workers`` worker processes, in chunks of
    the CPU's default size or (``gpu_chunks``) a GPU worker's, one pass each; its stats, stages and the stand-in's
    busy seconds (in this process)."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from pipelines.infer.job import infer
    from unet.config import load_config
    from unet.config.infer import DEFAULT_CHUNK_SIZE, DEFAULT_TASKS_PER_WORKER

    standin = install_standin(gpu_mpx_s)
    if gpu_mpx_s:  # as a GPU worker sets it (pipelines.infer.tasks); ``switch`` 0: Python's default
        from pipelines.infer.tasks import GPU_SWITCH_INTERVAL_S

        sys.setswitchinterval(GPU_SWITCH_INTERVAL_S if switch else sys.getswitchinterval())
    os.environ[STANDIN_ENV] = str(gpu_mpx_s)  # worker processes (Dask's preload hook) and their affinity inherit it
    os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"] = '["benchmarks.pipeline"]'
    stages, device = Stages(), device_work()
    if profile:
        instrument(stages)
    threads = DEFAULT_TASKS_PER_WORKER["cuda"] if gpu_mpx_s else max(1, cores // workers)  # a GPU worker runs 8
    overrides = [f"infer.input={slide}", f"infer.output={output}", f"infer.model={model}", f"infer.workers={workers}",
                 f"infer.postprocess_processes={postprocess}",
                 f"infer.tasks_per_worker={threads}", f"infer.pixel_size_um={PIXEL_SIZE_UM}",
                 f"tracking.tracking_uri={tracking}"]  # fmt: skip
    if gpu_chunks:  # a GPU's memory holds a whole chunk's pass (infer.pass_memory_mb follows the device there)
        overrides += [f"infer.chunk_size={DEFAULT_CHUNK_SIZE['cuda']}", "infer.pass_memory_mb=0"]
    stats = infer(load_config(ROOT / "configs" / "infer.yaml", overrides))
    return {
        "cores": cores,
        "workers": workers,
        "switch": switch,
        "postprocess": postprocess,
        "gpu_mpx_s": gpu_mpx_s,
        "gpu_chunks": gpu_chunks,
        "stats": stats,
        "stages": stages.seconds,
        "busy": standin.busy,
        "device_side": device.seconds.get(GPU_WORK, 0.0),
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


def run(side: int = 10240, cores: int = 2, folder: Path | None = None, quick: bool = False) -> dict:
    """The jobs of the table, each in its own process: on 1 core (profiled), on ``cores`` cores in one process and
    in as many worker processes, on 1 core in a GPU worker's chunks; then on ``cores`` in a GPU worker's chunks with
    the stand-in as slow as a GPU feeding 80% of what one process managed, with Python's GIL switch interval, with a
    GPU worker's, and with its post-processing processes too (``quick``: only the first and the last)."""
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
        fastest = rows[1] if cores > 1 else rows[0]
        if not quick:
            rows.append(_job(slide, model, work, tracking, 1, gpu_chunks=True))
        mpx_s = 0.8 * fastest["stats"]["mpx_per_s"] * fastest["input_mpx"] / fastest["stats"]["megapixels"]
        ways = ((False, 0), (True, 0), (True, max(1, cores // 2)))  # the last: a GPU worker's
        for switch, postprocess in ways[-1:] if quick else ways:
            rows.append(_job(slide, model, work, tracking, cores, gpu_mpx_s=mpx_s, switch=switch,
                             postprocess=postprocess, gpu_chunks=True))  # fmt: skip
        held = [_job(slide, model, work, tracking, cores, postprocess=max(1, cores // 2), gpu_chunks=True, gil=True,
                     attempt=attempt) for attempt in range(1 if quick else GIL_REPEATS)]  # fmt: skip
    return {
        "title": TITLE,
        "side": side,
        "rows": rows,
        "gil_held": held,
        "gil": gil_speedups(2 if quick else 8),
        "handoff": handoff(12 if quick else 48),
        "load": load,
        "libraries": libraries(2 if quick else 10),
    }


def _job(slide: Path, model: Path, work: Path, tracking: str, cores: int, workers: int = 1, profile: bool = False,
         gpu_mpx_s: float = 0.0, switch: bool = True, postprocess: int = 0, gpu_chunks: bool = False,
         gil: bool = False, attempt: int = 0) -> dict:  # fmt: skip
    """One job in its own process (``gil``: under py-spy, its GIL-held seconds by part in the row's ``held``, or
    why there are none in ``held_error``); ``attempt`` tells repeats of the same job apart."""
    out = work / f"out-{cores}-{workers}-{gpu_mpx_s:.0f}-{switch}-{postprocess}-{gpu_chunks}-{gil}-{attempt}.ome.zarr"
    command = [sys.executable, "-m", "benchmarks.pipeline", "job", str(slide), str(model), str(out), "--tracking",
               tracking, "--cores", str(cores), "--workers", str(workers), "--gpu-mpx-s", str(gpu_mpx_s)]  # fmt: skip
    command += ["--profile"] if profile else []
    command += ([] if switch else ["--python-switch"]) + ["--postprocess", str(postprocess)]
    command += ["--gpu-chunks"] if gpu_chunks else []
    held, error, done = None, None, None
    if gil:
        raw = work / f"gil-{out.name}.txt"
        try:
            done = gil_profile.record(command, raw, ROOT)
            held = gil_profile.held_seconds(raw) if raw.exists() else None  # py-spy may exit 1 after writing it
            error = None if held else f"py-spy sampled nothing: {(done.stderr.strip() or 'no message')[-300:]}"
            if not _printed(done):  # the job did not finish under py-spy: again without it, into an output of its own
                command[command.index(str(out))] = str(out.with_name(f"plain-{out.name}"))
                held, error, done = None, f"the job did not finish under py-spy: {done.stderr.strip()[-300:]}", None
        except (RuntimeError, OSError) as exc:
            error = str(exc)
    if done is None:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    printed = _printed(done)  # a job prints its result last, once done (py-spy's exit code is not its job's)
    if not printed:
        raise RuntimeError(f"the job on {cores} core(s) failed:\n{done.stderr[-3000:]}")
    row = json.loads(printed[-1]) | {"held": held, "held_error": error}
    print(f"  {_described(row)}: {row['stats']['mpx_per_s']:.2f} Mpx/s, {row['stats']['objects']} objects", flush=True)
    return row


def _printed(done: subprocess.CompletedProcess) -> list[str]:
    """The job's result lines (JSON); py-spy prints its own after them."""
    return [line for line in done.stdout.splitlines() if line.startswith("{")]


def _described(row: dict) -> str:
    where = "one process" if row["workers"] == 1 else f"{row['workers']} worker processes"
    where += ", a GPU worker's chunks (2048 px, one pass)" if row.get("gpu_chunks") else ", the CPU's 1024-px chunks"
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
             "time left out | per core, a GPU's work left out | stand-in busy | goal (per core, stand-in left out) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in result["rows"]:
        s, n, gpu = row["stats"], row["cores"], row["gpu_mpx_s"]
        in_process, cpu = row["workers"] == 1, n * s["seconds"]
        per_core = s["megapixels"] / (cpu - (row["busy"] if in_process else 0))
        cpu_side = f"{s['megapixels'] / (cpu - row['device_side']):.2f}" if in_process and not gpu else ""
        busy = f"{row['busy'] / s['seconds']:.0%}" if in_process else ""
        goal = "" if gpu else f"{'met' if per_core >= GOAL_PER_CORE else 'not met'} (>= {GOAL_PER_CORE:g})"
        lines.append(f"| {n} | {_described(row)} | {s['objects'] / s['megapixels']:.0f} | {s['mpx_per_s']:.2f} | "
                     f"{s['mpx_per_s'] / n:.2f} | {'' if gpu else f'{per_core:.2f}'} | {cpu_side} | {busy} | "
                     f"{goal} |")  # fmt: skip
    lines += ["", *_gil_held(result["gil_held"]), "", *_handoff(result["handoff"])]
    profiled = result["rows"][0]
    mpx, wall = profiled["stats"]["megapixels"], profiled["stats"]["seconds"]
    lines += ["", f"Profile on 1 core, {mpx:.0f} Mpx in {wall:.1f} s (segmenting, the objects table included; the "
              "slide's MLflow run, NGFF metadata and rename come after):", "",
              "| stage | seconds | share of the wall time | Mpx/s alone |", "|---|---:|---:|---:|"]  # fmt: skip
    stages = sorted(profiled["stages"].items(), key=lambda item: (item[0] in AFTER, -item[1]))
    for stage, seconds in stages:
        if stage in AFTER:  # once the slide is segmented: not in its time
            lines.append(f"| {stage} (after) | {seconds:.2f} |  |  |")
        else:
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
        "Candidates per stage, one 1024-px chunk of dense H&E (best of 10):",
        "",
        "| way | ms per chunk |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in result["libraries"].items()]
    return "\n".join(lines)


def _handoff(passes: dict[str, float]) -> list[str]:
    """The model thread's pass beside the hand-off to post-processing processes (``pipeline_parts.handoff``)."""
    alone = passes["model thread alone"]
    lines = [f"A GPU worker's model thread beside the hand-off of its {HANDOFF_CHUNK}-px chunks of real H&E to a "
             f"post-processing process, {HANDOFF_RATE} chunks a second (100 Mpx/s), a pass a chunk of {LAUNCHES} "
             "launches (each a little Python and a wait with the GIL given back):", "",
             "| model thread | median pass (ms) | vs alone |", "|---|---:|---:|"]  # fmt: skip
    return lines + [f"| {name} | {ms:.1f} | {ms / alone - 1:+.0%} |" for name, ms in passes.items()]


def _gil_held(rows: list[dict]) -> list[str]:
    """The GIL held by the job's process in a GPU worker's layout, by part (the run of median total), and what it
    bounds."""
    measured = sorted((row for row in rows if row["held"]), key=lambda row: sum(row["held"].values()))
    row = measured[len(measured) // 2] if measured else rows[0]
    s = row["stats"]
    title = (f"GIL held by the job's process on {row['cores']} core(s): {_described(row)}, labelling in "
             f"{row['postprocess']} post-processing process(es), {s['megapixels']:.0f} Mpx in {s['seconds']:.1f} s "
             "(py-spy ``--gil``; start-up and each slide's finishing left out):")  # fmt: skip
    if not measured:
        return [title, "", f"Not measured: {row['held_error']}"]
    total = sum(row["held"].values())
    lines = [title, "", "| part of the process | GIL held (s) | ms per Mpx |", "|---|---:|---:|"]
    for part, seconds in sorted(row["held"].items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {seconds:.2f} | {1000 * seconds / s['megapixels']:.1f} |")
    lines.append(f"| **all** | **{total:.2f}** | **{1000 * total / s['megapixels']:.1f}** |")
    totals = ", ".join(f"{sum(r['held'].values()):.2f}" for r in measured)
    return [*lines, "", f"So one process drives at most **{s['megapixels'] / total:.0f} Mpx/s**, however many cores "
            f"it has (what holds the GIL runs on one core at a time). The run of median total of {len(measured)} "
            f"(totals {totals} s)."]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="run", choices=["run", "job"])
    parser.add_argument("paths", nargs="*", help="job: SLIDE MODEL OUTPUT")
    parser.add_argument("--side", type=int, default=10240, help="the mirrored slide's side (px)")
    parser.add_argument("--cores", type=int, default=2, help="the most cores a job gets (job: its cores)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tracking", default="sqlite:///mlflow.db")
    parser.add_argument("--python-switch", action="store_true", help="job, GPU-like: Python's GIL switch interval")
    parser.add_argument("--gpu-chunks", action="store_true", help="job: a GPU worker's chunks, one pass each")
    parser.add_argument("--postprocess", type=int, default=0, help="job: infer.postprocess_processes")
    parser.add_argument("--workers", type=int, default=1, help="job: Dask worker processes (1: in this process)")
    parser.add_argument("--gpu-mpx-s", type=float, default=0.0, help="job: make the stand-in as slow as such a GPU")
    parser.add_argument("--slides", type=Path, default=None, help="keep the made-up slide here between runs")
    parser.add_argument("--quick", action="store_true", help="a 2048-px slide, 1 core: a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if args.what == "job":
        print(json.dumps(job(*args.paths, args.cores, args.tracking, args.profile, args.gpu_mpx_s, args.workers,
                             not args.python_switch, args.postprocess, args.gpu_chunks),
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
