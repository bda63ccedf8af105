"""The receipt's parts alone (``unet.tissue``, ``unet.receipt``): the tissue mask on real glass and tissue, the
chunk counts at the uncertain band's edges, each flag and its reason, the cohort's robust outliers. The cohort
numbers below are made up to place values around the thresholds; the real slide's receipt is checked in
test_infer (against computations of its own) and test_report (a cohort)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from unet.receipt import (
    MIN_COHORT,
    absolute_flags,
    chunk_counts,
    cohort_flags,
    flag_kind,
    slide_measures,
)
from unet.resolution import Resolution
from unet.slides import open_slide
from unet.tiling import Region
from unet.tissue import TissueMask, tissue_mask


def test_the_tissue_mask_finds_tissue_and_none_on_glass_or_blank(cmu_slide) -> None:
    slide = open_slide(cmu_slide)
    tissue = slide.read(1200, 1800, 1200, 1800)[:, ::16, ::16]
    for y in (1200, 1600, 2000):  # glass only, at the slide's left edge: Otsu alone calls 21%, 47%, 65% of it tissue
        glass = slide.read(y, y + 400, 0, 400)[:, ::16, ::16]
        gray = glass.astype(np.float32).mean(axis=0)
        assert (gray < threshold_otsu(gray)).mean() > 0.2 and not tissue_mask(glass).any()
    assert not tissue_mask(np.full((3, 40, 40), 255, np.uint8)).any()
    assert 0.3 < tissue_mask(tissue).mean() <= 1


def test_a_chunk_takes_each_pixel_from_the_mask_pixel_holding_its_centre() -> None:
    rng = np.random.default_rng(0)
    mask = TissueMask(rng.random((30, 20)) > 0.5, height=300, width=170)
    rows, cols = ((np.arange(300) + 0.5) * 30 / 300).astype(int), ((np.arange(170) + 0.5) * 20 / 170).astype(int)
    whole = mask.mask[rows[:, None], cols[None, :]]
    region = Region(100, 228, 64, 170)
    np.testing.assert_array_equal(mask.chunk(region).pixels(), whole[100:228, 64:170])
    assert mask.chunks(64) == {(r, c) for r in range(5) for c in range(3)}  # random tissue: in every chunk


def test_chunk_counts_the_uncertain_band_exclusively_in_either_storage() -> None:
    labels = np.array([[0, 1, 1, 0]])
    tissue = np.array([[True, True, True, False]])
    for stored in (np.array([[76, 77, 178, 179]], np.uint8), np.array([[0.3, 0.31, 0.69, 0.7]], np.float16)):
        counts = chunk_counts(labels, stored, None)
        assert counts == {"pixels": 4, "tissue_pixels": 4, "uncertain_pixels": 2, "has_objects": 1}, stored.dtype
    stored = np.array([[100, 100, 100, 100]], np.uint8)  # all uncertain; the last pixel outside tissue
    assert chunk_counts(np.zeros((1, 4), int), stored, tissue) == {
        "pixels": 4, "tissue_pixels": 3, "uncertain_pixels": 3, "has_objects": 0}  # fmt: skip


def test_slide_measures_add_up_chunks() -> None:
    counts = [
        {"pixels": 100, "tissue_pixels": 50, "uncertain_pixels": 5, "has_objects": 1},
        {"pixels": 100, "tissue_pixels": 30, "uncertain_pixels": 3, "has_objects": 0},
        {"pixels": 100, "tissue_pixels": 0, "uncertain_pixels": 0, "has_objects": 0},
    ]
    measures = slide_measures(counts, objects=8, pixel_size_um=100.0)  # 0.01 mm2 per pixel
    assert measures == pytest.approx({"tissue_share": 80 / 300, "tissue_mm2": 0.8, "objects_per_mm2": 10.0,
                                      "uncertain_share": 0.1, "empty_tissue_chunk_share": 0.5})  # fmt: skip
    assert "tissue_mm2" not in slide_measures(counts, 8, None)  # no pixel size, no areas


def resolution(scale: float = 1.0, stated: bool = True, size: float | None = 0.25) -> Resolution:
    return Resolution(0, scale, scale, size, size, 0.25, "test", stated)


@pytest.mark.parametrize(
    ("measures", "objects", "res", "kinds"),
    [
        ({"tissue_share": 0.0, "tissue_mm2": 0.0}, 0, resolution(), ["no tissue"]),
        ({"tissue_share": 0.01, "tissue_mm2": 0.005, "objects_per_mm2": 200.0}, 1, resolution(), ["no tissue"]),
        ({"tissue_share": 0.5, "tissue_mm2": 2.0, "objects_per_mm2": 4.0, "uncertain_share": 0.1}, 8, resolution(),
         ["almost no objects"]),
        ({"tissue_share": 0.5, "tissue_mm2": 2.0, "objects_per_mm2": 900.0, "uncertain_share": 0.6}, 1800,
         resolution(), ["mostly uncertain"]),
        ({"tissue_share": 0.5, "tissue_mm2": 2.0, "objects_per_mm2": 900.0}, 1800, resolution(stated=False),
         ["pixel size missing"]),
        ({"tissue_share": 0.5, "tissue_mm2": 2.0, "objects_per_mm2": 900.0}, 1800, resolution(0.5),
         ["resampled far"]),
        ({"tissue_share": 0.5, "tissue_mm2": 2.0, "objects_per_mm2": 900.0}, 1800, resolution(3.0),
         ["resampled far"]),
        ({"tissue_share": 0.5, "tissue_mm2": 2.0, "objects_per_mm2": 900.0, "uncertain_share": 0.2}, 1800,
         resolution(1.4), []),
    ],
)  # fmt: skip
def test_absolute_flags_name_what_is_wrong(measures, objects, res, kinds) -> None:
    flags = absolute_flags(measures, objects, res)
    assert [flag_kind(flag) for flag in flags] == kinds
    assert all("\n" not in flag and len(flag.split(": ", 1)[1]) > 10 for flag in flags)  # one line, with a why


def test_cohort_flags_the_robust_outliers_only() -> None:
    densities = [1000.0, 1100.0, 950.0, 1050.0, 980.0, 1020.0, 300.0]
    measures = {f"s{i}": {"objects_per_mm2": d, "uncertain_share": 0.1} for i, d in enumerate(densities)}
    flags = cohort_flags(measures, threshold=3.5)
    assert [s for s, f in flags.items() if f] == ["s6"]
    assert flags["s6"][0].startswith("outlier: objects per mm2 300 is low for this cohort (median 1e+03")
    assert cohort_flags(measures, threshold=0) == {s: [] for s in measures}  # 0: off
    few = {s: m for s, m in list(measures.items())[MIN_COHORT - 2 :]}  # too few slides to compare
    assert not any(cohort_flags(few, 3.5).values())
    # identical slides but one 3% away: the spread is at least 5% of the median, so no flag
    same = {f"s{i}": {"uncertain_share": 0.2} for i in range(6)} | {"odd": {"uncertain_share": 0.206}}
    assert not any(cohort_flags(same, 3.5).values())
