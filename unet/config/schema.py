"""The typed configuration shared by every entry point.

One ``Config`` object has a section per concern (model, data, loss, train, infer, tracking).
Every section forbids unknown keys, so a typo fails loudly instead of being ignored. The
descriptions are the reference documentation (``docs/config.md`` is generated from them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from unet.config.infer import InferConfig
from unet.config.section import Precision, Section


class ModelConfig(Section):
    """Architecture of the U-Net; together with the weights it fully defines a model."""

    n_channels: int = Field(3, ge=1, description="Input image channels (3 for RGB H&E).")
    n_classes: int = Field(2, ge=1, description="Output classes (2: background, foreground).")
    bilinear: bool = Field(False, description="Bilinear up-sampling instead of transposed convolutions.")
    base_channels: int = Field(64, ge=1, description="Feature width of the first level (the paper: 64).")
    depth: int = Field(4, ge=1, le=8, description="Number of 2x down-sampling steps (the paper: 4).")
    checkpointing: bool = Field(False, description="Activation checkpointing: less memory, ~30% more compute.")


class DataConfig(Section):
    """Where training data comes from and how patches are drawn from it."""

    images: str | None = Field(None, description="Folder (or glob) of training images (with data.annotations: slides).")
    labels: str | None = Field(None, description="Folder (or glob) of instance label images, same stems.")
    store: str = Field("data/train.zarr", description="Training Zarr store (path or s3:// URL) of pipelines.prepare.")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of images held out for validation.")
    patch_size: int = Field(256, ge=16, description="Training patch side (a multiple of 2**model.depth).")
    foreground_bias: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability that a patch is centred on a foreground pixel."
    )
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="Micrometres per pixel of the training store: images whose metadata states another size are "
        "resampled to it; images without metadata are taken to have it. null: the images' metadata must state one "
        "size.",
    )
    max_image_pixels: int = Field(
        2**28,
        ge=1,
        description="pipelines.prepare refuses an image or label image of more pixels (height x width), read from "
        "its header before any pixel: training reads each image whole (default 2**28, 268 Mpx).",
    )
    annotations: str | None = Field(
        None,
        description="QuPath annotations instead of data.labels: a GeoJSON file (File > Export objects as GeoJSON) of "
        "the slide data.images names, a folder or glob of them (slide NAME.EXT with NAME.geojson), or a CSV/YAML "
        "manifest with the columns slide and annotations. Regions say where annotation is complete; objects inside "
        "them become instance labels at the training pixel size (README, 'Improving the model with your "
        "annotations').",
    )
    region_classes: list[str] = Field(
        ["Region*", "Training area"],
        description="QuPath classes (fnmatch patterns) of the annotations that mark regions where every object is "
        "annotated; each region becomes one training example.",
    )
    object_classes: list[str] = Field(
        ["Nucleus"],
        description="QuPath classes (fnmatch patterns) of the objects (annotations, detections or cells) that become "
        "instance labels. []: every detection or cell, whatever its class.",
    )
    ignore_classes: list[str] = Field(
        ["Ignore*"], description="QuPath classes of annotations whose area is left out of the loss and the scores."
    )
    rectangles_are_regions: bool = Field(
        True, description="An unclassified rectangle annotation marks a region too (QuPath's rectangle tool)."
    )
    split_by: Literal["region", "slide"] = Field(
        "region",
        description="With data.annotations: hold out whole regions (region) or whole slides (slide) for validation; "
        "never patches of one region.",
    )
    augment: bool = Field(True, description="Augment training patches (flips, rotations, elastic, intensity).")
    elastic_prob: float = Field(0.5, ge=0, le=1, description="Probability of the paper's elastic deformation.")
    elastic_sigma: float = Field(
        10.0, ge=0, description="Std (pixels) of the random displacements on the coarse grid (the paper: 10)."
    )
    elastic_grid: int = Field(3, ge=2, description="Control points per side of the coarse grid (the paper: 3).")
    intensity_jitter: float = Field(0.1, ge=0, le=1, description="Random intensity scale and shift, +- this fraction.")


class LossConfig(Section):
    """The paper's weighted cross-entropy (eq. 1-2), optionally plus Dice."""

    w0: float = Field(10.0, ge=0.0, description="Weight of the border term between touching objects.")
    sigma: float = Field(5.0, gt=0.0, description="Width (pixels) of the border term.")
    class_balance: bool = Field(True, description="Add the class-frequency balancing term w_c.")
    dice_weight: float = Field(0.0, ge=0.0, description="Weight of an added soft Dice loss (0: off).")


