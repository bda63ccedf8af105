"""A briefly trained U-Net for benchmarks and tests: 40 steps on the real H&E nuclei, enough to predict
nuclei-like blobs, so that labelling and seam merging see realistic objects (untrained weights give
none, or one object per slide)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def briefly_trained(folder: Path, base_channels: int = 8, steps: int = 40) -> Path:
    """Train a U-Net of width ``base_channels`` for ``steps`` steps of 4 x 128 x 128 patches; return its folder."""
    import torch

    from pipelines.prepare import prepare
    from unet.config import load_config
    from unet.data.dataset import PatchDataset
    from unet.loss import WeightedLoss
    from unet.model_files import save_weights
    from unet.training import build_model, build_optimizer, make_grad_scaler, train_step

    config = load_config(
        ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}", f"model.base_channels={base_channels}"]
    )
    store = str(folder / "he.zarr") if (folder / "he.zarr").exists() else prepare(config, previews=0)
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.train.model_copy(update={"lr": 3e-3}))
    dataset = PatchDataset(store, patch_size=128, length=steps * 4, foreground_bias=0.5, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    scaler, loss_fn = make_grad_scaler("fp32", torch.device("cpu")), WeightedLoss()
    for batch in loader:
        train_step(model, batch, optimizer, loss_fn, scaler, device=torch.device("cpu"), grad_clip=1.0)
    return save_weights(model.eval(), folder / f"unet{base_channels}")


def with_resolution(model_dir: Path, folder: Path, pixel_size_um: float, object_area_um2: dict | None = None) -> Path:
    """A copy of the model in ``model_dir`` that says it was trained at ``pixel_size_um`` (and on objects of
    ``object_area_um2``): the same weights, read at another resolution by ``pipelines.infer``."""
    import json
    import shutil

    from unet.model_files import ARCHITECTURE_FILE

    copy = folder / f"{model_dir.name}-{pixel_size_um:g}um"
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    architecture = json.loads((copy / ARCHITECTURE_FILE).read_text()) | {"pixel_size_um": pixel_size_um}
    if object_area_um2 is not None:
        architecture["object_area_um2"] = object_area_um2
    (copy / ARCHITECTURE_FILE).write_text(json.dumps(architecture, indent=2))
    return copy
