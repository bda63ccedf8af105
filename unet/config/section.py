"""What every config section shares: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Precision = Literal["fp32", "bf16", "fp16"]
# auto: bf16 where the device computes it in hardware, else fp32 (unet.devices.compute_precision)
InferPrecision = Literal["auto", "fp32", "bf16", "fp16"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
