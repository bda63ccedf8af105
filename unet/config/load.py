"""Load YAML into a validated ``Config``, apply the environment and ``--set`` overrides, and write it back out.

Precedence, highest first: ``--set`` on the command line, then the environment (ENVIRONMENT: the variables
other tools also read, e.g. ``MLFLOW_TRACKING_URI``), then the config file, then the schema's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from unet.config.schema import Config
from unet.errors import ConfigError

OVERRIDE_SOURCE = "--set"
ENVIRONMENT = {("tracking", "tracking_uri"): "MLFLOW_TRACKING_URI"}  # config key: the variable that sets it


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (YAML; None means all defaults), apply the ENVIRONMENT variables that are set, then
    ``overrides``, and validate.

    Overrides look like ``train.lr=1e-3``; the value is parsed as YAML, so ``true``, ``null``,
    ``[1, 2]`` and numbers get their natural types.
    """
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(Path(path)) if path is not None else {}
    for keys, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            _set_nested(raw, keys, os.environ[variable], variable)
    overridden: set[tuple[str, ...]] = set()
    for override in overrides:
        keys, value = parse_override(override)
        _set_nested(raw, keys, value, override)
        overridden.add(keys)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, overridden)) from None


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Split ``section.key=value`` into its key path and YAML-parsed value."""
    key, sep, value = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        raise ConfigError(f"{OVERRIDE_SOURCE} {text!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{OVERRIDE_SOURCE} {text!r}: value is not valid YAML ({exc.problem})") from None
    return keys, parsed


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (every key, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config to ``path`` (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config))
    return path


def flatten_config(config: Config) -> dict[str, str]:
    """``{"train.lr": "0.001", ...}``: the config as flat strings, e.g. for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = "null" if value is None else str(value)

    walk("", config.model_dump(mode="json"))
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _set_nested(raw: dict[str, Any], keys: tuple[str, ...], value: Any, text: str) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{OVERRIDE_SOURCE} {text!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _describe(exc: ValidationError, source: str, overridden: set[tuple[str, ...]]) -> str:
    """Turn pydantic's errors into one line that names the key, where it came from and the fix."""
    messages = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        dotted = ".".join(loc) or "<top level>"
        if not loc:
            origin = f"{source} with {OVERRIDE_SOURCE} overrides" if overridden else source
        elif any(loc[: len(keys)] == keys or keys[: len(loc)] == loc for keys in overridden):
            origin = OVERRIDE_SOURCE
        else:
            origin = source
        if error["type"] == "extra_forbidden":
            section = ".".join(loc[:-1])
            valid = ", ".join(_valid_keys(loc[:-1]))
            where = f"section '{section}'" if section else "the top level"
            messages.append(f"{origin}: unknown key '{dotted}'; valid keys in {where}: {valid}")
        elif not loc:
            messages.append(f"{origin}: {error['msg'].removeprefix('Value error, ')}")
        else:
            got = error.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            messages.append(f"{origin}: {dotted}: {error['msg']}{shown}")
    return "; ".join(messages)


def _valid_keys(section: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in section:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
