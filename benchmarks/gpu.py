"""The GPU path, measured: inference (model only, ``pipelines.infer`` Zarr to OME-Zarr end to end, MONAI's sliding
window on the same device and model) and training (a plain PyTorch loop against ``pipelines.train`` with Ray
Train, 1 worker, and again with ``train.deterministic``), in one command.

    python -m benchmarks.gpu [--device cuda|cpu] [--quick] [--output docs/benchmarks.md] [--json PATH]
                             [--only SECTION ...] [--limit SECTION=SECONDS ...]

Inputs: the real CMU slide mirrored about its borders to 16384 x 16384 (268 Mpx of real tissue, made-up layout),
the real H&E nuclei training store, and a U-Net of base width 64 (depth 4) trained on it for 40 steps on the device
(the recipe of ``benchmarks.models``) so that it finds nuclei-like objects: an untrained model finds none or
millions, and the end-to-end figure would then measure object tracing, not the model. Without the sample data in
its cache (``python -m pipelines.fetch_samples`` online, or ``UNET_SAMPLES_DIR``) synthetic nuclei are used
instead, as the table says. bf16 autocast, channels_last throughout.

Model only: passes of the inference model (random weights: speed does not depend on them) timed with the device
synchronised, over one default chunk (2048 on CUDA) with its halo, and over the pass ``pipelines.infer`` makes
with ``InferConfig(device=...)``'s defaults (smaller tiles where one pass would exceed ``infer.pass_memory_mb``):
output megapixels per second and the fraction of the GPU's dense bf16 peak (FLOPs by ``torch.utils.flop_counter``).
End to end: ``python -m pipelines.infer`` with ``infer.device`` set and nothing else tuned: its segmentation
throughput (reading, predicting, labelling, writing), objects per Mpx, and its wall time from start to exit.
MONAI: ``sliding_window_inference`` (roi 512, overlap 0.25, Gaussian, 16 windows per batch) with the slide in host
memory. Training: one config for both loops (patches 256, batch 16, 40 steps an epoch, 3 epochs, bf16; the same
store, dataset class, augmentation and DataLoader settings: 4 loader processes on a GPU, pinned memory), timed
alike: images/s of the third epoch, from the loader's start to the last step queued, no host sync per step, cuDNN
autotuning on (as ``pipelines.train``'s worker has it from its first validation on). The plain loop runs
``unet.training.train_step`` only (its loader processes start from a fork server, never forked from a process
using CUDA); ``pipelines.train`` adds the LR schedule, the weight average, MLflow logging every 10 steps and
validation between epochs (not timed). "One resident batch": the same steps without the loader, what the device
could train at.

Each section runs in its own process under its own time limit: one past it is stopped with its processes and
recorded as "timed out after N s"; a missing optional package (monai, ray) or a failure is recorded with its
reason in one line, and the run goes on. After every section this section of ``--output`` is rewritten with what
is known so far, and the raw results go to ``--json`` (default: benchmarks-gpu.json beside ``--output``). Exit
status 0 when the model-only section ran (with ``--only`` leaving it out: when every chosen section ran), else 1.

Sized for one H100 in under 6 minutes with every start-up (estimates from first principles; the limits, LIMITS,
add up to 335 s). Model only (limit 30 s): Python, torch and CUDA start ~8 s; the base-64 U-Net's forward is ~1.5
TFLOP per Mpx, at ~40% of 989 TFLOP/s ~250 Mpx/s of input, so 2 shapes x 23 passes of up to 5 Mpx take ~2 s, plus
cuDNN autotuning. Inputs (45 s): store ~3 s, the slide written as Zarr ~10 s (67 Mpx took 2.6 s on 2 CPU cores),
40 fp32 steps with CUDA's start ~5 s. End to end (55 s): start-up ~10 s, 268 Mpx at 30-100 Mpx/s (labelling and
writing on the CPU) 3-9 s. MONAI (50 s): start ~8 s, reading and converting the slide ~8 s, ~480 Mpx of windows ~2
s on the GPU, copies and blending on the CPU 5-15 s. Plain training (35 s): start with CUDA ~8 s, the loader's fork
server ~4 s, 3 epochs of 640 patches at 200-300 img/s ~8 s (4 loader processes at ~35-70 patches/s each: the
loader, not the GPU at ~1000 img/s, is the limit). Ray Train and deterministic (60 s each): Ray and its worker
start ~15-20 s, the epochs with validation ~10 s, registering the model and shutting down ~10 s.
``--device cpu --quick`` is a small smoke test of the same code (``make test`` runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.gpu_sections import SIZES, _one_line

ROOT = Path(__file__).resolve().parents[1]
TITLE = "GPU: inference and training on one device"
LABELS = {"model": "model only", "inputs": "inputs", "end_to_end": "end to end, Zarr to Zarr",
          "monai": "MONAI sliding window", "plain": "training, plain PyTorch", "ray": "training, Ray Train 1 worker",
          "deterministic": "training, Ray Train 1 worker, `train.deterministic`"}  # fmt: skip
NEEDS_INPUTS = {"end_to_end", "monai", "plain", "ray", "deterministic"}
LIMITS = {  # seconds per section: one H100 (335 s in all, see above), and the CPU smoke test on a small machine
    False: {"model": 30, "inputs": 45, "end_to_end": 55, "monai": 50, "plain": 35, "ray": 60, "deterministic": 60},
    True: dict.fromkeys(LABELS, 300),
}
QUICK_SKIP = (
    "skipped: --quick on a CPU (train.deterministic changes only GPU kernels; the Ray Train section runs the same code)"
)
PACKAGES = ("numpy", "scipy", "zarr", "dask", "distributed", "ray", "mlflow", "monai", "pydantic")


def versions(device: str) -> dict:
    """Python, torch, CUDA, cuDNN, the NVIDIA driver, the GPU and the project's key libraries (without starting
    CUDA in this process: the sections get the whole device)."""
    import torch

    from unet.devices import cpu_model

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "n/a",
             "cudnn": str(torch.backends.cudnn.version() or "n/a") if torch.backends.cudnn.is_available() else "n/a",
             "driver": "n/a", "gpu": "n/a", "cpu": f"{cpu_model()}, {os.cpu_count()} cores"}  # fmt: skip
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            line = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
            found["driver"], found["gpu"] = (part.strip() for part in line.split(",", 1))
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_section(name: str, device: str, quick: bool, folder: Path, limit: float) -> dict:
    """Run one section in its own process (and session) for at most ``limit`` seconds; its record."""
    command = [sys.executable, "-m", "benchmarks.gpu_sections", name, "--device", device, "--folder", str(folder)]
    answer, log_path = folder / f"{name}.json", folder / f"{name}.log"
    started, cpu = time.perf_counter(), _children_cpu()
    with open(log_path, "w") as log:  # a file, not a pipe: nobody reads it while the section runs
        process = subprocess.Popen([*command, *(["--quick"] if quick else [])], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop(process)
        except BaseException:  # this run stopped: the section's processes with it
            _stop(process)
            raise
    record = {"seconds": time.perf_counter() - started, "cpu_s": _children_cpu() - cpu, "limit_s": limit}
    log_tail = log_path.read_text(errors="replace")[-3000:]
    if process.returncode == 0 and answer.exists():
        return record | {"status": "ok", "result": json.loads(answer.read_text())}
    if (reason := json.loads(answer.read_text()).get("error") if answer.exists() else None) is None:
        failed = f"failed: exit {process.returncode}: {_one_line(log_tail)}"
        reason = f"timed out after {limit:g} s" if record["seconds"] >= limit else failed
    status = reason.split(" ")[0].rstrip(":")  # skipped, failed, timed
    return record | {"status": "timed out" if status == "timed" else status, "reason": reason, "log_tail": log_tail}


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (a section's, once it ended)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop(process: subprocess.Popen) -> None:
    """End a section's process and every process it started (Ray's, Dask's, the loader's): SIGTERM, then SIGKILL
    after 5 s."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=5)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    process.wait()


