"""Documentation that is generated must match its source."""

from __future__ import annotations

from tests.helpers import ROOT
from unet.config.reference import reference_markdown


def test_config_reference_is_up_to_date() -> None:
    expected = reference_markdown()
    actual = (ROOT / "docs" / "config.md").read_text()
    assert actual == expected, "docs/config.md is stale: run `python -m unet.config.reference > docs/config.md`"
    for key in ("train.lr", "infer.chunk_size", "loss.w0", "tracking.champion_metric", "evaluate.model"):
        assert f"`{key}`" in actual
