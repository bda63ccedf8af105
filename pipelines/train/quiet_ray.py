"""Ray and Ray Train as this job uses them, without some of Ray 2.60's noises (imported where Ray is started: it
imports Ray).

- ``LocalTorchTrainer``: on a local Ray (no ``RAY_ADDRESS``), what has nothing to do on one machine for this job is
  left out; on a cluster (``RAY_ADDRESS``) all of it stays, as Ray made it.

  - The placement-group cleaner. That detached actor asks Ray's State API every second whether the training
    controller is alive, to free the workers' placement group if the controller dies without doing so. The State
    API is served by the dashboard, which a local Ray here starts without (``train.dashboard: false``): each
    question failed with a warning in the job's output, one a second for a whole night's run. A local Ray ends with
    its job, its placement groups with it: nothing to clean.
  - The preemption watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` unless set): one more actor process that
    asks Ray every 5 s whether a node is being drained (a cloud's spot node reclaimed), and whose creation printed
    an error-level line on every run ("... PreemptionWatcher ... has constructor arguments in the object store and
    max_restarts > 0"). A local Ray's one machine is not drained under the job.
  - The dataset manager, one more actor process that hands out shards of Ray Datasets: this job passes none (it
    reads its Zarr store itself).
  - Ray Train's metrics (``RAY_TRAIN_METRICS_ENABLED=0`` unless set): with ``LOCAL_RAY``'s, nothing collects them.
- ``LOCAL_RAY``: a local Ray's system settings, the quieter. It starts no idle worker processes ahead of need and
  collects no metrics (a local Ray has no Prometheus; the job's metrics go to MLflow). Every idle Ray process wakes
  about 100-150 times a second, which on a small machine takes turns with the step's threads. Measured by
  ``benchmarks.train_step`` (docs/benchmarks.md, "Training step"): with these settings and the dataset manager left
  out, Ray Train's per-step overhead came out 0.2-1.8 points lower in each of 3 alternated pairs (2 cores).
- ``quiet_reports``: every worker's "Reporting training result N: TrainingReport(...all metrics...)" lines. Ray logs
  them at INFO through a logger named after its file, outside ``ray.train``, so ``LoggingConfig(log_level=...)``
  does not reach it; the job prints one line per epoch of its own.
"""

from __future__ import annotations

import logging
import os

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR, METRICS_ENABLED_ENV_VAR
from ray.train.v2._internal.execution import context as train_context

# ray.init's _system_config for a local Ray (module docstring)
LOCAL_RAY = {"prestart_worker_first_driver": False, "enable_metrics_collection": False}


class LocalTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` for a local Ray: Ray Train's default callbacks but the placement-group cleaner and, without
    datasets, the dataset manager; no preemption watcher and no metrics (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        os.environ.setdefault(ENABLE_PREEMPTION_WATCHER_ENV_VAR, "0")  # Ray Train passes it to its controller
        os.environ.setdefault(METRICS_ENABLED_ENV_VAR, "0")
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list:
        left_out = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]


def trainer_class(local: bool) -> type[TorchTrainer]:
    """The trainer for a local Ray (``local``) or a cluster."""
    return LocalTorchTrainer if local else TorchTrainer


def quiet_reports() -> None:
    """In a training worker: Ray Train's per-report INFO lines off (warnings stay)."""
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
