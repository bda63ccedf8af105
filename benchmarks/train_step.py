"""Training step: Ray Train (TorchTrainer, 1 worker, gloo) against a plain PyTorch loop.

Both run ``unet.training.train_step`` on the same model (base width 32, depth 4, the same initial weights), the
same batch of real H&E patches (4 x 3 x 128 x 128 from the sample store), bf16 autocast, channels_last, gradient
clipping and the same number of torch threads, and are timed alike: each loop runs in a process of its own (plain:
a fresh Python process; Ray: the worker of a local TorchTrainer, its model passed through
``ray.train.torch.prepare_model`` as ``pipelines.train`` does, which wraps it in DDP only from 2 workers on), each
is warmed up with the same steps, then the two take turns in rounds of a few steps, each round timed as one with
no host sync in either, the order alternating from round to round, so that both see the same (shared, noisy)
machine. While the plain loop runs, the processes of the Ray side (GCS, raylet, dashboard, the trainer's actors
and its worker; not the driver, which only waits) are paused (SIGSTOP), so that it runs as it would on a machine
without Ray; each round it also runs once beside the Ray processes left running idle, which splits Ray's overhead
into the background work of its processes and that of the worker itself. The table gives each loop's median step
over the rounds; the overheads are medians over the rounds of the ratio within each round. The one-off start-up
of Ray and its worker (up to the train function) is reported separately.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Connection
from pathlib import Path

import torch

TITLE = "Training step: Ray Train vs plain PyTorch"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["model.base_channels=32", "data.patch_size=128", "train.batch_size=4"]
PLAIN, BESIDE, RAY = "plain PyTorch", "plain PyTorch beside idle Ray processes", "Ray Train, 1 worker"


def _batch_file(folder: Path) -> Path:
    """The batch both loops train on, from a fresh store of the sample H&E images."""
    from pipelines.prepare import prepare
    from unet.config import load_config
    from unet.data.dataset import PatchDataset

    prep = load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}"])
    dataset = PatchDataset(prepare(prep, previews=0), patch_size=128, length=4, seed=0)
    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("image", "target", "weights")}
    torch.save(batch, folder / "batch.pt")
    return folder / "batch.pt"


def serve(address: str, batch_file: str, threads: int, warmup: int, ray_worker: bool = False) -> None:
    """One loop, plain or in the Ray worker: build, warm up, then time rounds of steps for as long as asked."""
    from unet.config import load_config
    from unet.loss import WeightedLoss
    from unet.training import build_model, build_optimizer, make_grad_scaler, train_step

    conn = Client(address, family="AF_UNIX")
    conn.send("started")
    torch.set_num_threads(threads)
    config = load_config(None, CONFIG)
    batch = torch.load(batch_file, weights_only=True)
    torch.manual_seed(0)
    model = build_model(config.model).to(memory_format=torch.channels_last)
    optimizer, loss_fn = build_optimizer(model, config.train), WeightedLoss()
    scaler = make_grad_scaler("bf16", torch.device("cpu"))
    if ray_worker:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)

    def steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            train_step(model, batch, optimizer, loss_fn, scaler, device=torch.device("cpu"), precision="bf16",
                       channels_last=True, grad_clip=1.0)  # fmt: skip
        return time.perf_counter() - start

    steps(warmup)
    conn.send({"threads": torch.get_num_threads(), "model": type(model).__name__})
    while count := conn.recv():
        conn.send(steps(count))
    conn.close()


def _ray_worker(loop_config: dict) -> None:
    from pipelines.train.quiet_ray import quiet_reports

    quiet_reports()  # as pipelines.train's workers
    serve(**loop_config, ray_worker=True)


def _ray_driver(address: str, batch_file: str, threads: int, warmup: int) -> None:
    """A local Ray and a TorchTrainer with one worker running ``serve``, until the loop is told to stop."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from pipelines.train.quiet_ray import LOCAL_RAY, trainer_class
    from unet.config import TrainConfig

    # as pipelines.train starts a local Ray: train.dashboard (UNET_BENCHMARK_DASHBOARD=1: with the dashboard)
    dashboard = os.environ.get("UNET_BENCHMARK_DASHBOARD", str(int(TrainConfig().dashboard))) == "1"
    ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, logging_level="WARNING",
             include_dashboard=dashboard, _system_config=LOCAL_RAY)  # fmt: skip
    try:
        trainer_class(local=True)(  # as pipelines.train on a local Ray
            _ray_worker,
            train_loop_config={"address": address, "batch_file": batch_file, "threads": threads, "warmup": warmup},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="bench", storage_path=str(Path(batch_file).parent / "runs")),
        ).fit()
    finally:
        ray.shutdown()


