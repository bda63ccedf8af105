"""A cohort's receipts, flags and report, on crops of the real Aperio slide: tissue crops, a blank slide and one of
glass only. The two without tissue are flagged, and only they, in the summary, the report and MLflow; the report
is one self-contained page; in a real browser (Debian's Chromium, installed by .ci/run) it loads without console
errors, sorts, filters and shows its thumbnails."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.test_infer import infer
from unet.io import write_tiff
from unet.slides import open_slide

pytestmark = pytest.mark.slow
TISSUE = {"t1": (800, 800), "t2": (1200, 1200), "t3": (1600, 800), "t4": (2000, 1200), "t5": (2300, 800),
          "t6": (1000, 1400)}  # fmt: skip
SIDE = 600
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def cohort_output(cmu_slide: Path, trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("report")
    slides = work / "slides"
    slides.mkdir()
    cmu = open_slide(cmu_slide)
    for name, (y, x) in TISSUE.items():
        write_tiff(slides / f"{name}.tif", cmu.read(y, y + SIDE, x, x + SIDE), cmu.pixel_size_um)
    write_tiff(slides / "blank.tif", np.full((3, SIDE, SIDE), 255, np.uint8), cmu.pixel_size_um)
    write_tiff(slides / "glass.tif", cmu.read(0, 800, 0, 800), cmu.pixel_size_um)  # the slide's empty corner
    output = work / "out"
    assert infer(work, trained_model_dir, slides, output, "infer.chunk_size=256") == 0
    return output


def summary(output: Path) -> dict[str, dict]:
    with open(output / "batch_summary.csv") as handle:
        return {row["slide"]: row for row in csv.DictReader(handle)}


def test_exactly_the_slides_without_tissue_are_flagged(cohort_output: Path) -> None:
    rows = summary(cohort_output)
    flagged = {name: row["flags"] for name, row in rows.items() if row["flags"]}
    assert set(flagged) == {"blank", "glass"}, flagged
    assert all(flag.startswith("no tissue: ") for flag in flagged.values())
    for name in TISSUE:  # each tissue crop's receipt: tissue, objects in it, a cost
        row = rows[name]
        assert float(row["tissue_mm2"]) > 0.01 and float(row["objects_per_mm2"]) > 100, row
        assert 0 <= float(row["uncertain_share"]) < 0.5 and float(row["compute_seconds"]) > 0 and row["device"]
    # the same flags in each slide's MLflow run
    client = MlflowClient(f"sqlite:///{cohort_output.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unet").experiment_id], "tags.job = 'inference'")
    tags = {run.info.run_name.removeprefix("infer "): run.data.tags["flags"] for run in runs}
    assert {name: tag for name, tag in tags.items() if tag != "none"} == {
        f"{name}.ome.zarr": flag for name, flag in flagged.items()
    }


def test_the_report_is_one_self_contained_page(cohort_output: Path) -> None:
    page = (cohort_output / "report.html").read_text()
    # nothing is fetched (no CDN, no web font, no remote picture); links (to MLflow runs) are only followed on a click
    assert not re.search(r"""src=["']?(https?:)?//|<link[^>]+href=["']?(https?:)?//|@import|url\(""", page)
    assert page.count("data:image/jpeg;base64,") == len(TISSUE) + 2  # every segmented slide's thumbnail, inline
    assert 'http-equiv="refresh"' not in page  # the batch ended: the last version does not reload
    for name in (*TISSUE, "blank", "glass"):
        assert f'href="{name}.ome.zarr"' in page and f'href="{name}.ome.zarr/qc.png"' in page


@pytest.mark.cluster  # a real browser: Debian's chromium, which .ci/run installs
def test_the_report_in_chromium(cohort_output: Path, tmp_path: Path) -> None:
    """Loaded in headless Chromium: no console error, every thumbnail decoded, sorting by a column orders the rows,
    the flag filter shows the two flagged slides only. A screenshot goes to docs/report.png when asked
    (UNET_SCREENSHOT=1)."""
    import os

    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed (.ci/run installs Debian's package)"
    with sync_playwright() as playwright:
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((cohort_output / "report.html").as_uri())
        page.wait_for_load_state("load")
        assert errors == []
        widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == len(TISSUE) + 2 and all(width > 0 for width in widths)
        heading = page.locator("th", has_text="objects / mm²")
        heading.click()
        column = page.eval_on_selector("th.asc", "th => th.cellIndex")
        cells = f"rows => rows.map(r => r.cells[{column}].dataset.value)"
        values = page.eval_on_selector_all("#slides tbody tr", cells)
        numbers = [float(v) for v in values if v]
        assert len(numbers) >= len(TISSUE) and numbers == sorted(numbers)
        heading.click()  # again: descending
        values = page.eval_on_selector_all("#slides tbody tr", cells)
        assert [float(v) for v in values if v] == sorted(numbers, reverse=True)
        page.select_option("#flag", "flagged")
        shown = page.eval_on_selector_all("#slides tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.slide)")
        assert sorted(shown) == ["blank", "glass"]
        page.select_option("#flag", "all")
        if os.environ.get("UNET_SCREENSHOT"):
            page.screenshot(path=str(Path(__file__).resolve().parents[1] / "docs" / "report.png"), full_page=True)
        assert errors == []
        browser.close()
