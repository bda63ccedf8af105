"""The saved-model format: weights as safetensors plus the architecture as JSON, loadable without unpickling
anything (the MLflow artifact, Ray checkpoints' best model and plain folders all use it)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from unet.model import UNet

WEIGHTS_FILE = "weights.safetensors"
ARCHITECTURE_FILE = "model.json"
BEST_MODEL_DIR = "best_model"  # in a training checkpoint: the weights of the best epoch so far


def save_weights(model: UNet, directory: str | Path) -> Path:
    """Weights as safetensors plus the architecture as JSON: loadable without unpickling anything."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    (directory / ARCHITECTURE_FILE).write_text(json.dumps(model.architecture(), indent=2))
    return directory


def load_weights(directory: str | Path, map_location: str = "cpu") -> UNet:
    """Rebuild the ``UNet`` saved by ``save_weights``."""
    directory = Path(directory)
    architecture = json.loads((directory / ARCHITECTURE_FILE).read_text())
    model = UNet(**architecture)
    model.load_state_dict(load_file(directory / WEIGHTS_FILE, device=map_location))
    return model.eval()
