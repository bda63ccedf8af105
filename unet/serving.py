"""Loading a saved U-Net for prediction, including as an MLflow ``python_function`` model.

An MLflow model logged by ``pipelines.registry`` names this module as its ``loader_module``, so
``mlflow.pyfunc.load_model(uri)`` calls ``_load_pyfunc`` here: the weights are read from
safetensors and the architecture from JSON; nothing is unpickled. This module does not import
MLflow.
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

    ``model_config`` holds ``infer`` settings (``device``, ``precision``, ``chunk_size``, ``tta``, ...), e.g.
    ``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda", "precision": "bf16"})``; unset ones take
    the ``infer`` defaults, except the device: a GPU when PyTorch sees one.
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


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> UNetPredictor:
    """MLflow's entry point for ``loader_module`` models (``model_config``: keys of the ``infer`` section)."""
    settings = {"device": "cuda" if torch.cuda.is_available() else "cpu", **(model_config or {})}
    return UNetPredictor(load_weights(Path(data_path)), InferConfig(**settings))
