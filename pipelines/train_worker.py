"""The function every Ray Train worker runs: DDP training with checkpoints, validation on rank 0,
and MLflow logging from rank 0 only. Started by ``pipelines.train``."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipelines.registry import log_metrics
from unet.config import Config
from unet.data.dataset import PatchDataset
from unet.data.store import TrainingStore
from unet.devices import check_device
from unet.inference import InferenceSettings
from unet.io import write_png
from unet.loss import WeightedLoss
from unet.model_files import BEST_MODEL_DIR, save_weights
from unet.training import (
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_state,
    load_validation,
    make_grad_scaler,
    restore_scaler,
    save_state,
    train_step,
    training_state,
    unwrap,
)
from unet.visualize import prediction_panel


def _restore(model, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Load the latest checkpoint Ray Train hands us (after a failure or a re-run), if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": -1, "step": 0, "best": None, "best_epoch": None}
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_scaler(scaler, state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def _mean_across_workers(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = Config.model_validate(loop_config["config"])
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if train.use_gpu:  # the driver saw GPUs in the cluster; this checks the one this worker got
        check_device("train.use_gpu", "cuda", train.precision)
    torch.manual_seed(train.seed)  # identical initial weights on every rank

    model = build_model(config.model).to(device)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    scaler = make_grad_scaler(train.precision, device)
    progress = _restore(model, optimizer, scheduler, scaler)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    if train.compile:
        model = torch.compile(model)
    loss_fn = WeightedLoss(config.loss.dice_weight)

    store = TrainingStore(config.data.store)
    dataset, loader = _patches(config, store, rank, device)
    validation = load_validation(store) if rank == 0 else []
    settings = InferenceSettings.from_config(config.infer, device=str(device))  # validated as inference predicts
    tracker = None
    if rank == 0:
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(tracking_uri=loop_config["tracking_uri"])
    run_id = loop_config["mlflow_run_id"]
    step, best, best_epoch = progress["step"], progress["best"], progress["best_epoch"]
    nodes = _worker_nodes(world)
    if tracker is not None:  # where this attempt's workers run (a restart after a node loss may differ)
        log_metrics(tracker, run_id, {"ray/worker_nodes": len(nodes)}, step)
        tracker.set_tag(run_id, "ray.worker_nodes", ",".join(nodes))
    metric_name = config.tracking.champion_metric

    for epoch in range(progress["epoch"] + 1, train.epochs):
        dataset.set_epoch(epoch)
        model.train()
        started, loss_sum, logging = time.perf_counter(), torch.zeros((), device=device), []
        for batch in loader:
            result = train_step(
                model,
                batch,
                optimizer,
                loss_fn,
                scaler,
                device=device,
                precision=train.precision,
                channels_last=train.channels_last,
                grad_clip=train.grad_clip,
            )
            scheduler.step()
            step += 1
            loss_sum += result.loss  # stays on the device: no wait for the GPU
            if tracker is not None and step % train.log_every_steps == 0:
                step_metrics = {"train/step_loss": float(result.loss), "train/grad_norm": float(result.grad_norm)}
                step_metrics["train/lr"] = scheduler.get_last_lr()[0]
                logging.append(log_metrics(tracker, run_id, step_metrics, step, synchronous=False))
        seconds = time.perf_counter() - started
        for operation in logging:  # MLflow wrote these in the background; they must land before the checkpoint
            operation.wait()
        epoch_loss = _mean_across_workers(float(loss_sum) / len(loader), device)
        metrics: dict[str, float] = {
            "epoch": epoch,
            "train/loss": epoch_loss,
            "throughput/img_per_s": world * len(dataset) / seconds,
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                scores, probabilities = evaluate(unwrap(model), validation, settings, config.infer.chunk,
                                                 config.infer.threshold, config.evaluate.iou_threshold)  # fmt: skip
                metrics.update({f"val/{k}": v for k, v in scores.items()})
                value = metrics[metric_name]
                if best is None or value > best:
                    best, best_epoch = value, epoch
                    save_weights(unwrap(model), Path(tmp) / BEST_MODEL_DIR)
                elif previous := ray.train.get_checkpoint():  # carry the best model forward
                    with previous.as_directory() as directory:
                        shutil.copytree(Path(directory) / BEST_MODEL_DIR, Path(tmp) / BEST_MODEL_DIR)
                metrics.update({"best/epoch": best_epoch, f"best/{metric_name}": best})
                log_metrics(tracker, run_id, metrics, epoch)
                if validation:
                    panel = prediction_panel(validation[0].image, validation[0].target, probabilities[0])
                    _log_picture(tracker, run_id, panel, f"epoch_{epoch:03d}.png")
                state = training_state(model, optimizer, scheduler, scaler, epoch=epoch, step=step, best=best,
                                       best_epoch=best_epoch)  # fmt: skip
                save_state(state, tmp)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                # Straight to the process's stdout, which Ray forwards to the driver once (print is teed).
                line = _epoch_line(epoch, train.epochs, metrics, seconds, config.evaluate.iou_threshold)
                sys.__stdout__.write(line + "\n")
                sys.__stdout__.flush()
            ray.train.report(metrics, checkpoint=checkpoint)


def _patches(config: Config, store: TrainingStore, rank: int, device: torch.device) -> tuple[PatchDataset, DataLoader]:
    """This rank's patch stream and its loader: worker processes sample and augment while the model trains (on
    a GPU), batches land in pinned memory for asynchronous copies."""
    train = config.train
    dataset = PatchDataset.from_config(store, config, rank)
    workers = train.loader_workers if train.loader_workers is not None else (4 if device.type == "cuda" else 0)
    # not persistent: each epoch's loader processes must see the epoch that set_epoch gave the dataset
    loader = DataLoader(dataset, batch_size=train.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    return dataset, loader


def _worker_nodes(world: int) -> list[str]:
    """Sorted distinct Ray node ids of all workers (gathered over the process group)."""
    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized() or world == 1:
        return [node]
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, node)
    return sorted({n for n in nodes if n})


def _log_picture(tracker, run_id: str, panel: np.ndarray, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(run_id, str(write_png(Path(tmp) / name, panel)), artifact_path="predictions")


def _epoch_line(epoch: int, epochs: int, m: dict[str, float], seconds: float, iou_threshold: float) -> str:
    return (
        f"epoch {epoch + 1}/{epochs} | loss {m['train/loss']:.4f} | val dice {m['val/dice']:.3f} "
        f"iou {m['val/iou']:.3f} f1@{iou_threshold:g} {m['val/f1']:.3f} merged {m['val/merged']:.0f} | "
        f"{m['throughput/img_per_s']:.1f} img/s | {seconds:.1f} s"
    )
