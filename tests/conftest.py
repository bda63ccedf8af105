"""Session fixtures shared by several test modules: a small trained model and the real slide as OME-Zarr."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipelines.convert import convert
from pipelines.prepare import prepare
from tests.helpers import ROOT, s3_bucket
from unet.config import load_config
from unet.data.dataset import PatchDataset
from unet.loss import WeightedLoss
from unet.samples import fetch_samples
from unet.training import build_model, build_optimizer, make_grad_scaler, save_weights, train_step


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net (width 8) trained for 40 steps on the real H&E nuclei: it predicts nuclei-like blobs."""
    folder = tmp_path_factory.mktemp("model")
    config = load_config(
        ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}", "model.base_channels=8"]
    )
    store = prepare(config, previews=0)
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.train.model_copy(update={"lr": 3e-3}))
    dataset = PatchDataset(store, patch_size=128, length=40 * 4, foreground_bias=0.5, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    scaler, loss_fn = make_grad_scaler("fp32", torch.device("cpu")), WeightedLoss()
    for batch in loader:
        train_step(model, batch, optimizer, loss_fn, scaler, device=torch.device("cpu"), grad_clip=1.0)
    return save_weights(model.eval(), folder / "unet")


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def cmu_ome_zarr(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Aperio slide converted to OME-Zarr (NGFF 0.5, 512-pixel chunks, a pyramid)."""
    return Path(convert(cmu_slide, tmp_path_factory.mktemp("slide") / "cmu.ome.zarr", chunk=512))


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """``s3://BUCKET`` on a real local S3-compatible server, with this process's AWS_* variables set for it."""
    with s3_bucket() as bucket:
        yield bucket
