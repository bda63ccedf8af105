"""The function every Ray Train worker runs: DDP training with checkpoints, validation on rank 0,
and MLflow logging from rank 0 only. Started by ``pipelines.train.job``."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipelines import checkpoints
from pipelines.registry import WORKER_NODES_TAG, log_metrics
from unet.config import Config
from unet.data.dataset import PatchDataset
from unet.data.store import TrainingStore
from unet.devices import check_device
from unet.evaluation import evaluate, load_validation
from unet.inference import InferenceSettings
from unet.io import write_png
from unet.loss import WeightedLoss
from unet.model_files import BEST_MODEL_DIR, save_weights
from unet.segmentation import ObjectRule
from unet.training import (
    TrainingParts,
    build_model,
    build_optimizer,
    build_scheduler,
    freeze_batchnorm,
    load_state,
    make_deterministic,
    make_grad_scaler,
    make_weight_average,
    save_state,
    train_step,
    unwrap,
)
from unet.visualize import prediction_panel


def _checked_checkpoint(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The state of the latest checkpoint Ray Train hands us (after a failure or a re-run), if any, once its files
    are checked against those the run recorded when it wrote them."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=loop_config["tracking_uri"])
    run_name = loop_config["config"]["train"]["run_name"]
    with checkpoint.as_directory() as directory:
        checkpoints.verify(client, loop_config["mlflow_run_id"], directory, run_name)
        return load_state(directory)


def _mean_across_workers(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: set up, then per epoch train, validate and checkpoint."""
    from pipelines.train.quiet_ray import quiet_reports

    quiet_reports()
    worker = Worker.set_up(loop_config)
    for epoch in range(worker.progress["epoch"] + 1, worker.config.train.epochs):
        loss, seconds = worker.train_epoch(epoch)
        metrics = {"epoch": epoch, "train/loss": loss, "throughput/img_per_s": worker.images / seconds}
        worker.validate_and_checkpoint(epoch, metrics, seconds)


