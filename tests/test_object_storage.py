"""Object storage: the training store, slides and inference outputs as s3:// Zarr on a real S3-compatible
server (moto in server mode, on loopback), through the same URLs and environment variables users give for
real S3 or MinIO. Training with Ray checkpoints and MLflow artifacts on S3 is in test_object_storage_cluster.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from mlflow.tracking import MlflowClient
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader

from pipelines.convert import convert
from pipelines.prepare import prepare
from tests.helpers import ROOT, S3_BUCKET, objects
from tests.test_infer import infer, run_infer_process, stored
from unet import storage
from unet.config import load_config
from unet.data.store import ARRAYS, StoreError, StoreWriter, TrainingStore
from unet.slides import SlideError, open_slide

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_slide(s3: str, cmu_slide: Path) -> str:
    """The real Aperio slide converted straight to OME-Zarr on S3."""
    url = f"{s3}/slides/cmu.ome.zarr"
    assert convert(cmu_slide, url, chunk=512) == url
    return url


def store_config(store: str | Path):
    return load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={store}"])


def test_training_store_on_s3_matches_a_local_one(s3: str, tmp_path: Path) -> None:
    url = f"{s3}/stores/he.zarr"
    local = TrainingStore(prepare(store_config(tmp_path / "he.zarr"), previews=0))
    assert prepare(store_config(url), previews=1) == url
    remote = TrainingStore(url)
    assert remote.names == local.names and remote.names_in("val") == local.names_in("val")
    for name in local.names:
        for kind in ARRAYS:
            np.testing.assert_array_equal(getattr(remote.example(name), kind)[:], getattr(local.example(name), kind)[:])
    assert objects(f"{url}.previews") == [f"{local.names[0]}.png"]
    assert not [key for key in objects(f"{s3}/stores") if ".partial" in key]

    # the content hash (recorded by training runs) is the same wherever the bytes live
    fs, _ = storage.filesystem(s3)
    fs.put(local.location, f"{S3_BUCKET}/copies/he.zarr", recursive=True)
    assert storage.sha256(f"{s3}/copies/he.zarr") == storage.sha256(local.location)

    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        prepare(store_config(url))
    replaced = load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={url}", "data.val_fraction=0.4"])
    prepare(replaced, overwrite=True, previews=0)
    assert len(TrainingStore(url).names_in("val")) > len(local.names_in("val"))


def test_interrupted_store_on_s3_does_not_read_as_valid(s3: str) -> None:
    url = f"{s3}/stores/killed.zarr"
    writer = StoreWriter(url)  # object stores have no rename: it writes in place...
    writer.create("x", "labels", (4, 4), "int32", (4, 4))[:] = 1
    with pytest.raises(StoreError, match="incomplete"):  # ...and a reader sees it is not finished
        TrainingStore(url)
    writer.abort()
    assert not storage.exists(url)
    with pytest.raises(StoreError, match="training store not found"):
        TrainingStore(url)


def test_slide_converted_to_s3_reads_like_a_local_one(s3: str, s3_slide: str, cmu_ome_zarr: Path, cmu_slide) -> None:
    levels = open_slide(cmu_ome_zarr).levels
    assert levels > 1 and open_slide(s3_slide).levels == levels
    for level in range(levels):
        remote, local = open_slide(s3_slide, level), open_slide(cmu_ome_zarr, level)
        assert (remote.shape, remote.pixel_size_um, remote.path) == (local.shape, local.pixel_size_um, s3_slide)
        window = (0, remote.height, 0, remote.width)
        np.testing.assert_array_equal(remote.read(*window), local.read(*window))
    with pytest.raises(SlideError, match="already exists; pass --overwrite"):
        convert(cmu_slide, s3_slide)
    with pytest.raises(SlideError, match="slide not found"):
        open_slide(f"{s3}/slides/missing.ome.zarr")
    fs, _ = storage.filesystem(s3)
    fs.put(str(cmu_slide), f"{S3_BUCKET}/slides/cmu.svs")
    with pytest.raises(SlideError, match="TIFF/SVS slides must be local files"):
        open_slide(f"{s3}/slides/cmu.svs")


@pytest.mark.cluster  # kills a job mid-write on S3 and runs it three times: make test-cluster
def test_inference_from_s3_to_s3_resumes_and_matches_a_local_run(
    trained_model_dir, s3: str, s3_slide: str, cmu_ome_zarr: Path, tmp_path: Path
) -> None:
    output = f"{s3}/results/cmu-seg.ome.zarr"
    proc = run_infer_process(tmp_path, trained_model_dir, s3_slide, output)  # inherits the AWS_* variables
    done = f"{output}/_work/done_predict"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if storage.exists(f"{done}/zarr.json") and int(np.asarray(zarr.open_array(done, mode="r")).sum()) >= 8:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 8 <= int(np.asarray(zarr.open_array(done, mode="r")).sum()) < 108
    with pytest.raises(SlideError, match="without OME-NGFF multiscales"):  # unfinished: not an image yet
        open_slide(output)

    again = run_infer_process(tmp_path, trained_model_dir, s3_slide, output)
    message, _ = again.communicate(timeout=300)
    assert again.returncode == 2 and "an interrupted run left s3://" in message and "--resume" in message
    resumed = run_infer_process(tmp_path, trained_model_dir, s3_slide, output, "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]

    reference = tmp_path / "local.ome.zarr"
    assert run_infer_process(tmp_path, trained_model_dir, cmu_ome_zarr, reference).wait(timeout=600) == 0
    for remote, local in zip(stored(output), stored(reference), strict=True):
        np.testing.assert_array_equal(remote, local)
    assert not [key for key in objects(output) if key.startswith("_work")]
    assert any(isinstance(spec, Label) for node in Reader(parse_url(output))() for spec in node.specs)
    lineage = zarr.open_group(output, mode="r").attrs["unet_inference"]
    assert lineage["complete"] and lineage["input"] == s3_slide
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(lineage["mlflow_run_id"])
    assert run.data.params["input"] == s3_slide and run.data.params["output"] == output


def test_s3_output_is_replaced_only_on_request(trained_model_dir, s3: str, cmu_slide, tmp_path: Path, capsys) -> None:
    image = f"{s3}/slides/crop.zarr"
    zarr.create_array(image, data=open_slide(cmu_slide).read(0, 96, 128, 256), chunks=(3, 64, 64))
    output = f"{s3}/results/crop-seg.zarr"
    assert infer(tmp_path, trained_model_dir, image, output) == 0
    first = zarr.open_group(output, mode="r").attrs["unet_inference"]["mlflow_run_id"]
    capsys.readouterr()
    assert infer(tmp_path, trained_model_dir, image, output) == 2
    assert f"{output} already exists; pass --overwrite" in capsys.readouterr().err
    assert zarr.open_group(output, mode="r").attrs["unet_inference"]["mlflow_run_id"] == first
    assert infer(tmp_path, trained_model_dir, image, output, "--overwrite") == 0
    lineage = zarr.open_group(output, mode="r").attrs["unet_inference"]
    assert lineage["complete"] and lineage["mlflow_run_id"] != first
    assert open_slide(output).shape == (1, 96, 128)


def test_batch_from_an_s3_glob_to_an_s3_prefix(trained_model_dir, s3: str, cmu_slide, tmp_path: Path, capsys) -> None:
    cmu = open_slide(cmu_slide)
    local = tmp_path / "slides"
    windows = {"one.zarr": (0, 300, 0, 400), "two.zarr": (300, 700, 200, 460), "notes.txt": None}
    for name, window in windows.items():
        if window is None:  # not a slide: the glob below does not match it
            storage.write_bytes(f"{s3}/cohort/{name}", b"not a slide")
            continue
        for root in (local, f"{s3}/cohort"):
            zarr.create_array(f"{root}/{name}", data=cmu.read(*window), chunks=(3, 128, 128))
    output = f"{s3}/batch-out"
    small = ("infer.chunk_size=128", "infer.tile_size=128")
    # labelled in a post-processing process (a GPU worker's layout), which reads each chunk back from S3
    assert (
        infer(tmp_path, trained_model_dir, f"{s3}/cohort/*.zarr", output, *small, "infer.postprocess_processes=1") == 0
    )
    for name in ("one", "two"):
        reference = tmp_path / f"{name}.ome.zarr"
        assert infer(tmp_path, trained_model_dir, local / f"{name}.zarr", reference, *small) == 0
        for remote, expected in zip(stored(f"{output}/{name}.ome.zarr"), stored(reference), strict=True):
            np.testing.assert_array_equal(remote, expected)
    summary = storage.filesystem(f"{output}/batch_summary.csv")
    assert summary[0].cat(summary[1]).decode().count(",done,") == 2
    capsys.readouterr()
    assert infer(tmp_path, trained_model_dir, f"{s3}/cohort/*.zarr", output, *small) == 0
    assert "nothing to do   2 outputs were complete already" in capsys.readouterr().out
