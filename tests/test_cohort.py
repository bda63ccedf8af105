"""Which slides a job segments (pipelines.infer.cohort): one store, a glob, a folder, a CSV or YAML manifest; output
names; refusals of colliding or self-overwriting outputs and of malformed manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.infer.cohort import Item, expand
from unet.data.sources import Pair, find_pairs
from unet.errors import UserError
from unet.io import stem


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Slides of every kind the folder rule recognises, plus things that are not slides."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("b.zarr", "a.ome.zarr", "plain_store"):  # a Zarr store without a suffix still counts
        zarr.create_array(slides / name, data=np.zeros((3, 8, 8), np.uint8))
    (slides / "c.svs").write_bytes(b"II*\0")
    (slides / "notes.txt").write_text("not a slide")
    (slides / "empty_folder").mkdir()
    return slides


def test_one_store_is_a_single_slide_job(folder: Path, tmp_path: Path) -> None:
    cohort = expand(str(folder / "b.zarr"), str(tmp_path / "out.zarr"), 1)
    assert not cohort.batch and cohort.items == [Item(str(folder / "b.zarr"), str(tmp_path / "out.zarr"), 1)]
    assert cohort.summary is None


def test_folder_holds_slides_named_by_stem(folder: Path, tmp_path: Path) -> None:
    cohort = expand(str(folder), str(tmp_path / "out"), 0)
    assert cohort.batch and cohort.summary == str(tmp_path / "out" / "batch_summary.csv")
    assert [(Path(i.input).name, Path(i.output).name) for i in cohort.items] == [
        ("a.ome.zarr", "a.ome.zarr"),
        ("b.zarr", "b.ome.zarr"),
        ("c.svs", "c.ome.zarr"),
        ("plain_store", "plain_store.ome.zarr"),
    ]


def test_glob_matches_only_slides(folder: Path, tmp_path: Path) -> None:
    cohort = expand(str(folder / "*"), str(tmp_path / "out"), 0)
    assert [Path(i.input).name for i in cohort.items] == ["a.ome.zarr", "b.zarr", "c.svs", "plain_store"]
    assert [Path(i.input).name for i in expand(str(folder / "*.zarr"), str(tmp_path / "o"), 0).items] == [
        "a.ome.zarr",
        "b.zarr",
    ]
    with pytest.raises(UserError, match="no slides match"):
        expand(str(folder / "*.ndpi"), str(tmp_path / "out"), 0)


def test_csv_and_yaml_manifests(folder: Path, tmp_path: Path) -> None:
    manifest = folder / "cohort.csv"
    manifest.write_text(f"input,output,level\nb.zarr,,2\na.ome.zarr,{tmp_path / 'out' / 'sub' / 'x.ome.zarr'},\n")
    items = expand(str(manifest), str(tmp_path / "out"), 0).items
    assert items == [
        Item(str(folder / "b.zarr"), str(tmp_path / "out" / "b.ome.zarr"), 2),  # relative to the manifest
        Item(str(folder / "a.ome.zarr"), str(tmp_path / "out" / "sub" / "x.ome.zarr"), 0),  # inside infer.output
    ]
    listed = tmp_path / "cohort.yaml"
    listed.write_text(f"slides:\n  - input: {folder / 'c.svs'}\n    level: 1\n")
    assert expand(str(listed), str(tmp_path / "out"), 0).items == [
        Item(str(folder / "c.svs"), str(tmp_path / "out" / "c.ome.zarr"), 1)
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input,levle\nb.zarr,1\n", "slide 1: levle: Extra inputs are not permitted"),
        ("input,level\nb.zarr,-1\n", "slide 1: level: Input should be greater than or equal to 0"),
        ("output\nx.zarr\n", "slide 1: input: Field required"),
        ("input\n", "lists no slides"),
    ],
)
def test_malformed_manifest_is_one_clear_line(folder: Path, tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "bad.csv"
    manifest.write_text(text)
    with pytest.raises(UserError, match=message):
        expand(str(manifest), str(tmp_path / "out"), 0)


def test_outputs_that_collide_or_overwrite_an_input_are_refused(folder: Path, tmp_path: Path) -> None:
    zarr.create_array(folder / "a.zarr", data=np.zeros((3, 8, 8), np.uint8))  # a.zarr and a.ome.zarr: one output
    with pytest.raises(UserError, match=r"would both write .*a\.ome\.zarr; name outputs in a manifest"):
        expand(str(folder), str(tmp_path / "out"), 0)
    with pytest.raises(UserError, match="must not be the input folder"):
        expand(str(folder), str(folder), 0)
    manifest = tmp_path / "self.csv"
    manifest.write_text(f"input,output\n{folder / 'b.zarr'},{folder / 'b.zarr'}\n")
    with pytest.raises(UserError, match="would overwrite an input"):
        expand(str(manifest), str(tmp_path / "out"), 0)


def test_missing_input_and_empty_folder(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"infer\.input not found"):
        expand(str(tmp_path / "nope.zarr"), str(tmp_path / "out"), 0)
    with pytest.raises(UserError, match="a folder without slides"):
        expand(str(folder / "empty_folder"), str(tmp_path / "out"), 0)


def test_stem_strips_the_format_suffix() -> None:
    assert [stem(p) for p in ("s3://b/x/a.ome.zarr", "/d/a.b.svs", "/d/A.OME.TIFF", "/d/.zarr", "/d/plain")] == [
        "a",
        "a.b",
        "A",
        ".zarr",
        "plain",
    ]


def test_training_inputs_pair_by_the_same_stem(tmp_path: Path) -> None:
    """One rule (``unet.io.stem``) names a batch's outputs and pairs training images with label files: an
    ``a.ome.zarr`` image is ``a``, whether its labels are ``a.ome.zarr``, ``a.zarr`` or ``a.tif``."""
    names = ("a.ome.zarr", "/d/a.ome.tif", "/d/a.b.svs", "s3://b/a.ome.zarr", "/d/a.png", "/d/a.npy")
    assert [stem(name) for name in names] == ["a", "a", "a.b", "a", "a", "a"]
    for labels_name in ("a.ome.zarr", "a.zarr", "a.ome.tif", "a.tif"):
        images, labels = tmp_path / labels_name / "images", tmp_path / labels_name / "labels"
        images.mkdir(parents=True)
        labels.mkdir()
        zarr.create_array(images / "a.ome.zarr", data=np.zeros((8, 8), np.uint8))
        if labels_name.endswith(".zarr"):
            zarr.create_array(labels / labels_name, data=np.zeros((8, 8), np.uint16))
        else:
            (labels / labels_name).write_bytes(b"II*\0")  # paired by name: not read here
        assert find_pairs(str(images), str(labels)) == [Pair("a", images / "a.ome.zarr", labels / labels_name)]