@dataclass
class Worker:
    """One training worker's state: its model and optimiser, its patches, and (on rank 0) validation and MLflow."""

    config: Config
    rank: int
    world: int
    device: torch.device
    parts: TrainingParts  # the model (in DDP from 2 workers on), and on rank 0 the moving average of its weights
    dataset: PatchDataset
    loader: DataLoader
    progress: dict[str, Any]  # epoch, step, best, best_epoch, best_scores: restored from the last checkpoint
    run_id: str
    tracker: Any = None  # rank 0: an MlflowClient
    validation: list = field(default_factory=list)  # rank 0: the validation images
    rule: ObjectRule | None = None  # rank 0: how their probability becomes objects, as inference makes them

    @classmethod
    def set_up(cls, loop_config: dict[str, Any]) -> Worker:
        config = Config.model_validate(loop_config["config"])
        train = config.train
        if train.deterministic:
            make_deterministic()
        context = ray.train.get_context()
        rank, world, device = context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
        if train.use_gpu:  # the driver saw GPUs in the cluster; this checks the one this worker got
            check_device("train.use_gpu", "cuda", train.precision)
        torch.manual_seed(train.seed)  # identical initial weights on every rank
        store = TrainingStore(config.data.store)
        model = build_model(config.model, pixel_size_um=store.pixel_size_um, object_area_um2=store.object_area_um2)
        if train.init_from and ray.train.get_checkpoint() is None:  # fine-tuning (a resumed run has its own state)
            from pipelines.train.parent import load_parent

            load_parent(model, train.init_from, loop_config["tracking_uri"])  # before the weights' average copies them
        model = model.to(device)
        if train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, train)
        average = make_weight_average(model, train.weight_average) if rank == 0 else None  # rank 0 validates
        parts = TrainingParts(model, optimizer, build_scheduler(optimizer, train),
                              make_grad_scaler(train.precision, device), average)  # fmt: skip
        progress = {"epoch": -1, "step": 0, "best": None, "best_epoch": None, "best_scores": {}}
        if (state := _checked_checkpoint(loop_config)) is not None:
            progress = parts.restore(state)
        # DDP from 2 workers on; one worker's model stays unwrapped (no gradient buckets, no allreduce)
        parts.model = ray.train.torch.prepare_model(model, move_to_device=False)
        if train.compile:
            parts.model = torch.compile(parts.model)
        dataset, loader = _patches(config, store, rank, device)
        worker = cls(config, rank, world, device, parts, dataset, loader, progress, loop_config["mlflow_run_id"])
        nodes = _worker_nodes(world)
        if rank == 0:
            from mlflow.tracking import MlflowClient

            worker.tracker = MlflowClient(tracking_uri=loop_config["tracking_uri"])
            worker.validation = load_validation(store)
            worker.rule = ObjectRule.from_config(config.infer, model, store.pixel_size_um, f"{store.location} (val)")
            # where this attempt's workers run (a restart after a node loss may differ)
            log_metrics(worker.tracker, worker.run_id, {"ray/worker_nodes": len(nodes)}, progress["step"])
            worker.tracker.set_tag(worker.run_id, WORKER_NODES_TAG, ",".join(nodes))
        return worker

    @property
    def images(self) -> int:
        """Patches per epoch over all workers."""
        return self.world * len(self.dataset)

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over this epoch's patches; (mean loss over all workers, seconds)."""
        train, loss_fn = self.config.train, WeightedLoss(self.config.loss.dice_weight)
        self.dataset.set_epoch(epoch)
        parts = self.parts
        parts.model.train()
        if train.batchnorm_frozen:
            freeze_batchnorm(parts.model)  # fine-tuning: the parent's statistics, not those of a few regions
        started, loss_sum, logging = time.perf_counter(), torch.zeros((), device=self.device), []
        for batch in self.loader:
            result = train_step(parts.model, batch, parts.optimizer, loss_fn, parts.scaler, device=self.device,
                                precision=train.precision, channels_last=train.channels_last,
                                grad_clip=train.grad_clip)  # fmt: skip
            parts.scheduler.step()
            if parts.average is not None:
                parts.average.update_parameters(unwrap(parts.model))
            self.progress["step"] += 1
            loss_sum += result.loss  # stays on the device: no wait for the GPU
            if self.tracker is not None and self.progress["step"] % train.log_every_steps == 0:
                logging.append(self._log_step(result))
        seconds = time.perf_counter() - started
        for operation in logging:  # MLflow wrote these in the background; they must land before the checkpoint
            operation.wait()
        return _mean_across_workers(float(loss_sum) / len(self.loader), self.device), seconds

    def _log_step(self, result):
        metrics = {"train/step_loss": float(result.loss), "train/grad_norm": float(result.grad_norm)}
        metrics["train/lr"] = self.parts.scheduler.get_last_lr()[0]
        return log_metrics(self.tracker, self.run_id, metrics, self.progress["step"], synchronous=False)

    def validate_and_checkpoint(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        """Rank 0 scores the validation images as inference predicts them, keeps the best model and logs; every
        rank reports the epoch, rank 0 with the checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                self._validate(epoch, metrics, Path(tmp))
                save_state(self.parts.state(**{**self.progress, "epoch": epoch}), tmp)
                checkpoints.record(self.tracker, self.run_id, tmp, epoch)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                # Straight to the process's stdout, which Ray forwards to the driver once (print is teed).
                train, iou = self.config.train, self.config.evaluate.iou_threshold
                sys.__stdout__.write(_epoch_line(epoch, train.epochs, metrics, seconds, iou) + "\n")
                sys.__stdout__.flush()
            ray.train.report(metrics, checkpoint=checkpoint)

    def _validate(self, epoch: int, metrics: dict[str, float], folder: Path) -> None:
        """Score, keep the best model in ``folder`` (carried forward from the last checkpoint otherwise) with its
        scores (``best/val/...``, what its registered version is tagged with), log."""
        infer, metric = self.config.infer, self.config.tracking.champion_metric
        settings = InferenceSettings.from_config(infer, device=str(self.device))
        scored = self.parts.scored()
        evaluation = evaluate(scored, self.validation, settings, self.rule, infer.chunk,
                              self.config.evaluate.iou_threshold)  # fmt: skip
        metrics.update({f"val/{k}": v for k, v in evaluation.scores.items()})
        if self.progress["best"] is None or metrics[metric] > self.progress["best"]:
            self.progress["best"], self.progress["best_epoch"] = metrics[metric], epoch
            self.progress["best_scores"] = {k: v for k, v in metrics.items() if k.startswith("val/")}
            save_weights(scored, folder / BEST_MODEL_DIR)
        elif previous := ray.train.get_checkpoint():  # read back from its storage: checked as a resume is
            with previous.as_directory() as directory:
                checkpoints.verify(self.tracker, self.run_id, directory, self.config.train.run_name)
                shutil.copytree(Path(directory) / BEST_MODEL_DIR, folder / BEST_MODEL_DIR)
        best = {"best/epoch": self.progress["best_epoch"], f"best/{metric}": self.progress["best"]}
        metrics.update(best | {f"best/{k}": v for k, v in self.progress["best_scores"].items()})
        log_metrics(self.tracker, self.run_id, metrics, epoch)
        if evaluation.predictions:
            first = evaluation.predictions[0]  # outlined as scored: the objects inference would write
            panel = prediction_panel(first.example.image, first.example.target, first.probability, first.objects)
            _log_picture(self.tracker, self.run_id, panel, f"epoch_{epoch:03d}.png")


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
