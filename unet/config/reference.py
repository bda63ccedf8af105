"""Markdown reference of every config key, generated from the schema (so it cannot drift)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from unet.config.schema import Config

HEADER = """# Configuration reference

Generated from `unet/config/schema.py` and `infer.py` by `python -m unet.config.reference > docs/config.md`
(a test fails when this file is out of date). Every entry point that reads a config (all but `convert`, `export`
and `fetch_samples`) takes `--config FILE.yaml` and `--set SECTION.KEY=VALUE`; unknown keys and invalid values are
errors.
"""


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "null")


def reference_markdown() -> str:
    """One table per section: key, type, default, description."""
    parts = [HEADER]
    for section, field in Config.model_fields.items():
        model: type[BaseModel] = field.annotation  # type: ignore[assignment]
        parts.append(f"\n## `{section}`\n\n{(model.__doc__ or '').strip()}\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        for name, sub in model.model_fields.items():
            default = json.dumps(sub.get_default(call_default_factory=True))
            description = (sub.description or "").replace("|", "\\|")
            annotation = _type_name(sub.annotation).replace("|", "\\|")
            parts.append(f"| `{section}.{name}` | `{annotation}` | `{default}` | {description} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
