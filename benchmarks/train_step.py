"""Training step: Ray Train (TorchTrainer, 1 worker, DDP wrapper, gloo) against a plain PyTorch loop.

Both run ``unet.training.train_step`` on the same model (base width 32, depth 4), the same batch
of real H&E patches (4 x 3 x 128 x 128 from the sample store), bf16 autocast, the same number of
torch threads, after warm-up steps. The Ray figure is measured inside the worker, so it shows
the per-step overhead of the DDP wrapper and Ray's worker process; the one-off start-up of Ray
and the worker group is reported separately.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

TITLE = "Training step: Ray Train vs plain PyTorch"
ROOT = Path(__file__).resolve().parents[1]


def _setup(threads: int):
    from pipelines.prepare import prepare
    from unet.config import load_config
    from unet.data.dataset import PatchDataset
    from unet.loss import WeightedLoss
    from unet.training import build_model, build_optimizer, build_scheduler, make_grad_scaler

    torch.set_num_threads(threads)
    config = load_config(None, ["model.base_channels=32", "data.patch_size=128", "train.batch_size=4"])
    store_dir = Path(tempfile.mkdtemp(prefix="bench-store-"))
    prep = load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={store_dir / 'he.zarr'}"])
    dataset = PatchDataset(prepare(prep, previews=0), patch_size=128, length=4, seed=0)
    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("image", "target", "weights")}
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.train)
    return (
        config,
        model,
        optimizer,
        build_scheduler(optimizer, config.train),
        make_grad_scaler("bf16", torch.device("cpu")),
        WeightedLoss(),
        batch,
    )


def _timed_steps(model, optimizer, scaler, loss_fn, batch, warmup: int, steps: int) -> list[float]:
    from unet.training import train_step

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        train_step(model, batch, optimizer, loss_fn, scaler, device=torch.device("cpu"), precision="bf16",
                   channels_last=True, grad_clip=1.0)  # fmt: skip
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    _, model, optimizer, _, scaler, loss_fn, batch = _setup(loop_config["threads"])
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last), move_to_device=False)
    times = _timed_steps(model, optimizer, scaler, loss_fn, batch, loop_config["warmup"], loop_config["steps"])
    metrics = {"median_step_s": statistics.median(times), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train V2 keeps metrics with their checkpoint
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run(quick: bool = False) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    threads, warmup, steps = os.cpu_count() or 1, 2, 3 if quick else 10
    _, model, optimizer, _, scaler, loss_fn, batch = _setup(threads)
    model = model.to(memory_format=torch.channels_last)
    plain = statistics.median(_timed_steps(model, optimizer, scaler, loss_fn, batch, warmup, steps))

    started = time.perf_counter()
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, logging_level="WARNING")
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"threads": threads, "warmup": warmup, "steps": steps},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="bench", storage_path=tempfile.mkdtemp(prefix="bench-ray-")),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    total = time.perf_counter() - started
    ray_step = result.metrics["median_step_s"]
    return {
        "title": TITLE,
        "rows": [
            {"loop": "plain PyTorch", "step_s": plain, "threads": threads, "startup_s": 0.0},
            {
                "loop": "Ray Train, 1 worker (DDP)",
                "step_s": ray_step,
                "threads": int(result.metrics["threads"]),
                "startup_s": total - (warmup + steps) * ray_step,
            },
        ],
        "overhead": ray_step / plain - 1.0,
    }


def to_markdown(result: dict) -> str:
    lines = ["| loop | median step (s) | torch threads | one-off start-up (s) |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['loop']} | {r['step_s']:.3f} | {r['threads']} | {r['startup_s']:.1f} |")
    lines.append("")
    lines.append(
        f"Per-step overhead of Ray Train: **{result['overhead'] * 100:+.1f}%** (ratio measured in the same run)."
    )
    return "\n".join(lines)
