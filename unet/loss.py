"""The paper's loss: cross-entropy weighted per pixel by the weight map (eq. 1), optionally plus Dice.

Logits are cast to float32 before the softmax, so the loss is stable under bf16/fp16 autocast
(the log-sum-exp of low-precision logits would otherwise lose most of its digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``weights * cross_entropy(logits, target)``.

    Shapes: logits (N, C, H, W), target (N, H, W) integer classes, weights (N, H, W).
    """
    per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (per_pixel * weights.float()).mean()


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - soft Dice of the foreground classes (all but class 0), averaged over classes; only the pixels where
    ``mask`` (N, H, W) is true count, if given."""
    probabilities = logits.float().softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    if mask is not None:
        probabilities, one_hot = probabilities * mask[:, None], one_hot * mask[:, None]
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    return 1.0 - ((2 * intersection + eps) / (total + eps)).mean()


class WeightedLoss(nn.Module):
    """``weighted_cross_entropy + dice_weight * soft_dice_loss``."""

    def __init__(self, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        loss = weighted_cross_entropy(logits, target, weights)
        if self.dice_weight:
            # a weight of 0 marks pixels outside an annotated region: Dice leaves them out too
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, mask=(weights > 0).float())
        return loss
