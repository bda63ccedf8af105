"""Loading a saved U-Net for prediction, including as an MLflow ``python_function`` model.

MLflow models logged by ``pipelines.models`` name ``pipelines.serving`` as their ``loader_module`` (it checks the
files' digests, then calls ``load_predictor`` here; earlier ones name this module): the weights are read from
safetensors and the architecture from JSON; nothing is unpickled. This module does not import MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet.config import InferConfig
from unet.devices import check_device
from unet.inference import ChunkPredictor, InferenceSettings, predict_image
from unet.model import UNet
from unet.model_files import load_weights


class UNetPredictor:
    """``predict(batch)``: NCHW float32 images, normalised to (0, 1) by the training rule, to their NHW foreground
    probability (float32), predicted as ``pipelines.infer`` predicts a slide (``unet.inference.predict_image``).

    ``model_config`` holds ``infer`` settings (PREDICTION_KEYS: ``device``, ``precision``, ``chunk_size``, ``tta``,
    ...), e.g. ``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda", "precision": "bf16"})``; the model
    was logged with those its training validated with, and the device ``auto``: a GPU when PyTorch sees one.
    """

    def __init__(self, model: UNet, infer: InferConfig) -> None:
        check_device("model_config device", infer.device, infer.precision)
        self.chunk = infer.chunk
        self.predictor = ChunkPredictor(model, InferenceSettings.from_config(infer))

    def predict(self, model_input: np.ndarray | dict[str, np.ndarray], params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):  # MLflow passes named tensors as {"image": array}
            model_input = model_input["image"]
        batch = np.asarray(model_input, dtype=np.float32)
        return np.stack([predict_image(self.predictor, image, None, self.chunk) for image in batch])


# The infer settings a pyfunc model takes in ``model_config``: how it predicts, not what or where.
PREDICTION_KEYS = ("device", "precision", "chunk_size", "tile_size", "batch_size", "pass_memory_mb", "compile",
                   "channels_last", "blend", "blend_overlap", "tta")  # fmt: skip
AUTO_DEVICE = "auto"  # a GPU when PyTorch sees one, else the CPU


def default_model_config(infer: InferConfig) -> dict[str, Any]:
    """The ``model_config`` a model is logged with: ``infer``'s prediction settings (those its validation used),
    the device left to the machine that loads it. MLflow accepts at load time only the keys logged here."""
    return {key: getattr(infer, key) for key in PREDICTION_KEYS} | {"device": AUTO_DEVICE}


def load_predictor(data_path: str | Path, model_config: dict[str, Any] | None = None) -> UNetPredictor:
    """The predictor of the model saved in ``data_path`` with ``model_config``'s settings (keys of the ``infer``
    section); unset ones take the ``infer`` defaults, the device ``auto`` or unset a GPU when PyTorch sees one."""
    settings = dict(model_config or {})
    if settings.get("device", AUTO_DEVICE) == AUTO_DEVICE:
        settings["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return UNetPredictor(load_weights(Path(data_path)), InferConfig(**settings))


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> UNetPredictor:
    """MLflow's entry point for models logged before ``pipelines.serving`` (which checks digests) was their loader."""
    return load_predictor(data_path, model_config)
