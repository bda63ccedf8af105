"""Fine-tuning (train.init_from) and fair promotion: the candidate and the champion scored on the same held-out
images in the same job (pipelines.train.release.judge), the champion kept unless the candidate wins; real MLflow
(sqlite), the real H&E sample, a briefly trained model as the champion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile
import torch

from pipelines.evaluate import evaluate
from pipelines.models import load_model, log_and_register
from pipelines.prepare import prepare
from pipelines.registry import connect, promote
from pipelines.train.release import judge
from tests.helpers import ROOT, SMALL, environment
from tests.test_annotation_prepare import crops, nuclei, region, settings, write_geojson  # noqa: F401 (a fixture)
from unet.config import load_config
from unet.data.store import TrainingStore
from unet.model import UNet
from unet.samples import fetch_samples

NAME = "unet-ft"


@pytest.fixture(scope="module")
def registry(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An MLflow registry whose champion (version 1) is the briefly trained model."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = connect(uri)
    run = client.create_run(client.create_experiment("fine-tune", artifact_location=(folder / "art").as_uri()))
    version = log_and_register(run.info.run_id, load_model(str(trained_model_dir)), NAME, {}, uri)
    assert promote(client, NAME, version, wins=True)
    return {"uri": uri, "client": client, "store": trained_model_dir.parent / "he.zarr", "folder": folder}


def config_for(registry: dict, *extra: str):
    overrides = [f"data.store={registry['store']}", f"tracking.tracking_uri={registry['uri']}",
                 f"tracking.registered_model={NAME}", "model.base_channels=8", *extra]  # fmt: skip
    return load_config(ROOT / "configs" / "train.yaml", overrides)


def register(registry: dict, model: UNet) -> str:
    client = registry["client"]
    run = client.create_run(client.get_experiment_by_name("fine-tune").experiment_id)
    return log_and_register(run.info.run_id, model, NAME, {}, registry["uri"])


def test_a_worse_candidate_does_not_move_the_champion(registry: dict) -> None:
    torch.manual_seed(3)
    untrained = UNet(3, 2, base_channels=8, pixel_size_um=0.25)
    verdict = judge(config_for(registry), registry["client"], untrained, TrainingStore(registry["store"]))
    assert not verdict.wins and verdict.champion_version == "1"
    assert verdict.champion["f1"] > verdict.candidate["f1"] and "does not beat champion version 1" in verdict.reason
    assert set(verdict.metrics()) >= {"promotion/candidate/f1", "promotion/champion/f1", "promotion/champion/dice"}
    assert verdict.tags()["promotion.champion_version"] == "1"
    version = register(registry, untrained)
    assert not promote(registry["client"], NAME, version, verdict.wins, verdict.champion_version)
    assert registry["client"].get_model_version_by_alias(NAME, "champion").version == 1
    assert str(registry["client"].get_model_version_by_alias(NAME, "candidate").version) == version


def test_the_first_version_of_a_new_model_wins_against_no_one(registry: dict) -> None:
    """Before anything is registered under the name, there is no champion (not an error)."""
    config = config_for(registry, "tracking.registered_model=unet-new")
    verdict = judge(config, registry["client"], UNet(3, 2, base_channels=8), TrainingStore(registry["store"]))
    assert verdict.wins and verdict.champion is None and verdict.reason == "no champion yet"


def test_the_margin_decides_how_much_better_the_candidate_must_be(registry: dict, trained_model_dir: Path) -> None:
    """tracking.promote_margin: a clearly better candidate wins at 0 and loses at a margin it cannot reach."""
    client, name = registry["client"], "unet-margin"
    run = client.create_run(client.get_experiment_by_name("fine-tune").experiment_id)
    torch.manual_seed(5)
    worse = log_and_register(run.info.run_id, UNet(3, 2, base_channels=8), name, {}, registry["uri"])
    assert promote(client, name, worse, wins=True)
    better, store = load_model(str(trained_model_dir)), TrainingStore(registry["store"])
    at_zero = judge(config_for(registry, f"tracking.registered_model={name}"), client, better, store)
    assert at_zero.wins and at_zero.candidate["f1"] > at_zero.champion["f1"]
    beyond = at_zero.candidate["f1"] - at_zero.champion["f1"] + 0.01
    config = config_for(registry, f"tracking.registered_model={name}", f"tracking.promote_margin={beyond}")
    at_margin = judge(config, client, better, store)
    assert not at_margin.wins and f"by more than {beyond:g}" in at_margin.reason
    assert at_margin.tags()["promotion.margin"] == f"{beyond:g}"


def test_a_parent_is_checked_and_pinned(registry: dict, trained_model_dir: Path, tmp_path: Path) -> None:
    """train.init_from: a folder is pinned to its absolute path, an alias to its version; a parent trained at
    another pixel size than the store's is one line naming the setting that fixes it."""
    from benchmarks.models import with_resolution
    from pipelines.train.parent import check_parent
    from unet.errors import UserError

    store = TrainingStore(registry["store"])
    config = config_for(registry, f"train.init_from={trained_model_dir}")
    assert check_parent(config, store, registry["uri"]) is not None
    assert config.train.init_from == str(trained_model_dir.resolve())
    config = config_for(registry, f"train.init_from=models:/{NAME}@champion")
    check_parent(config, store, registry["uri"])
    assert config.train.init_from == f"models:/{NAME}/1"
    coarse = with_resolution(trained_model_dir, tmp_path, 0.5)
    with pytest.raises(UserError, match=r"holds images at 0.25 um/px but train.init_from .* was trained at 0.5 "
                                        r".*; prepare the store with data.pixel_size_um=0.5$"):  # fmt: skip
        check_parent(config_for(registry, f"train.init_from={coarse}"), store, registry["uri"])


