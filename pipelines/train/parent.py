"""Fine-tuning: the model a training run starts from (``train.init_from``), checked against the config and the
store before anything starts, pinned to one version, and loaded into every worker's fresh model.

The run and the version it registers record their lineage: the parent (``parent_model``, a pinned
``models:/NAME/VERSION`` or a folder) and, for a store prepared from annotations, the annotation files' sha256
(``annotation_sources``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from unet.config import Config
from unet.errors import UserError

if TYPE_CHECKING:
    from unet.data.store import TrainingStore
    from unet.model import UNet

PARENT_TAG = "parent_model"  # the weights a run started from: models:/NAME/VERSION or a folder
ANNOTATIONS_TAG = "annotation_sources"  # {annotation file: sha256} of the store's examples
LINEAGE_TAGS = (PARENT_TAG, ANNOTATIONS_TAG)
ARCHITECTURE = ("n_channels", "n_classes", "bilinear", "base_channels", "depth")  # what must equal model.*


def check_parent(config: Config, store: TrainingStore, tracking_uri: str) -> UNet | None:
    """The model ``train.init_from`` names (None if none), once its architecture is ``model.*`` and its pixel size
    the store's; ``train.init_from`` is pinned to its version, so every worker (and a resumed attempt's record)
    loads the same weights even if an alias moves meanwhile. One line for anything that does not fit."""
    from pipelines.evaluate import check_resolution
    from pipelines.models import load_model
    from pipelines.registry import resolve_model

    if not config.train.init_from:
        return None
    uri, _ = resolve_model(config.train.init_from, tracking_uri)
    parent = load_model(uri, tracking_uri=tracking_uri)
    architecture, configured = parent.architecture(), config.model.model_dump()
    if differs := [f"model.{key}={architecture[key]}" for key in ARCHITECTURE if architecture[key] != configured[key]]:
        raise UserError(f"train.init_from {uri} has another architecture than model.*: set {' '.join(differs)}")
    check_resolution(store, parent, f"train.init_from {uri}")
    config.train.init_from = uri
    return parent


def lineage_tags(config: Config, store: TrainingStore) -> dict[str, str]:
    """What the run and its version record of where the training came from (beyond the store's sha256)."""
    tags = {PARENT_TAG: config.train.init_from} if config.train.init_from else {}
    sources = {}
    for name in store.names:
        attrs = store.example(name).attrs
        if "annotations" in attrs:
            sources[attrs["annotations"]] = attrs["annotations_sha256"]
    if sources:
        tags[ANNOTATIONS_TAG] = json.dumps(sources, sort_keys=True)
    return tags


def load_parent(model: UNet, uri: str, tracking_uri: str) -> None:
    """Copy the weights (and BatchNorm statistics) of the model at ``uri`` (pinned by ``check_parent``) into
    ``model``, a fresh one of the same architecture."""
    from pipelines.models import load_model

    model.load_state_dict(load_model(uri, tracking_uri=tracking_uri).state_dict())
