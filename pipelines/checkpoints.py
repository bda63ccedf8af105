"""A training run's checkpoints, recorded in its MLflow run with the digests of their files when they are written
and checked against them before a resume reads a byte of them: a checkpoint changed in its storage (a bucket, a
shared volume) is refused instead of being trained on and registered."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipelines.registry import CHECKPOINTS_TAG, set_tags
from unet.errors import UserError
from unet.model_files import file_digests

log = logging.getLogger(__name__)
KEEP = 3  # checkpoints recorded: Ray keeps 2, and resumes the latest it finished persisting
RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's own list of a run's checkpoints, in its folder


def recorded_by_ray(folder: str | Path) -> int:
    """How many checkpoints Ray Train has recorded in a run's folder (a path or URL): what a job started with that
    run name and storage path resumes from (none: it starts over)."""
    from unet import storage

    fs, root = storage.filesystem(folder)
    try:
        with fs.open(f"{root}/{RAY_RECORD}") as handle:
            return len(json.load(handle)["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def record(client, run_id: str, folder: str | Path, epoch: int) -> None:
    """Add the checkpoint about to be persisted from ``folder`` (after ``epoch``) to the run's record, in place of
    any recorded for this epoch or a later one (they were left behind: training went on from an earlier one)."""
    recorded = {key: value for key, value in (_recorded(client, run_id) or {}).items() if int(key) < epoch}
    recorded[str(epoch)] = file_digests(folder)
    latest = sorted(recorded, key=int)[-KEEP:]
    set_tags(client, run_id, {CHECKPOINTS_TAG: json.dumps({key: recorded[key] for key in latest}, sort_keys=True)})


def verify(client, run_id: str, folder: str | Path, run_name: str) -> None:
    """Refuse, in one line, a checkpoint whose files are not those of any checkpoint the run recorded."""
    recorded = _recorded(client, run_id)
    if recorded is None:  # written before checkpoints were recorded
        log.warning("the checkpoint of run %r has no recorded digests: resumed unverified", run_name)
        return
    found = file_digests(folder)
    for digests in recorded.values():
        if all(found.get(name) == digest for name, digest in digests.items()):
            return
    raise UserError(
        f"the last checkpoint of training run {run_name!r} ({folder}) is not one this run wrote (its files differ "
        f"from the digests recorded in MLflow run {run_id}); not resumed: restore it, or train under a new run name"
    )


def _recorded(client, run_id: str) -> dict[str, dict[str, str]] | None:
    value = client.get_run(run_id).data.tags.get(CHECKPOINTS_TAG)
    return None if value is None else json.loads(value)
