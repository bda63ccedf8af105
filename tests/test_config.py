"""YAML configs load into validated objects; errors name the key, the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unet.config import Config, dump_config, flatten_config, load_config, save_config
from unet.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_hold_only_what_they_change(path: Path) -> None:
    """A key restating the schema's default would hide a default changed later from every command using the file."""
    import yaml

    defaults = Config().model_dump()
    written = yaml.safe_load(path.read_text()) or {}
    restated = [f"{section}.{key}" for section, values in written.items() for key, value in values.items()
                if defaults[section][key] == value]  # fmt: skip
    assert not restated, f"{path.name} restates the defaults of {restated}"


def test_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"default.yaml", "demo.yaml"}


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config()
    assert config.model.base_channels == 64 and config.tracking.tracking_uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    ("in_file", "in_environment", "on_command_line", "wins"),
    [
        (None, None, None, "sqlite:///mlflow.db"),  # the schema's default
        ("http://file:5000", None, None, "http://file:5000"),
        ("http://file:5000", "http://env:5000", None, "http://env:5000"),  # environment over file
        ("http://file:5000", "http://env:5000", "http://set:5000", "http://set:5000"),  # command line over both
        (None, "http://env:5000", "http://set:5000", "http://set:5000"),
    ],
)
def test_command_line_beats_environment_beats_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_file, in_environment, on_command_line, wins
) -> None:
    path = write(tmp_path, f"tracking:\n  tracking_uri: {in_file}\n" if in_file else "train:\n  epochs: 3\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if in_environment:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", in_environment)
    overrides = [f"tracking.tracking_uri={on_command_line}"] if on_command_line else []
    assert load_config(path, overrides).tracking.tracking_uri == wins


def test_the_command_line_wins_over_the_environment_in_every_entry_point(tmp_path: Path) -> None:
    """What a user with MLFLOW_TRACKING_URI exported sees when they ask for another store on the command line."""
    import subprocess
    import sys

    from tests.helpers import ROOT, environment

    env = {**environment(), "MLFLOW_TRACKING_URI": "http://exported.example:5000"}
    for module in ("train", "infer"):
        command = [sys.executable, "-m", f"pipelines.{module}", "--print-config"]
        asked = subprocess.run([*command, "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mine.db"], env=env,
                               cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
        assert yaml.safe_load(asked.stdout)["tracking"]["tracking_uri"] == f"sqlite:///{tmp_path}/mine.db", module
        exported = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        assert yaml.safe_load(exported.stdout)["tracking"]["tracking_uri"] == "http://exported.example:5000", module


def test_unknown_key_names_the_key_the_file_and_the_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'train.learning_rate'" in message and str(path) in message
    assert "lr" in message and "batch_size" in message
    assert "\n" not in message


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*valid keys in the top level: model, data"):
        load_config(write(tmp_path, "trian:\n  lr: 1\n"))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  lr: -1\n", "train.lr"),
        ("model:\n  depth: 0\n", "model.depth"),
        ("train:\n  precision: fp8\n", "train.precision"),
        ("loss:\n  sigma: 0\n", "loss.sigma"),
    ],
)
def test_wrong_type_or_range_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}: {field}:"):
        load_config(path)


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.patch_size=200 must be a multiple of 2\*\*model.depth=16"):
        load_config(write(tmp_path, "data:\n  patch_size: 200\n"))
    assert load_config(write(tmp_path, "data:\n  patch_size: 200\nmodel:\n  depth: 3\n")).data.patch_size == 200
    with pytest.raises(ConfigError, match=r"overwrite and infer\.resume"):
        load_config(None, ["infer.overwrite=true", "infer.resume=true"])
    deterministic = ["train.deterministic=true", "train.use_gpu=true"]
    with pytest.raises(ConfigError, match=r"train\.deterministic on GPUs needs model\.bilinear=false"):
        load_config(None, [*deterministic, "model.bilinear=true"])
    assert load_config(None, deterministic).train.deterministic
    assert load_config(None, ["train.deterministic=true", "model.bilinear=true"]).model.bilinear  # CPU: no such limit


def test_overrides_are_typed_and_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\n  grad_clip: 2.0\n")
    config = load_config(path, ["train.lr=1e-3", "train.grad_clip=null", "model.bilinear=true", "infer.level=2"])
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.grad_clip is None
    assert config.model.bilinear is True
    assert config.infer.level == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "expected SECTION.KEY=VALUE"),
        ("=3", "expected SECTION.KEY=VALUE"),
        ("train.lrr=3", r"--set: unknown key 'train.lrr'"),
        ("train.lr=abc", r"--set: train.lr:"),
        ("train.lr=[1", "not valid YAML"),
    ],
)
def test_bad_overrides_are_reported_as_such(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_override_below_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        load_config(None, ["train.lr=0.5", "train.lr.x=1"])


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config.yaml: line \d+ invalid YAML"):
        load_config(write(tmp_path, "train:\n  lr: [1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["train.lr=0.02", "model.depth=3", "data.patch_size=200"])
    saved = save_config(config, tmp_path / "out" / "resolved.yaml")
    assert load_config(saved) == config
    resolved = yaml.safe_load(dump_config(config))
    assert set(resolved) == {"model", "data", "loss", "train", "infer", "evaluate", "tracking"}
    assert resolved["train"]["epochs"] == 10  # defaults are written out too
    flat = flatten_config(config)
    assert flat["train.lr"] == "0.02" and flat["infer.scheduler"] == "null"
