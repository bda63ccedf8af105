"""Loading a saved U-Net for prediction, including as an MLflow ``python_function`` model.

An MLflow model logged by ``pipelines.registry`` names this module as its ``loader_module``, so
``mlflow.pyfunc.load_model(uri)`` calls ``_load_pyfunc`` here: the weights are read from
safetensors and the architecture from JSON; nothing is unpickled. This module does not import
MLflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unet.model import UNet
from unet.training import load_weights


class UNetPredictor:
    """``predict(batch)``: NCHW float32 array (normalised images) to NCHW class probabilities."""

    def __init__(self, model: UNet) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def predict(self, model_input: np.ndarray | dict[str, np.ndarray], params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):  # MLflow passes named tensors as {"image": array}
            model_input = model_input["image"]
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.model(x).softmax(dim=1).numpy()


def _load_pyfunc(data_path: str) -> UNetPredictor:
    """MLflow's entry point for ``loader_module`` models."""
    return UNetPredictor(load_weights(Path(data_path)))
