"""The halo derived from the architecture really bounds the receptive field."""

from __future__ import annotations

import pytest
import torch

from unet.geometry import aligned_reach, halo_for, receptive_field_reach, round_up
from unet.model import UNet


def test_round_up() -> None:
    assert [round_up(v, 16) for v in (0, 1, 16, 17, 107)] == [0, 16, 16, 32, 112]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("bilinear", [False, True])
def test_halo_is_the_aligned_reach_rounded_to_size_multiple(depth: int, bilinear: bool) -> None:
    halo, reach = halo_for(depth, bilinear), aligned_reach(depth, bilinear)
    assert halo % 2**depth == 0
    assert reach <= halo < reach + 2**depth
    # A grid cell reads no farther than its worst pixel does.
    assert reach <= receptive_field_reach(depth, bilinear)


def test_paper_sized_model_geometry() -> None:
    model = UNet(3, 2)
    assert model.size_multiple == 16
    assert model.receptive_field_reach == 107
    assert model.halo == 96  # the aligned reach, 94, rounded up to 16


def _gradient_extent(model: UNet, size: int, rows: slice, cols: slice) -> tuple[int, int]:
    """How far before ``rows.start`` and after ``rows.stop - 1`` the input influences those outputs."""
    image = torch.randn(1, model.n_channels, size, size, dtype=torch.float64, requires_grad=True)
    model(image)[0, :, rows, cols].sum().backward()
    ys, _ = torch.nonzero(image.grad[0].abs().sum(0), as_tuple=True)
    return int(rows.start - ys.min()), int(ys.max() - (rows.stop - 1))


@pytest.mark.parametrize("bilinear", [False, True])
def test_measured_receptive_field_matches_the_computed_one(bilinear: bool) -> None:
    torch.manual_seed(0)
    model = UNet(1, 2, bilinear=bilinear, base_channels=8, depth=3).double().eval()
    cell, centre = model.size_multiple, 128
    per_pixel = [
        max(_gradient_extent(model, 256, slice(centre + p, centre + p + 1), slice(centre, centre + 1)))
        for p in range(cell)
    ]
    aligned = max(_gradient_extent(model, 256, slice(centre, centre + cell), slice(centre, centre + cell)))
    assert max(per_pixel) <= model.receptive_field_reach
    assert aligned <= aligned_reach(model.depth, bilinear) <= model.halo
    if not bilinear:  # for transposed convolutions the computation is exact
        assert max(per_pixel) == model.receptive_field_reach
        assert aligned == aligned_reach(model.depth, bilinear)


@pytest.mark.parametrize("bilinear", [False, True])
def test_input_beyond_the_halo_does_not_change_the_output(bilinear: bool) -> None:
    torch.manual_seed(0)
    model = UNet(3, 2, bilinear=bilinear, base_channels=8).double().eval()
    halo, tile = model.halo, 32
    size = 2 * halo + tile + 2 * 48  # room for input farther than the halo on every side
    lo, hi = halo + 48, halo + 48 + tile  # the output region, on the pooling grid
    image = torch.rand(1, 3, size, size, dtype=torch.float64)
    beyond = torch.ones(size, size, dtype=torch.bool)
    beyond[lo - halo : hi + halo, lo - halo : hi + halo] = False  # keep everything within the halo
    changed = image.clone()
    changed[..., beyond] = torch.rand(3, int(beyond.sum()), dtype=torch.float64)
    near = image.clone()
    near[..., lo - (halo - model.size_multiple), lo + tile // 2] += 1.0  # a smaller halo would miss this

    with torch.no_grad():
        before = model(image)[..., lo:hi, lo:hi]
        after = model(changed)[..., lo:hi, lo:hi]
        nearby = model(near)[..., lo:hi, lo:hi]
    assert torch.equal(after, before)
    if not bilinear:  # the bound is exact here: a halo one grid cell smaller would be wrong
        # (the influence of input that far away is tiny in an untrained network, but it is there)
        assert not torch.equal(nearby, before)
