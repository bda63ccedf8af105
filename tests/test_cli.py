"""Every entry point that reads a config takes --config and --set, prints/saves the resolved config and fails
cleanly; one that reads none offers none of these options."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(  # modules, and packages with a __main__
    f"pipelines.{p.stem if p.stem != '__main__' else p.parent.name}"
    for p in [*(ROOT / "pipelines").glob("*.py"), *(ROOT / "pipelines").glob("*/__main__.py")]
    if 'if __name__ == "__main__":' in p.read_text()
)
CONFIG_OPTIONS = {"--config", "--set", "--print-config", "--save-config"}


def reads_config(module: str) -> bool:
    """Whether the entry point's ``main`` takes a config: ``main(config, args)``, not ``main(args)``."""
    path = ROOT / Path(*module.split("."))
    tree = ast.parse((path / "__main__.py" if path.is_dir() else path.with_suffix(".py")).read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    return main.args.args[0].arg == "config"


CONFIG_ENTRY_POINTS = [module for module in ENTRY_POINTS if reads_config(module)]


def run_module(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_entry_points_are_found() -> None:
    expected = {"pipelines.demo", "pipelines.prepare", "pipelines.train", "pipelines.infer", "pipelines.fetch_samples"}
    assert expected <= set(ENTRY_POINTS)
    assert {"pipelines.prepare", "pipelines.train", "pipelines.infer"} <= set(CONFIG_ENTRY_POINTS)
    assert {"pipelines.convert", "pipelines.export"} <= set(ENTRY_POINTS) - set(CONFIG_ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_config_options_are_offered_where_a_config_is_read(module: str) -> None:
    result = run_module(module, "--help")
    assert result.returncode == 0, result.stderr
    offered = {option for option in CONFIG_OPTIONS if option in result.stdout}
    assert offered == (CONFIG_OPTIONS if reads_config(module) else set()), module
    if reads_config(module):
        return
    for option, value in (("--config", "configs/default.yaml"), ("--set", "train.lr=0.02")):
        result = run_module(module, option, value)  # the value may be taken for a positional argument
        assert result.returncode == 2 and f"unrecognized arguments: {option}" in result.stderr


@pytest.mark.parametrize("module", CONFIG_ENTRY_POINTS)
def test_print_config_applies_overrides(module: str, tmp_path: Path) -> None:
    saved = tmp_path / "resolved.yaml"
    result = run_module(
        module,
        "--config", "configs/default.yaml",
        "--set", "train.lr=0.02",
        "--set", "model.base_channels=8",
        "--print-config",
        "--save-config", str(saved),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == 0.02 and printed["model"]["base_channels"] == 8
    assert yaml.safe_load(saved.read_text()) == printed


@pytest.mark.parametrize("module", CONFIG_ENTRY_POINTS)
def test_config_errors_are_one_line_and_exit_2(module: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    result = run_module(module, "--config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown key 'train.lrr'" in lines[0] and str(bad) in lines[0]

    result = run_module(module, "--set", "model.depth=zero")
    assert result.returncode == 2 and "--set: model.depth:" in result.stderr

    result = run_module(module, "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr


HEAVY_MODULES = {"torch", "mlflow", "ray", "dask.array", "distributed", "zarr", "ome_zarr"}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_imports_no_heavy_modules(module: str) -> None:
    """--help answers at once: heavy modules are imported where they are used, not at module level."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    # -X importtime writes "import time: self [us] | cumulative | <indent>name" for every module imported
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "pipelines.cli" in imported  # the report was read correctly
    assert not HEAVY_MODULES & imported, f"{module} --help imports {sorted(HEAVY_MODULES & imported)}"
