"""A shortened `make demo`, end to end on real data, twice: the second run reuses what it can, and an output of an
earlier layout is made again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import zarr

from pipelines.demo import Steps, segment_step
from pipelines.infer.output import LINEAGE_KEY, OBJECTS, OUTPUT_LAYOUT
from tests.helpers import ROOT, environment
from unet.config import load_config
from unet.data.store import TrainingStore

pytestmark = pytest.mark.slow


def test_shortened_demo_runs_end_to_end_and_reuses_its_results(tmp_path: Path) -> None:
    overrides = [
        "model.base_channels=8",  # half the demo's width: a quarter of its compute, the same steps
        f"data.store={tmp_path / 'he.zarr'}",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.epochs=2",
        "train.steps_per_epoch=5",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"infer.input={tmp_path / 'slide.ome.zarr'}",
        f"infer.output={tmp_path / 'nuclei.ome.zarr'}",
        f"evaluate.output={tmp_path / 'outputs' / 'evaluate'}",
    ]
    cmd = [sys.executable, "-m", "pipelines.demo", "--config", str(ROOT / "configs" / "demo.yaml")]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    first = subprocess.run(cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    output = first.stdout
    for step in ("fetch real sample data", "prepare the training store", "train with Ray Train", "convert the slide",
                 "segment the slide with Dask", "evaluate on held-out images", "show the results",
                 "export the outlines for QuPath", "segment a small cohort"):  # fmt: skip
        assert step in output
    assert "models:/unet-demo/1, 2 epochs" in output and "F1@0.5" in output and "mlflow ui" in output
    # the slide (0.499 um/px) is segmented at the training crops' pixel size, and the nuclei found are set beside
    # the training nuclei
    assert "0.25 um/px (configs/demo.yaml: the crops' pixel size" in output and "training nuclei: median" in output
    labels = zarr.open_group(tmp_path / "nuclei.ome.zarr", mode="r")["labels/nuclei/0"]
    assert labels.shape == (round(2967 * 0.499 / 0.25), round(2220 * 0.499 / 0.25))
    for picture in ("slide_overview.png", "slide_overlay.png"):
        assert (tmp_path / "outputs" / picture).stat().st_size > 10_000
    table = pd.read_parquet(tmp_path / "nuclei.ome.zarr" / OBJECTS)
    first_rows = output[output.index("(first rows") :]
    assert "centroid_x_um" in first_rows and all(str(area) in first_rows for area in table["area"][:5])
    exported = json.loads((tmp_path / "outputs" / "nuclei.qupath.geojson").read_text())
    assert len(exported["features"]) == len(table)
    # a small cohort of the slide and crops of it, with its report: the glass-only crop flagged as such
    cohort = pd.read_csv(tmp_path / "outputs" / "cohort" / "batch_summary.csv").set_index("slide")
    assert list(cohort.index) == ["slide", "tissue-1", "tissue-2", "tissue-3", "glass"]
    assert cohort.loc["glass", "flags"].startswith("no tissue: ")  # the others hold tissue (this brief model's
    assert not cohort["flags"][:4].str.contains("no tissue").any()  # objects may be few: flags of their own)
    assert "data:image/jpeg;base64," in (tmp_path / "outputs" / "cohort" / "report.html").read_text()

    second = subprocess.run(cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "models:/unet-demo/1 (finished earlier; reused)" in second.stdout
    assert "by models:/unet-demo/1 (reused)" in second.stdout
    # an output written by an earlier version (another layout) is made again, not reused: the demo's segment step
    # (in this process; the rest of a third run would only reuse again)
    metadata = tmp_path / "nuclei.ome.zarr" / "zarr.json"
    document = json.loads(metadata.read_text())
    del document["attributes"]["unet_inference"]["layout"]
    metadata.write_text(json.dumps(document))
    steps, config = Steps(), load_config(ROOT / "configs" / "demo.yaml", overrides)
    segment_step(steps, config, TrainingStore(tmp_path / "he.zarr"), f"sqlite:///{tmp_path / 'mlflow.db'}")
    (_, result, _), lineage = steps.rows[-1], zarr.open_group(tmp_path / "nuclei.ome.zarr", mode="r").attrs
    assert "(reused)" not in result and "nuclei" in result and lineage[LINEAGE_KEY]["layout"] == OUTPUT_LAYOUT
    assert (tmp_path / "nuclei.ome.zarr" / OBJECTS).is_file()