def test_evaluate_compares_two_versions_on_the_same_images(registry: dict, tmp_path: Path, capsys) -> None:
    """evaluate.baseline: both models scored on one store's held-out images, both rows and the difference printed
    and logged to one MLflow run."""
    torch.manual_seed(4)
    worse = register(registry, UNet(3, 2, base_channels=8, pixel_size_um=0.25))
    models = [f"evaluate.model=models:/{NAME}@champion", f"evaluate.baseline=models:/{NAME}/{worse}"]
    config = config_for(registry, *models, f"evaluate.output={tmp_path}")
    result = evaluate(config)
    assert result["f1"] > result["baseline"]["f1"]
    printed = capsys.readouterr().out
    assert f"models:/{NAME}/1 " in printed and f"models:/{NAME}/{worse} " in printed and "difference" in printed
    run = registry["client"].get_run(result["mlflow_run_id"]).data
    assert run.params["baseline_version"] == worse and run.params["model_version"] == "1"
    assert run.metrics["difference/f1"] == pytest.approx(run.metrics["eval/f1"] - run.metrics["baseline/f1"])


def test_the_champion_against_itself_is_a_tie_and_a_tie_does_not_win(registry: dict, trained_model_dir: Path) -> None:
    same = load_model(str(trained_model_dir))
    verdict = judge(config_for(registry), registry["client"], same, TrainingStore(registry["store"]))
    assert verdict.candidate == verdict.champion and not verdict.wins


def test_a_champion_that_cannot_be_scored_on_the_store_stays(registry: dict, tmp_path: Path) -> None:
    """A store of 1-channel images (the real fluorescence nuclei): the RGB champion cannot be compared there, so a
    new version does not replace it."""
    folder = fetch_samples(["fluo_nuclei"])["fluo_nuclei"]
    labels = tifffile.imread(folder / "labels" / "dsb2018_0.tif")
    features = [region((0, 0, 256, 512)), region((256, 0, 512, 512)), *nuclei(labels, "fluo")]
    annotations = write_geojson(tmp_path / "dsb2018_0.geojson", features)
    overrides = settings(tmp_path / "fluo.zarr", f"data.images={folder / 'images' / 'dsb2018_0.tif'}",
                         f"data.annotations={annotations}", "model.n_channels=1", "data.val_fraction=0.5")  # fmt: skip
    store = TrainingStore(prepare(load_config(ROOT / "configs" / "prepare.yaml", overrides), previews=0))
    candidate = UNet(1, 2, base_channels=8, pixel_size_um=store.pixel_size_um)
    config = config_for(registry, f"data.store={store.location}", "model.n_channels=1")
    verdict = judge(config, registry["client"], candidate, store)
    assert not verdict.wins and verdict.champion is None and verdict.champion_version == "1"
    assert "champion version 1 cannot be scored on" in verdict.reason and "3-channel" not in verdict.reason


def test_a_parent_of_another_architecture_is_refused_before_training(registry: dict) -> None:
    cmd = [sys.executable, "-m", "pipelines.train", "--config", str(ROOT / "configs" / "train.yaml")]
    for override in (f"data.store={registry['store']}", f"tracking.tracking_uri={registry['uri']}",
                     f"train.init_from=models:/{NAME}@champion", "model.base_channels=16"):  # fmt: skip
        cmd += ["--set", override]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=registry["folder"], env=environment())
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"train.init_from models:/{NAME}/1 has another architecture than model.*: set model.base_channels=8")
    ), result.stderr[-2000:]


@pytest.mark.cluster
def test_fine_tuning_starts_from_the_champion_and_records_its_lineage(registry: dict, crops, tmp_path: Path) -> None:  # noqa: F811
    """Ray Train from models:/NAME@champion on a store of annotated regions: the new version names its parent and
    the annotation files, and the run holds both models' scores on the same held-out regions."""
    config = load_config(ROOT / "configs" / "prepare.yaml",
                         settings(tmp_path / "regions.zarr", f"data.annotations={crops['manifest']}"))  # fmt: skip
    store = prepare(config, previews=0)
    cmd = [sys.executable, "-m", "pipelines.train", "--config", str(ROOT / "configs" / "train.yaml")]
    overrides = [*SMALL, f"data.store={store}", f"tracking.tracking_uri={registry['uri']}", "train.epochs=1",
                 f"tracking.registered_model={NAME}", f"train.init_from=models:/{NAME}@champion", "train.lr=1e-9",
                 "train.num_workers=1", "train.run_name=fine-tune",
                 f"train.storage_path={tmp_path / 'runs'}"]  # fmt: skip
    for override in overrides:
        cmd += ["--set", override]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = registry["client"]
    version = max(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    assert version.tags["parent_model"] == f"models:/{NAME}/1"
    sources = json.loads(version.tags["annotation_sources"])
    assert len(sources) == 4 and all(len(digest) == 64 for digest in sources.values())
    assert float(version.tags["promotion.candidate"]) == pytest.approx(float(version.tags["val/f1"]), abs=1e-5)
    assert version.tags["promotion.champion_version"] == "1"
    assert "champion version 1" in version.tags["promotion.verdict"]
    metrics = client.get_run(version.run_id).data.metrics
    assert {"promotion/candidate/f1", "promotion/champion/f1"} <= set(metrics)
    parent = load_model(f"models:/{NAME}/1", registry["uri"])
    child = load_model(f"models:/{NAME}/{version.version}", registry["uri"])
    state = parent.state_dict().items()
    weights = [key for key, value in state if value.dtype.is_floating_point and "running" not in key]
    assert all(torch.allclose(parent.state_dict()[k], child.state_dict()[k], atol=1e-4) for k in weights), (
        "at lr 1e-9 the fine-tuned weights are the parent's"
    )