def _start(kind: str, server: socket.socket, args: list[str], processes: list[subprocess.Popen]):
    """Start one loop's process (kept in ``processes``); return its connection and the seconds until its loop
    function ran."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.train_step", kind, *args], cwd=ROOT)
    processes.append(process)
    while True:
        try:
            sock, _ = server.accept()
            break
        except TimeoutError:
            if process.poll() is not None:
                raise RuntimeError(f"the {kind} loop exited with {process.returncode} before it started") from None
    sock.setblocking(True)
    conn = Connection(sock.detach())
    assert conn.recv() == "started"
    return conn, time.perf_counter() - started


def _signal_ray(driver: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to every process the Ray driver started (GCS, raylet, dashboard, actors, the worker); the driver
    itself, which only waits in ``fit()``, keeps running."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for member in psutil.Process(driver.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(sig)


def _rounds(plain: Connection, ray: Connection, driver: subprocess.Popen, rounds: int, steps: int):
    """Per loop, the step time of each round: the loops take turns, in alternating order."""
    times: dict[str, list[float]] = {PLAIN: [], BESIDE: [], RAY: []}
    for i in range(rounds):
        for loop in list(times)[:: 1 if i % 2 == 0 else -1]:
            paused = loop == PLAIN
            if paused:
                _signal_ray(driver, signal.SIGSTOP)
            try:
                conn = ray if loop == RAY else plain
                conn.send(steps)
                times[loop].append(conn.recv() / steps)
            finally:
                if paused:
                    _signal_ray(driver, signal.SIGCONT)
    return times


def run(quick: bool = False) -> dict:
    threads = os.cpu_count() or 1
    warmup, rounds, steps = (2, 3, 2) if quick else (3, 30, 2)
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        address = str(Path(tmp) / "loops")
        args = [address, str(_batch_file(Path(tmp))), str(threads), str(warmup)]
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen()
        server.settimeout(1.0)
        try:
            plain_conn, _ = _start("plain", server, args, processes)
            ray_conn, startup = _start("ray", server, args, processes)
            info = {PLAIN: plain_conn.recv(), RAY: ray_conn.recv()}
            times = _rounds(plain_conn, ray_conn, processes[1], rounds, steps)
            for conn in (plain_conn, ray_conn):
                conn.send(0)  # the loops end, and with them the trainer and its Ray
            for process in processes:
                process.wait(timeout=300)
        finally:
            for process in processes:
                if process.poll() is None:
                    _signal_ray(process, signal.SIGCONT)
                    process.terminate()  # the driver shuts its Ray down
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
            server.close()
    info[BESIDE] = info[PLAIN]

    def versus(loop: str, base: str = PLAIN) -> float:  # the median over rounds of the ratio within a round
        return statistics.median(a / b for a, b in zip(times[loop], times[base], strict=True)) - 1.0

    rows = [
        {"loop": loop, "step_s": statistics.median(times[loop]), "threads": int(info[loop]["threads"]),
         "model": info[loop]["model"], "vs_plain": versus(loop), "startup_s": startup if loop == RAY else None}
        for loop in (PLAIN, BESIDE, RAY)
    ]  # fmt: skip
    return {"title": TITLE, "rows": rows, "rounds": rounds, "steps": steps, "times": times, "overhead": versus(RAY),
            "worker_vs_beside": versus(RAY, BESIDE)}  # fmt: skip


def to_markdown(result: dict) -> str:
    lines = [
        "| loop | model as trained | median step (s) | vs plain | torch threads | one-off start-up (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs = "" if r["loop"] == PLAIN else f"{r['vs_plain'] * 100:+.1f}%"
        startup = "" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        lines.append(f"| {r['loop']} | {r['model']} | {r['step_s']:.3f} | {vs} | {r['threads']} | {startup} |")
    lines.append("")
    lines.append(
        f"Per-step overhead of Ray Train: **{result['overhead'] * 100:+.1f}%** over the plain loop "
        f"({result['rounds']} alternating rounds of {result['steps']} steps each, all measured in the same run); "
        f"the plain loop beside Ray's idle processes: {result['rows'][1]['vs_plain'] * 100:+.1f}%; "
        f"the Ray worker against that: {result['worker_vs_beside'] * 100:+.1f}%."
    )
    return "\n".join(lines)


# One loop's process: python -m benchmarks.train_step plain|ray ADDRESS BATCH THREADS WARMUP
if __name__ == "__main__":
    from benchmarks import train_step  # by its name, not __main__: Ray pickles the worker function by reference

    kind, address, batch_file, threads, warmup = sys.argv[1:6]
    loop = train_step.serve if kind == "plain" else train_step._ray_driver
    loop(address, batch_file, int(threads), int(warmup))