def rows(r: dict) -> list[tuple[str, str, str]]:
    """The table's rows: each section's figures, or why it has none."""
    done = {name: record["result"] for name, record in r["sections"].items() if record["status"] == "ok"}
    out: list[tuple[str, str, str]] = []
    for name, record in r["sections"].items():
        try:
            out += ROWS[name](done[name], done) if name in done else [(LABELS[name], "-", record["reason"])]
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:  # a figure missing: the others stay
            out.append((LABELS[name], "-", f"not shown: {type(error).__name__} {error}"))
    return out


def _model_rows(m: dict, done: dict) -> list[tuple[str, str, str]]:
    memory = f", {m['memory_free_gb']:.0f} of {m['memory_total_gb']:.0f} GB free" if "memory_free_gb" in m else ""
    chunk, used = m["chunk_pass"], m["inference_pass"]
    limit = f"one pass may take {m['pass_limit_mb']:.0f} MB" if m["pass_limit_mb"] else "no limit on a pass"
    tiles = f"tiles of {used['tile']} ({limit}): {_pass(used)}"
    return [("device", m["device"], f"UNet base {m['base']}, bf16, channels_last{memory}"),
            ("model only, one chunk", f"{chunk['output_mpx_s']:.1f} Mpx/s",
             f"chunk {chunk['tile']} and its halo: {_pass(chunk)}"),
            ("model only, inference's pass", f"{used['output_mpx_s']:.1f} Mpx/s",
             f"the same pass ({limit})" if used["tile"] == chunk["tile"] else tiles)]  # fmt: skip


