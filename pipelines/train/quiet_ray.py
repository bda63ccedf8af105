"""Ray Train as this job uses it, without three of Ray 2.60's noises (imported where Ray is started: it imports Ray).

- ``LocalTorchTrainer``: on a local Ray (no ``RAY_ADDRESS``), two of Ray Train's watchers are left out, as on one
  machine they have nothing to watch; on a cluster (``RAY_ADDRESS``) both stay, as Ray made them.

  - The placement-group cleaner. That detached actor asks Ray's State API every second whether the training
    controller is alive, to free the workers' placement group if the controller dies without doing so. The State
    API is served by the dashboard, which a local Ray here starts without (``train.dashboard: false``): each
    question failed with a warning in the job's output, one a second for a whole night's run. A local Ray ends with
    its job, its placement groups with it: nothing to clean.
  - The preemption watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` unless set): one more actor process that
    asks Ray every 5 s whether a node is being drained (a cloud's spot node reclaimed), and whose creation printed
    an error-level line on every run ("... PreemptionWatcher ... has constructor arguments in the object store and
    max_restarts > 0"). A local Ray's one machine is not drained under the job.
- ``quiet_reports``: every worker's "Reporting training result N: TrainingReport(...all metrics...)" lines. Ray logs
  them at INFO through a logger named after its file, outside ``ray.train``, so ``LoggingConfig(log_level=...)``
  does not reach it; the job prints one line per epoch of its own.
"""

from __future__ import annotations

import logging
import os

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR
from ray.train.v2._internal.execution import context as train_context


class LocalTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` for a local Ray: Ray Train's default callbacks but the placement-group cleaner, and no
    preemption watcher (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        os.environ.setdefault(ENABLE_PREEMPTION_WATCHER_ENV_VAR, "0")  # Ray Train passes it to its controller
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def trainer_class(local: bool) -> type[TorchTrainer]:
    """The trainer for a local Ray (``local``) or a cluster."""
    return LocalTorchTrainer if local else TorchTrainer


def quiet_reports() -> None:
    """In a training worker: Ray Train's per-report INFO lines off (warnings stay)."""
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
