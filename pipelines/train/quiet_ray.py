"""Ray Train as this job uses it, without two of Ray 2.60's noises (imported where Ray is started: it imports Ray).

- ``LocalTorchTrainer``: on a local Ray (no ``RAY_ADDRESS``), Ray Train's placement-group cleaner is left out. That
  detached actor asks Ray's State API every second whether the training controller is alive, to free the workers'
  placement group if the controller dies without doing so. The State API is served by the dashboard, which a local
  Ray here starts without (``train.dashboard: false``): each question failed with a warning in the job's output, one
  a second for a whole night's run. A local Ray ends with its job, its placement groups with it: nothing to clean.
  On a cluster (``RAY_ADDRESS``) the cleaner stays, as Ray made it.
- ``quiet_reports``: every worker's "Reporting training result N: TrainingReport(...all metrics...)" lines. Ray logs
  them at INFO through a logger named after its file, outside ``ray.train``, so ``LoggingConfig(log_level=...)``
  does not reach it; the job prints one line per epoch of its own.
"""

from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution import context as train_context


class LocalTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` for a local Ray: Ray Train's default callbacks but the placement-group cleaner."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def trainer_class(local: bool) -> type[TorchTrainer]:
    """The trainer for a local Ray (``local``) or a cluster."""
    return LocalTorchTrainer if local else TorchTrainer


def quiet_reports() -> None:
    """In a training worker: Ray Train's per-report INFO lines off (warnings stay)."""
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