def _inputs_rows(i: dict, done: dict) -> list[tuple[str, str, str]]:
    trained = f"UNet base {i['base']} trained {i['brief_steps']} steps in {i['train_s']:.1f} s"
    return [("inputs", f"{i['side']} x {i['side']}", f"{i['kind']}; {trained}")]


def _end_to_end_rows(e: dict, done: dict) -> list[tuple[str, str, str]]:
    objects = f"{e['mpx']:.0f} Mpx, {e['objects']} objects ({e['objects_per_mpx']:.0f} per Mpx)"
    wall = f"{e['wall_mpx_s']:.1f} Mpx/s counting the process's {e['wall_s']:.1f} s from start to exit"
    notes = f"{objects}; {wall} (start-up {e['startup_s']:.1f} s)"
    return [(LABELS["end_to_end"], f"{e['segment_mpx_s']:.1f} Mpx/s", notes)]


def _monai_rows(m: dict, done: dict) -> list[tuple[str, str, str]]:
    e, versus = done.get("end_to_end"), ""
    if e:
        segment, wall = e["segment_mpx_s"] / m["compute_mpx_s"], e["wall_mpx_s"] / m["wall_mpx_s"]
        versus = f"; ours {segment:.2f}x, start to exit {wall:.2f}x"
    return [(LABELS["monai"], f"{m['compute_mpx_s']:.1f} Mpx/s",
             f"slide in memory; {m['wall_mpx_s']:.1f} Mpx/s from process start to exit{versus}")]  # fmt: skip


def _plain_rows(p: dict, done: dict) -> list[tuple[str, str, str]]:
    return [(LABELS["plain"], f"{p['img_s']:.1f} img/s", f"epochs {_epochs(p)}; {p['resident_img_s']:.1f} img/s "
             f"on one resident batch; {p['loader_workers']} loader processes")]  # fmt: skip


def _ray_rows(t: dict, done: dict, name: str = "ray", other: str = "plain", than: str = "plain") -> list:
    versus = f"{t['img_s'] / done[other]['img_s']:.2f}x {than}; " if other in done else ""
    return [(LABELS[name], f"{t['img_s']:.1f} img/s", f"{versus}epochs {_epochs(t)}; process {t['wall_s']:.0f} s")]


ROWS = {"model": _model_rows, "inputs": _inputs_rows, "end_to_end": _end_to_end_rows, "monai": _monai_rows,
        "plain": _plain_rows, "ray": _ray_rows,
        "deterministic": lambda t, done: _ray_rows(t, done, "deterministic", "ray", "without it")}  # fmt: skip


def _pass(p: dict) -> str:
    peak = f"{p['peak_fraction'] * 100:.0f}% of the bf16 peak" if p["peak_fraction"] else "bf16 peak unknown here"
    return f"{p['pass']} px a pass, {p['tflops']:.1f} TFLOP/s, {peak}"


def _epochs(t: dict) -> str:
    return ", ".join(f"{v:.1f}" for v in t["epochs_img_s"]) + " img/s (the last one counts)"


def to_markdown(r: dict) -> str:
    v = r["versions"]
    head = (f"Versions: Python {v['python']}, torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, NVIDIA "
            f"driver {v['driver']}; " + ", ".join(f"{p} {v[p]}" for p in PACKAGES) + ".")  # fmt: skip
    lines = [head, "", "| measurement | value | notes |", "|---|---:|---|"]
    return "\n".join([*lines, *(f"| {a} | {b} | {c} |" for a, b, c in rows(r))])


