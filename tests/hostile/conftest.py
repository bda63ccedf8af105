"""The hostile-input tests' fixtures: this process's address space capped during every test here, a tiny untrained
model, and a folder for the MLflow database outside each test's own."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile import MEMORY_CAP
from unet.config import load_config


@pytest.fixture(autouse=True)
def memory_capped() -> Iterator[None]:
    """During each test this process's address space may grow by MEMORY_CAP at most: a check gone missing fails
    the test with a MemoryError instead of hurting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = in_use + MEMORY_CAP if hard == resource.RLIM_INFINITY else min(in_use + MEMORY_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained U-Net (3 channels, width 4, depth 2): what it predicts does not matter here."""
    import torch

    from unet.model_files import save_weights
    from unet.training import build_model

    torch.manual_seed(0)
    config = load_config(None, ["model.base_channels=4", "model.depth=2"])
    return save_weights(build_model(config.model).eval(), tmp_path_factory.mktemp("model") / "unet")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the MLflow database goes: outside every test's own folder."""
    return tmp_path_factory.mktemp("state")