class TrainConfig(Section):
    """Optimisation and the Ray Train run."""

    run_name: str = Field("unet", min_length=1, description="Ray Train run name; re-using it resumes.")
    storage_path: str = Field(
        "runs", description="Where Ray keeps checkpoints: local path, shared filesystem or s3://..."
    )
    num_workers: int = Field(2, ge=1, description="Data-parallel workers (processes).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; otherwise CPU with gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved for each worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places workers on nodes (SPREAD: across nodes, e.g. to survive losing one)."
    )
    epochs: int = Field(10, ge=1, description="Number of epochs.")
    steps_per_epoch: int = Field(50, ge=1, description="Optimiser steps per epoch (patches are sampled).")
    batch_size: int = Field(4, ge=1, description="Patches per worker per step.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimiser.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (the paper: 0.99).")
    scheduler: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: off).")
    precision: Precision = Field("bf16", description="Autocast precision; fp16 uses a gradient scaler.")
    channels_last: bool = Field(True, description="Use the channels_last memory format.")
    max_failures: int = Field(2, ge=-1, description="Worker failures to recover from (-1: unlimited).")
    dashboard: bool = Field(
        False,
        description="Start the Ray dashboard (127.0.0.1:8265, token auth) with a local Ray. Off by default: its "
        "processes cost a training step on a small CPU machine several percent (docs/benchmarks.md, 'Training "
        "step'); training reports to the terminal and MLflow. A cluster's (RAY_ADDRESS) dashboard is the cluster's.",
    )
    resource_wait_s: float = Field(
        600.0,
        ge=0,
        description="How long a job on a remote (autoscaling) Ray cluster waits for the workers' CPUs and GPUs "
        "before it gives up; a local Ray that lacks them fails at once.",
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader processes per training worker, sampling and augmenting patches off the training "
        "loop. null: 4 with GPUs, 0 on CPU (where they would compete with the worker for its cores).",
    )
    log_every_steps: int = Field(
        10, ge=1, description="Log per-step metrics to MLflow every this many steps (each read waits for the GPU)."
    )
    compile: bool = Field(False, description="torch.compile the model before training.")
    weight_average: float = Field(
        0.99,
        ge=0,
        lt=1,
        description="Decay per step of an exponential moving average of the weights (and BatchNorm statistics), "
        "warmed up as min(decay, (1 + n) / (10 + n)) after n steps; validation, the best model and the registered "
        "version use the average. 0: the raw weights.",
    )
    init_from: str | None = Field(
        None,
        description="Fine-tune: start from this model's weights (models:/NAME@ALIAS, models:/NAME/VERSION or a model "
        "folder; on a cluster, one every node reaches) instead of random ones. Its architecture must be model.*, its "
        "channels and pixel size the store's. The new version's lineage names it. null: random weights.",
    )
    freeze_batchnorm: bool | None = Field(
        None,
        description="Keep BatchNorm's running statistics as they are while training (its scale and shift still "
        "learn): when fine-tuning, a few annotated regions would otherwise replace the parent's statistics, which "
        "cost a fine-tuned model more than it gained (docs/benchmarks.md, 'The annotation loop'). null: frozen with "
        "train.init_from, updated otherwise.",
    )
    seed: int = Field(0, description="Seed for weights, sampling and augmentation.")
    deterministic: bool = Field(
        False,
        description="On GPUs, deterministic cuDNN convolutions and PyTorch's deterministic algorithms "
        "(CUBLAS_WORKSPACE_CONFIG=:4096:8): the same seed, data, config, GPUs and software give the same weights, "
        "more slowly; needs model.bilinear false. CPU training is deterministic without it.",
    )

    @property
    def batchnorm_frozen(self) -> bool:
        """``freeze_batchnorm``, or (null) whether the run fine-tunes (``init_from``)."""
        return self.freeze_batchnorm if self.freeze_batchnorm is not None else bool(self.init_from)


class EvaluateConfig(Section):
    """Evaluation of a model on held-out labelled images of a training store. The model predicts and segments as
    ``pipelines.infer`` does, with the ``infer`` section's settings (device, precision, chunk size, threshold,
    probability storage, hole filling, smallest object): the scores describe the objects inference writes."""

    model: str = Field("models:/unet@champion", description="models:/NAME@ALIAS, models:/NAME/VERSION or a folder.")
    store: str | None = Field(None, description="Training store to evaluate on (null: data.store).")
    baseline: str | None = Field(
        None,
        description="A second model (e.g. models:/NAME@champion) scored on the same images in the same job: both rows "
        "and their difference are printed and logged. null: evaluate.model alone.",
    )
    split: Literal["val", "train"] = Field("val", description="Which examples of the store.")
    iou_threshold: float = Field(
        0.5, ge=0.5, lt=1, description="IoU above which a prediction matches an object (also in training validation)."
    )
    output: str = Field("outputs/evaluate", description="Folder for the per-image table and pictures.")


class TrackingConfig(Section):
    """MLflow tracking and model registry."""

    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI. MLFLOW_TRACKING_URI in the environment overrides the config file; --set "
        "overrides both.",
    )
    experiment: str = Field("unet", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("unet", min_length=1, description="Registered model name.")
    champion_metric: Literal["val/f1", "val/dice", "val/iou", "val/precision", "val/recall"] = Field(
        "val/f1", description="Validation metric (higher is better) that picks the best epoch and the champion."
    )
    promote: bool = Field(
        True,
        description="Move the 'champion' alias to a new version that beats the champion: both are scored on the run's "
        "validation split in the training job, with tracking.champion_metric.",
    )
    promote_margin: float = Field(
        0.0,
        ge=0,
        description="The champion moves only if the new version's tracking.champion_metric exceeds the champion's "
        "(scored on the same images in the same job) by more than this.",
    )


class Config(Section):
    """The whole configuration. Every section is optional in YAML and has working defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _sizes_fit_the_model(self) -> Config:
        multiple = 2**self.model.depth
        sizes = {"data.patch_size": self.data.patch_size, "infer.tile_size": self.infer.tile_size}
        for name, value in sizes.items():
            if value and value % multiple:
                raise ValueError(f"{name}={value} must be a multiple of 2**model.depth={multiple}")
        return self

    @model_validator(mode="after")
    def _deterministic_on_gpus(self) -> Config:
        # PyTorch has no deterministic CUDA backward for bilinear interpolation: it would fail at the first step
        if self.train.deterministic and self.train.use_gpu and self.model.bilinear:
            raise ValueError(
                "train.deterministic on GPUs needs model.bilinear=false: bilinear up-sampling has no deterministic "
                "CUDA backward (transposed convolutions have)"
            )
        return self
