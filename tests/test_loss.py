"""The weighted cross-entropy (and Dice) loss: definition, weighting, and low-precision stability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unet.loss import WeightedLoss, soft_dice_loss, weighted_cross_entropy


def test_matches_the_definition() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
    weights = torch.rand(2, 8, 8) * 10
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    expected = -(weights * log_p).mean()
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weights), expected)
    torch.testing.assert_close(
        weighted_cross_entropy(logits, target, torch.ones_like(weights)), F.cross_entropy(logits, target)
    )


def test_weights_steer_the_gradient() -> None:
    logits = torch.zeros(1, 2, 1, 2, requires_grad=True)
    target = torch.tensor([[[1, 1]]])
    weighted_cross_entropy(logits, target, torch.tensor([[[10.0, 1.0]]])).backward()
    grad = logits.grad[0, 1, 0]
    assert grad[0] == pytest.approx(10 * grad[1].item())
    assert weighted_cross_entropy(logits, target, torch.zeros(1, 1, 2)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stable_with_low_precision_logits(dtype: torch.dtype) -> None:
    logits = torch.tensor([[[[3000.0]], [[-3000.0]]]]).to(dtype)  # confidently wrong
    target = torch.tensor([[[1]]])
    loss = weighted_cross_entropy(logits, target, torch.ones(1, 1, 1))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and loss.item() == pytest.approx(6000, rel=1e-2)
    assert math.isfinite(soft_dice_loss(logits, target).item())


def test_stable_under_autocast() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    x, target, weights = torch.randn(2, 3, 16, 16) * 100, torch.randint(0, 2, (2, 16, 16)), torch.rand(2, 16, 16)
    reference = weighted_cross_entropy(conv(x), target, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = WeightedLoss(dice_weight=1.0)(conv(x), target, weights)
    low.backward()
    assert math.isfinite(low.item()) and all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert low.item() == pytest.approx(reference.item() + soft_dice_loss(conv(x), target).item(), rel=0.05)


def test_dice_is_zero_for_a_perfect_prediction_and_one_for_the_opposite() -> None:
    target = torch.randint(0, 2, (1, 16, 16))
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 100
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-2)
    assert soft_dice_loss(-perfect, target).item() == pytest.approx(1.0, abs=1e-2)
    combined = WeightedLoss(dice_weight=0.5)(perfect, target, torch.ones(1, 16, 16))
    assert combined.item() == pytest.approx(0.0, abs=1e-2)
