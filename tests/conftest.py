"""Session fixtures shared by several test modules: a small trained model and the real slide as OME-Zarr."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.models import briefly_trained
from pipelines.convert import convert
from tests.helpers import s3_bucket
from unet.samples import fetch_samples


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net (width 8) trained for 40 steps on the real H&E nuclei: it predicts nuclei-like blobs."""
    return briefly_trained(tmp_path_factory.mktemp("model"), base_channels=8)


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
