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


def file_digests(folder: str | Path) -> dict[str, str]:
    """The sha256 of every file under ``folder``, by its path relative to it (``/``-separated), sorted."""
    import hashlib

    folder = Path(folder)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def digest_mismatch(folder: str | Path, expected: dict[str, str], ignored: frozenset[str] = frozenset()) -> str | None:
    """What differs between the files under ``folder`` and ``expected`` (``file_digests`` of the original), or None
    when they are the same files: a file changed, missing or added (``ignored`` names may be added)."""
    found = file_digests(folder)
    for name, digest in expected.items():
        if name not in found:
            return f"file {name} is missing"
        if found[name] != digest:
            return f"file {name} has changed (its sha256 is {found[name][:12]}..., was {digest[:12]}...)"
    added = sorted(set(found) - set(expected) - ignored)
    return f"file {added[0]} was added" if added else None
