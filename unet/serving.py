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

from unet.devices import check_device
from unet.model import UNet, autocast_context
from unet.training import load_weights


class UNetPredictor:
    """``predict(batch)``: NCHW float32 array (normalised images) to NCHW class probabilities (float32, on the CPU).

    ``device`` and ``precision`` say where and how the model runs; with MLflow, pass them as the model config:
    ``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda", "precision": "bf16"})``. Without one the
    model runs on a GPU when PyTorch sees one, in fp32.
    """

    def __init__(self, model: UNet, device: str = "cpu", precision: str = "fp32") -> None:
        check_device("model_config device", device, precision)
        self.device, self.precision = torch.device(device), precision
        self.model = model.eval().to(self.device)

    @torch.inference_mode()
    def predict(self, model_input: np.ndarray | dict[str, np.ndarray], params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):  # MLflow passes named tensors as {"image": array}
            model_input = model_input["image"]
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).to(self.device)
        with autocast_context(self.device.type, self.precision):
            logits = self.model(x)
        return logits.float().softmax(dim=1).cpu().numpy()


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> UNetPredictor:
    """MLflow's entry point for ``loader_module`` models (``model_config``: ``device``, ``precision``)."""
    settings = dict(model_config or {})
    device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return UNetPredictor(load_weights(Path(data_path)), device=device, precision=settings.get("precision", "fp32"))
