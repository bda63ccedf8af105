"""The framework-free parts of training: the moving average of the weights and the checkpoint state round trip."""

from __future__ import annotations

import json
from pathlib import Path

import tifffile
import torch

from unet.config import ModelConfig, TrainConfig
from unet.data.store import object_area_distribution, object_areas
from unet.model_files import ARCHITECTURE_FILE, load_weights, save_weights
from unet.samples import fetch_samples
from unet.training import (
    TrainingParts,
    build_model,
    build_optimizer,
    build_scheduler,
    freeze_batchnorm,
    make_grad_scaler,
    make_weight_average,
)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(n_channels=1, base_channels=4, depth=2))


def test_the_average_follows_the_weights_with_a_warm_up() -> None:
    """After n earlier steps the average moves 1 - min(decay, (1 + n) / (10 + n)) of the way to the weights."""
    model, decay = small_model(), 0.9
    average = make_weight_average(model, decay)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update_parameters(model)
        rate = min(decay, (1 + n) / (10 + n)) if n else 0.0  # the first update copies
        expected = [e * rate + p.detach() * (1 - rate) for e, p in zip(expected, model.parameters(), strict=True)]
    for e, a in zip(expected, average.module.parameters(), strict=True):
        torch.testing.assert_close(a, e)
    assert make_weight_average(model, 0.0) is None


def test_the_average_keeps_batchnorm_statistics_of_its_own() -> None:
    model = small_model()
    average = make_weight_average(model, 0.99)
    model.train()
    for _ in range(3):
        model(torch.rand(2, 1, 32, 32) * 5)
        average.update_parameters(model)
    norm = next(m for m in average.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert float(norm.running_var.mean()) != 1.0  # averaged from the model's, not left at their initial values
    assert int(norm.num_batches_tracked) == 3


def test_frozen_batchnorm_keeps_its_statistics_while_its_weights_learn() -> None:
    """Fine-tuning's BatchNorm: the running statistics stay the parent's; scale and shift still get gradients."""
    model = small_model()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    model.train()
    freeze_batchnorm(model)
    model(torch.rand(2, 1, 32, 32) * 5).sum().backward()
    for norm, (mean, var) in zip(norms, before, strict=True):
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in norms)
    assert any(m.training for m in model.modules())  # the rest stays in train mode
    model.train()
    model(torch.rand(2, 1, 32, 32) * 5)
    assert not torch.equal(norms[0].running_mean, before[0][0])  # unfrozen by train(): updated again


def test_a_checkpoint_restores_the_average_with_everything_else() -> None:
    config = TrainConfig(epochs=2, steps_per_epoch=3, lr=0.01)

    def parts(seed: int) -> TrainingParts:
        model = small_model(seed)
        optimizer = build_optimizer(model, config)
        scaler = make_grad_scaler("fp32", torch.device("cpu"))
        return TrainingParts(
            model, optimizer, build_scheduler(optimizer, config), scaler, make_weight_average(model, 0.99)
        )

    trained = parts(1)
    for _ in range(4):
        trained.optimizer.zero_grad()
        trained.model(torch.rand(2, 1, 32, 32)).mean().backward()
        trained.optimizer.step()
        trained.scheduler.step()
        trained.average.update_parameters(trained.model)
    state = trained.state(epoch=1, step=4)

    fresh = parts(2)
    assert fresh.restore(state) == {"best_scores": {}, "epoch": 1, "step": 4}
    for name, value in trained.average.state_dict().items():
        torch.testing.assert_close(fresh.average.state_dict()[name], value, msg=name)
    torch.testing.assert_close(fresh.model.state_dict(), trained.model.state_dict())
    assert fresh.scheduler.state_dict()["last_epoch"] == 4 and fresh.scored() is fresh.average.module
    # a checkpoint of an earlier version has no average: it starts from the restored weights at the next step
    older = parts(3)
    older.restore({**state, "weight_average": {}})
    assert int(older.average.n_averaged) == 0


def test_a_model_records_the_pixel_size_and_objects_of_its_training_data_in_its_files(tmp_path: Path) -> None:
    """What the store records goes into the model and its model.json, and comes back with it: inference reads
    slides at that pixel size. A model that records neither writes neither (older models read the same)."""
    labels = tifffile.imread(fetch_samples(["fluo_nuclei"])["fluo_nuclei"] / "labels" / "dsb2018_0.tif")
    objects = object_area_distribution(object_areas(labels) * 0.5**2)
    assert (
        objects["count"] == 112 and objects["p1"] < objects["p50"] < objects["p99"]
    )  # the 125 less 13 cut by the edge
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_channels=1, base_channels=4, depth=2), pixel_size_um=0.5, object_area_um2=objects)
    folder = save_weights(model, tmp_path / "model")
    written = json.loads((folder / ARCHITECTURE_FILE).read_text())
    assert (written["pixel_size_um"], written["object_area_um2"]) == (0.5, objects)
    loaded = load_weights(folder)
    assert (loaded.pixel_size_um, loaded.object_area_um2) == (0.5, objects)
    assert loaded.architecture() == model.architecture()
    plain = json.loads((save_weights(small_model(), tmp_path / "plain") / ARCHITECTURE_FILE).read_text())
    assert not {"pixel_size_um", "object_area_um2"} & set(plain)
    assert load_weights(tmp_path / "plain").pixel_size_um is None
