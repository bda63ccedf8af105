"""`make wheelhouse` and `make install-offline` (README "Air-gapped GPU nodes"): the wheelhouse alone installs the
project into an environment that has only torch, with no package index, and the GPU benchmark runs there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

TORCH_PIN = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, env=env)


def python(venv: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True, **kwargs)


def offline_env() -> dict[str, str]:
    """As on an air-gapped node: no pip configuration (no index, no find-links of this machine), and any
    connection pip might still try goes to a closed local port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    proxy = "http://127.0.0.1:9"
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy}


def test_install_offline_refuses_an_environment_without_torch(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    result = make("install-offline", f"PYTHON={tmp_path / 'venv' / 'bin' / 'python'}", f"WHEELHOUSE={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.splitlines()[0].startswith("install-offline: ") and "cannot import torch" in result.stderr


def test_install_offline_refuses_a_folder_that_is_no_wheelhouse(tmp_path: Path) -> None:
    result = make("install-offline", f"PYTHON={sys.executable}", f"WHEELHOUSE={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        f"install-offline: {tmp_path} is not a wheelhouse (no constraints.txt): make wheelhouse WHEELHOUSE=DIR"
    )


@pytest.mark.cluster
@pytest.mark.timeout(2400)
def test_wheelhouse_installs_offline_beside_torch_and_runs_the_benchmark(tmp_path: Path) -> None:
    """Builds the wheelhouse (downloads ~650 MB; UNET_WHEELHOUSE=DIR reuses one built before), makes a venv with
    only torch (the machine's pip: the CPU wheel here; elsewhere PyPI's CUDA one), installs offline into it, and
    runs `benchmarks.gpu --device cpu --quick` with that venv's python. unet and pipelines come from the project's
    wheel; benchmarks/ and configs/ are not in the wheel (repository tools and files), so a copy of just those two
    folders is the working directory, and the test checks the project's packages are not imported from it."""
    wheelhouse = Path(os.environ.get("UNET_WHEELHOUSE", tmp_path / "wheelhouse"))
    if "UNET_WHEELHOUSE" not in os.environ:
        built = make("wheelhouse", f"WHEELHOUSE={wheelhouse}")
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = [wheel.name for wheel in wheelhouse.glob("*.whl")]
    assert not [w for w in wheels if w.startswith(("torch-", "triton-", "nvidia_"))]
    assert [w for w in wheels if w.startswith("unet_wsi-")]
    assert {"cp311", "cp312"} <= {w.split("-")[2] for w in wheels if w.startswith("numpy-")}

    venv = tmp_path / "venv"
    venv_python = f"PYTHON={venv / 'bin' / 'python'}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    got_torch = python(venv, "-m", "pip", "install", "--quiet", TORCH_PIN, "-c", str(ROOT / "constraints.txt"))
    assert got_torch.returncode == 0, got_torch.stderr
    torch_version = python(venv, "-c", "import torch; print(torch.__version__)").stdout

    installed = make("install-offline", venv_python, f"WHEELHOUSE={wheelhouse}", env=offline_env())
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert "--no-index" in installed.stdout and "Looking in indexes" not in installed.stdout
    assert python(venv, "-c", "import torch; print(torch.__version__)").stdout == torch_version  # the node's torch kept

    tree = tmp_path / "tree"  # what the wheel does not hold; the benchmark runs its subprocesses from here
    for folder in ("benchmarks", "configs"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # (Ray and MLflow talk HTTP on localhost)
    imported = "import unet, pipelines, benchmarks; print(unet.__file__, pipelines.__file__, benchmarks.__file__)"
    unet_file, pipelines_file, benchmarks_file = python(venv, "-c", imported, cwd=tree, env=env).stdout.split()
    site = str(venv / "lib")
    assert unet_file.startswith(site) and pipelines_file.startswith(site) and benchmarks_file.startswith(str(tree))

    output = tmp_path / "bench.md"
    quick = ["--device", "cpu", "--quick", "--output", str(output)]
    bench = python(venv, "-m", "benchmarks.gpu", *quick, cwd=tree, env=env)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    assert "## GPU: inference and training on one device" in output.read_text()
