"""Hostile inputs (issue 17): slides, label images, manifests and configs from outside that claim absurd sizes,
are cut short or corrupt (``test_inputs.py``), point an output outside its folder or at an input (``test_paths.py``),
or hold huge label ids. What the tests share is here: a snapshot of a user's folder, ``pipelines.infer`` in this
process, ``python -m pipelines.*`` with its memory capped; their fixtures are in ``conftest.py``."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import zarr

from pipelines.infer.__main__ import cli as infer_cli
from tests.helpers import ROOT, environment
from unet.config import load_config

MEMORY_CAP = 4 * 2**30  # address space of a command-line run, or added in this process by a test: far below what
# any hostile input claims
SMALL = ("infer.chunk_size=64", "infer.tile_size=64")


def snapshot(root: Path) -> dict[str, str]:
    """Every file, folder and symlink under ``root``: a file's sha256, "dir", or a link's target."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def infer(model: Path, state: Path, input: Path | str, output: Path | str, *extra: str) -> int:
    """``python -m pipelines.infer`` in this process (its exit status)."""
    args = ["--config", str(ROOT / "configs" / "infer.yaml"), "--set", f"infer.model={model}"]
    args += ["--set", f"infer.input={input}", "--set", f"infer.output={output}"]
    args += ["--set", f"tracking.tracking_uri=sqlite:///{state / 'mlflow.db'}"]
    for item in (*SMALL, *extra):
        args += [item] if item.startswith("--") else ["--set", item]
    return infer_cli(args)


def error_line(err: str, prog: str) -> str:
    """The one error line a command printed (log lines aside); fails unless there is exactly one, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"python -m pipelines.{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_capped(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pipelines.ARGS`` as a user runs it, with at most MEMORY_CAP of address space."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=environment(), capture_output=True,
                          text=True, timeout=300, preexec_fn=cap)  # fmt: skip


def prepare_config(tmp_path: Path, images: Path, labels: Path, *extra: str, channels: int = 1):
    overrides = [f"data.images={images}", f"data.labels={labels}", f"data.store={tmp_path / 'train.zarr'}"]
    overrides += [f"model.n_channels={channels}", "data.val_fraction=0", "data.pixel_size_um=0.5"]
    return load_config(None, [*overrides, *extra])


def small_zarr(path: Path, shape: tuple[int, ...] = (3, 64, 64)) -> Path:
    zarr.create_array(path, shape=shape, chunks=(3, 32, 32), dtype="uint8")
    return path
