"""The framework-free parts of training: model/optimiser construction, one optimisation step and checkpoint
state (validation is ``unet.evaluation``). ``pipelines.train`` runs these under
Ray Train; ``benchmarks`` runs the same step in a plain loop."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet.config import ModelConfig, TrainConfig
from unet.model import UNet, autocast_context


def build_model(
    config: ModelConfig, *, pixel_size_um: float | None = None, object_area_um2: dict[str, float] | None = None
) -> UNet:
    """A fresh U-Net as configured (activation checkpointing applied if asked for), recording the pixel size and
    the object sizes of the data it is trained on (``TrainingStore.pixel_size_um``, ``.object_area_um2``): its
    saved files carry them to inference."""
    model = UNet(
        config.n_channels,
        config.n_classes,
        config.bilinear,
        base_channels=config.base_channels,
        depth=config.depth,
        pixel_size_um=pixel_size_um,
        object_area_um2=object_area_um2,
    )
    return model.use_checkpointing(config.checkpointing)


def make_deterministic() -> None:
    """Deterministic GPU training (``train.deterministic``): cuDNN's deterministic convolution algorithms, no
    autotuning, cuBLAS with a fixed workspace, and an error from any operation without a deterministic version.
    Call before the process's first CUDA operation (the cuBLAS setting is read then)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay to 0 over all steps of the run."""
    total = config.epochs * config.steps_per_epoch

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (None when ``decay`` is 0):
    ``update_parameters(model)`` after every step moves it by ``1 - min(decay, (1 + n) / (10 + n))`` after n steps,
    so a short run is not dominated by its initial weights."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def towards(average: list[torch.Tensor], current: list[torch.Tensor], _: torch.Tensor) -> None:
        # The step count from the average's own counter, which lives in host memory: the copy AveragedModel passes
        # in is on the GPU, and reading it would stall every training step until the GPU caught up.
        steps = int(averaged.n_averaged)
        rate = min(decay, (1 + steps) / (10 + steps))
        floats = [(a, c) for a, c in zip(average, current, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - rate)
        for a, c in zip(average, current, strict=True):
            if not a.is_floating_point():  # BatchNorm's num_batches_tracked: the latest
                a.copy_(c)

    averaged = AveragedModel(unwrap(model), multi_avg_fn=towards, use_buffers=True)  # n_averaged: on the host
    return averaged


def freeze_batchnorm(model: nn.Module) -> None:
    """Every BatchNorm layer of ``model`` (in train mode) to eval mode: it normalises with its running statistics and
    leaves them as they are, while its scale and shift still learn. Call after each ``model.train()``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 on GPU (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """Continue a run's loss scaling from a checkpoint. A checkpoint written without a scaler (bf16, fp32 or on a
    CPU) holds an empty state: the scaler then starts afresh, as a new fp16 run would."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


@dataclass
class StepResult:
    """The step's loss and gradient norm, as 0-d tensors on the training device: reading one (``float()``)
    waits for the device to finish, so a loop reads them only when it logs."""

    loss: torch.Tensor
    grad_norm: torch.Tensor


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    grad_clip: float | None = None,
) -> StepResult:
    """One optimisation step on ``batch`` (keys image, target, weights)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    target = batch["target"].to(device, non_blocking=True)
    weights = batch["weights"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device.type, precision):
        logits = model(image)
    loss = loss_fn(logits, target, weights)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return StepResult(loss=loss.detach(), grad_norm=norm.detach())


# -- checkpoints ----------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> UNet:
    """The UNet inside a DistributedDataParallel and/or ``torch.compile`` wrapper (or the model itself)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model  # type: ignore[return-value]
        model = inner


@dataclass
class TrainingParts:
    """What training changes step by step, and every checkpoint saves whole so that training continues exactly:
    the model, the moving average of its weights (None where none is kept), optimiser, LR schedule, gradient
    scaler, and (in ``state``) the RNG."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    average: torch.optim.swa_utils.AveragedModel | None = None

    def state(self, **progress: Any) -> dict[str, Any]:
        """The parts' state (the model's plain weights, whatever wraps it) with ``progress`` (epoch, step...)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "weight_average": self.average.state_dict() if self.average is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": progress,
        }

    def restore(self, state: dict[str, Any]) -> dict[str, Any]:
        """Load ``state`` into the parts; return its progress."""
        unwrap(self.model).load_state_dict(state["model"])
        if self.average is not None and state.get("weight_average"):  # checkpoints of earlier versions have none
            self.average.load_state_dict(state["weight_average"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_scaler(self.scaler, state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        return {"best_scores": {}, **state["progress"]}  # best_scores: not in checkpoints of earlier versions

    def scored(self) -> nn.Module:
        """The weights that are validated, kept as the best model and registered: the average where one is kept."""
        return self.average.module if self.average is not None else unwrap(self.model)


def save_state(state: dict[str, Any], directory: str | Path) -> None:
    torch.save(state, Path(directory) / "state.pt")


def load_state(directory: str | Path) -> dict[str, Any]:
    """Load ``state.pt`` with ``weights_only=True``: tensors and plain containers, no code."""
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
