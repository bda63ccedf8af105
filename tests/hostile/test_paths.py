"""Hostile paths (issue 17): a manifest, ``infer.output``, ``data.store`` or a conversion pointing an output outside
its folder, at an input, inside one or around one is refused in one line naming both, before anything is written;
the user's files stay byte-identical (every test snapshots its folder before and after)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipelines.convert import convert
from pipelines.infer.cohort import expand
from pipelines.prepare import prepare
from tests.helpers import ROOT
from tests.hostile import (
    error_line,
    infer,
    prepare_config,
    small_zarr,
    snapshot,
    test_corrupt,
    test_inputs,
)
from unet.data.sources import DataError
from unet.errors import UserError
from unet.slides import SlideError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """user/slides/{a,b}.zarr, the output folder user/out, a symlink user/out/escape -> user/elsewhere."""
    slides = tmp_path / "user" / "slides"
    slides.mkdir(parents=True)
    for name in ("a.zarr", "b.zarr"):
        zarr.create_array(slides / name, data=np.full((3, 64, 64), 200, np.uint8), chunks=(3, 64, 64))
    (tmp_path / "user" / "elsewhere").mkdir()
    (tmp_path / "user" / "out").mkdir()
    (tmp_path / "user" / "out" / "escape").symlink_to(tmp_path / "user" / "elsewhere")
    return tmp_path / "user"


# (manifest's output column for slide a, what the refusal says); relative paths are relative to the manifest
MANIFEST_OUTPUTS = [
    ("../../x.ome.zarr", "is not inside infer.output"),
    ("{user}/elsewhere/x.ome.zarr", "is not inside infer.output"),
    ("{user}/out/../elsewhere/x.ome.zarr", "is not inside infer.output"),
    ("{user}/out/escape/x.ome.zarr", "is not inside infer.output"),  # a symlink leading out
    ("./a.zarr/", "would overwrite an input"),  # the input itself, spelt otherwise
    ("{user}/slides/./b.zarr", "would overwrite an input"),  # another row's input
    ("a.zarr/labels.ome.zarr", "would be written inside the input"),
    ("{user}/out", "is not inside infer.output"),  # the output folder itself
]


@pytest.mark.parametrize(("output", "message"), MANIFEST_OUTPUTS, ids=[case[0] for case in MANIFEST_OUTPUTS])
def test_manifest_outputs_must_lie_inside_the_output_folder(cohort: Path, output: str, message: str) -> None:
    manifest = cohort / "slides" / "cohort.csv"
    manifest.write_text(f"input,output\na.zarr,{output.format(user=cohort)}\nb.zarr,\n")
    before = snapshot(cohort)
    with pytest.raises(UserError, match=re.escape(message)):
        expand(str(manifest), str(cohort / "out"), 0)
    assert snapshot(cohort) == before


def test_an_input_inside_an_output_is_refused(cohort: Path) -> None:
    """A row whose output is a folder holding another row's input: --overwrite would delete that input."""
    (cohort / "out" / "slides").mkdir()
    zarr.create_array(cohort / "out" / "slides" / "c.zarr", data=np.zeros((3, 8, 8), np.uint8))
    manifest = cohort / "cohort.yaml"
    manifest.write_text(f"- input: slides/a.zarr\n  output: {cohort / 'out' / 'slides'}\n- input: out/slides/c.zarr\n")
    with pytest.raises(UserError, match=r"the input .*c\.zarr lies inside the output .*out/slides; choose"):
        expand(str(manifest), str(cohort / "out"), 0)


def test_a_manifest_escaping_its_folder_stops_infer_before_anything_starts(model, state, cohort, capsys) -> None:
    manifest = cohort / "slides" / "cohort.csv"
    manifest.write_text("input,output\na.zarr,../../../x.ome.zarr\n")
    before = snapshot(cohort.parent)
    capsys.readouterr()
    assert infer(model, state, manifest, cohort / "out") == 2
    assert "x.ome.zarr (a manifest's outputs must lie inside infer.output)" in error_line(capsys.readouterr().err,
                                                                                          "infer")  # fmt: skip
    assert snapshot(cohort.parent) == before


# (infer.output for infer.input user/slides/a.zarr, what the refusal says)
SINGLE_OUTPUTS = [
    ("{user}/slides/a.zarr/", "is the same location as infer.input"),
    ("{user}/slides/./a.zarr", "is the same location as infer.input"),
    ("{user}/link.zarr", "is the same location as infer.input"),  # a symlink to the input
    ("{user}/slides/a.zarr/result.ome.zarr", "lies inside infer.input"),
    ("{user}/slides", "holds infer.input"),  # with --overwrite it would replace the folder
]


@pytest.mark.parametrize(("output", "message"), SINGLE_OUTPUTS, ids=[case[0] for case in SINGLE_OUTPUTS])
def test_single_slide_output_at_its_input_is_refused(model, state, cohort, capsys, output: str, message: str):
    (cohort / "link.zarr").symlink_to(cohort / "slides" / "a.zarr")
    before = snapshot(cohort.parent)
    capsys.readouterr()
    assert infer(model, state, cohort / "slides" / "a.zarr", output.format(user=cohort), "--overwrite") == 2
    assert message in error_line(capsys.readouterr().err, "infer")
    assert snapshot(cohort.parent) == before


# (data.store, what the refusal says) for images in user/images and labels in user/labels
STORES = [
    ("{user}/images", "is the same location as the input"),  # with --overwrite it would replace the images
    ("{user}/labels/train.zarr", "lies inside the input"),
    ("{user}/labels/b.zarr", "is the same location as the input"),  # a label store
    ("{user}", "holds the input"),
    ("{user}/images/../labels/../images/new.zarr", "lies inside the input"),
]


@pytest.mark.parametrize(("store", "message"), STORES, ids=[case[0] for case in STORES])
def test_prepare_store_at_an_input_is_refused(tmp_path: Path, store: str, message: str) -> None:
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "labels").mkdir()
    image = np.random.default_rng(3).random((32, 32)).astype(np.float32)
    for name in ("a", "b"):
        tifffile.imwrite(user / "images" / f"{name}.tif", image)
        zarr.create_array(user / "labels" / f"{name}.zarr", data=np.ones((32, 32), np.uint16))
    config = prepare_config(tmp_path, user / "images", user / "labels", f"data.store={store.format(user=user)}")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(config, overwrite=True, previews=0)
    assert snapshot(tmp_path) == before


CONVERT_OUTPUTS = [("{slide}", "is the same location as"), ("{slide}/converted", "lies inside"),
                   ("{slide}/..", "holds")]  # fmt: skip


@pytest.mark.parametrize(("output", "message"), CONVERT_OUTPUTS, ids=[case[0] for case in CONVERT_OUTPUTS])
def test_convert_with_overwrite_onto_its_own_input_is_refused(tmp_path: Path, output: str, message: str) -> None:
    slide = small_zarr(tmp_path / "user" / "slide.zarr")
    before = snapshot(tmp_path)
    with pytest.raises(SlideError, match=f"{message} INPUT"):
        convert(slide, output.format(slide=slide), overwrite=True)
    assert snapshot(tmp_path) == before


# the hostile paths this file tries
TRIED = len(MANIFEST_OUTPUTS) + 1 + len(SINGLE_OUTPUTS) + len(STORES) + len(CONVERT_OUTPUTS)  # 1: an input in an output


def test_the_operations_guide_gives_the_count_of_hostile_inputs() -> None:
    hostile = test_inputs.TRIED + test_corrupt.TRIED + TRIED
    assert f"**{hostile} hostile inputs**" in (ROOT / "docs" / "operations.md").read_text()