def write(output: Path, json_path: Path, r: dict) -> None:
    """This section of ``output`` (the others kept as they are) and the raw results, with what is known so far."""
    from benchmarks.run import BENCHMARKS, HEADER, sections_of

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(r, indent=1))
    v, done = r["versions"], sum(record["status"] == "ok" for record in r["sections"].values())
    on = f"{v['gpu']} (driver {v['driver']}), " if v["gpu"] != "n/a" else ""
    going = "" if r["finished"] else ", the run still going"
    stamp = (f"_Measured {r['started']} UTC by `{r['command']}` on {on}{v['cpu']}; {done} of {len(r['sections'])} "
             f"sections ran, {r['seconds']:.0f} s in all{going}._")  # fmt: skip
    sections = sections_of(output.read_text()) if output.exists() else {}
    sections[TITLE] = f"## {TITLE}\n\n{stamp}\n\n{(__doc__ or '').strip()}\n\n{to_markdown(r)}\n"
    order = [getattr(module, "TITLE", None) for module in BENCHMARKS.values()]
    titles = [t for t in order if t in sections] + [t for t in sections if t not in order]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(HEADER + "\n" + "\n".join(sections[t] for t in titles))


def run_all(r: dict, device: str, quick: bool, limits: dict, save) -> None:
    """Run the sections of ``r`` one after the other, each recorded and saved as soon as it ends."""
    started, unusable = time.perf_counter(), None
    if device == "cuda":  # no GPU: every section would fail the same way
        from unet.devices import check_device

        try:
            check_device("--device", "cuda")
        except Exception as error:
            unusable = f"failed: {_one_line(str(error))}"
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for name in r["sections"]:
            inputs = r["sections"].get("inputs", {})
            if unusable:
                record = {"status": "failed", "reason": unusable}
            elif quick and device == "cpu" and name == "deterministic":  # make test's minute: Ray's start-up again
                record = {"status": "skipped", "reason": QUICK_SKIP}
            elif name in NEEDS_INPUTS and inputs.get("status") != "ok":
                record = {"status": "skipped", "reason": f"skipped: needs the inputs ({inputs.get('reason')})"}
            else:
                print(f"{name} (limit {limits[name]:g} s) ...", flush=True)
                try:
                    record = run_section(name, device, quick, Path(tmp), limits[name])
                except BaseException:  # Ctrl-C, SIGTERM: what ran so far stays saved
                    r["sections"][name] = {"status": "interrupted", "reason": "interrupted: the run was stopped"}
                    save()
                    raise
            r["sections"][name] = record
            r["seconds"] = time.perf_counter() - started
            print(f"{name}: {record['status']} {record.get('seconds', 0):.1f} s {record.get('reason', '')}", flush=True)
            save()


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the same code")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="raw results (default: benchmarks-gpu.json beside --output)")
    parser.add_argument("--only", nargs="+", choices=list(LABELS), help="these sections (and inputs if they need it)")
    parser.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS", help="another time limit")
    args = parser.parse_args(argv)
    limits = LIMITS[args.quick] | {k: float(s) for k, s in (item.split("=", 1) for item in args.limit)}
    if unknown := ", ".join(sorted(set(limits) - set(LABELS))):
        parser.error(f"--limit: no section {unknown} (sections: {', '.join(LABELS)})")
    chosen = set(args.only or LABELS) | ({"inputs"} if NEEDS_INPUTS & set(args.only or LABELS) else set())
    names = [name for name in LABELS if name in chosen]
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path = args.json or args.output.with_name("benchmarks-gpu.json")
    sections = {name: {"status": "not reached", "reason": "not reached"} for name in names}
    r = {"title": TITLE, "command": command.strip(), "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M}",
         "versions": versions(args.device), "sizes": SIZES[args.quick], "limits": limits, "finished": False,
         "seconds": 0.0, "sections": sections}  # fmt: skip
    print(json.dumps(r["versions"]), flush=True)
    main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None  # the section stops too
    try:
        run_all(r, args.device, args.quick, limits, lambda: write(args.output, json_path, r))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    r["finished"] = True
    write(args.output, json_path, r)
    print(to_markdown(r))
    print(f"wrote {args.output} and {json_path} in {r['seconds']:.0f} s")
    counted = ["model"] if "model" in r["sections"] else list(r["sections"])  # with --only leaving it out: all
    return 0 if all(r["sections"][name]["status"] == "ok" for name in counted) else 1


if __name__ == "__main__":
    raise SystemExit(main())
