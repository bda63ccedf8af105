"""After training: the best model is registered with its lineage, scored against the champion on the run's own
held-out images in this job, and crowned only if it wins (``release``); then the report.

Fair promotion: a version's ``val/*`` tags are its run's scores on its run's validation split, so two versions'
tags describe different images. The champion moves only on a comparison made here: the candidate (the best epoch's
weights) and the current champion, each predicted and segmented as ``pipelines.infer`` would
(``pipelines.evaluate.score``), on the same images, with ``tracking.champion_metric``, the candidate winning by more
than ``tracking.promote_margin``. Both scores go to the run (``promotion/...``) and to the version's tags."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unet.config import Config
from unet.errors import UserError

if TYPE_CHECKING:  # heavy modules are imported where they are used
    from unet.data.store import TrainingStore
    from unet.model import UNet

log = logging.getLogger("train")
PROMOTION = "promotion"  # prefix of the comparison's metrics (run) and tags (run and version)


@dataclass(frozen=True)
class Verdict:
    """The candidate against the champion on the same held-out images."""

    metric: str  # tracking.champion_metric, e.g. val/f1
    candidate: dict[str, float]  # the candidate's scores (f1, dice, ...)
    champion: dict[str, float] | None  # the champion's on the same images; None: no champion, or not scorable here
    champion_version: str | None  # the version compared with (None: there was no champion)
    margin: float
    wins: bool
    reason: str  # one line: why it wins or not

    @property
    def key(self) -> str:
        return self.metric.removeprefix("val/")

    def metrics(self) -> dict[str, float]:
        """What the run records: every score of both, on the same images."""
        sides = {"candidate": self.candidate, "champion": self.champion or {}}
        return {f"{PROMOTION}/{side}/{k}": float(v) for side, scores in sides.items() for k, v in scores.items()}

    def tags(self) -> dict[str, str]:
        """What the version (and the run) record of the comparison."""
        champion = "" if self.champion is None else f"{self.champion[self.key]:.6g}"
        return {
            f"{PROMOTION}.metric": self.metric,
            f"{PROMOTION}.candidate": f"{self.candidate[self.key]:.6g}",
            f"{PROMOTION}.champion": champion,
            f"{PROMOTION}.champion_version": self.champion_version or "",
            f"{PROMOTION}.margin": f"{self.margin:g}",
            f"{PROMOTION}.verdict": self.reason,
        }


def judge(config: Config, client, candidate: UNet, store: TrainingStore) -> Verdict:
    """Score ``candidate`` and the champion of ``tracking.registered_model`` on ``store``'s validation split, alike
    (on this machine's CPU, or its GPU with ``infer.device: cuda``)."""
    import torch

    from pipelines import registry
    from pipelines.evaluate import held_out, score
    from pipelines.models import load_model

    tracking = config.tracking
    metric, margin, name = tracking.champion_metric, tracking.promote_margin, tracking.registered_model
    key = metric.removeprefix("val/")
    config = config.model_copy(deep=True)
    config.evaluate.split = "val"
    device = "cuda" if config.infer.device == "cuda" and torch.cuda.is_available() else "cpu"
    store, examples = held_out(config, store.location)
    mine = score(config, candidate, store, examples, device).scores
    champion = registry.current_champion(client, name)
    if champion is None:
        return Verdict(metric, mine, None, None, margin, True, f"no {registry.CHAMPION} yet")
    version = str(champion.version)
    try:
        model = load_model(f"models:/{name}/{version}", tracking_uri=tracking.tracking_uri)
        theirs = score(config, model, store, examples, device).scores
    except UserError as exc:  # other channels, another pixel size: not comparable on these images
        reason = f"{registry.CHAMPION} version {version} cannot be scored on {store.location} ({exc}); it stays"
        return Verdict(metric, mine, None, version, margin, False, reason)
    wins = mine[key] > theirs[key] + margin
    relation = "beats" if wins else "does not beat"
    reason = (f"{metric} {mine[key]:.4f} {relation} {registry.CHAMPION} version {version}'s {theirs[key]:.4f}"
              f"{f' by more than {margin:g}' if margin else ''} on {len(examples)} held-out images")  # fmt: skip
    return Verdict(metric, mine, theirs, version, margin, wins, reason)


def release(
    config: Config, client, run_id: str, result, tags: dict[str, str], store: TrainingStore, resumed: bool
) -> dict:
    """Register the run's best model (``result``: Ray Train's), compare it with the champion, promote it if it wins
    and report."""
    from pipelines import registry
    from pipelines.models import log_and_register
    from pipelines.train.parent import LINEAGE_TAGS
    from unet.model_files import BEST_MODEL_DIR, load_weights

    metric = config.tracking.champion_metric
    epoch = int(result.metrics["epoch"])
    previous = client.get_run(run_id).data.tags
    if previous.get(registry.REGISTERED_EPOCH_TAG) == str(epoch):  # a re-run of a finished run: nothing new
        client.set_terminated(run_id, status="FINISHED")
        model_uri = registry.registered_model_uri(previous)
        print(f"run {config.train.run_name!r} already finished; its model is {model_uri}")
        return {"run_id": run_id, "model_uri": model_uri, "epochs": epoch + 1, "resumed": True}
    # the lineage the run recorded when it started (a resumed attempt may have resolved an alias differently)
    tags = {**tags, **{key: previous[key] for key in LINEAGE_TAGS if key in previous}}
    with result.checkpoint.as_directory() as directory:
        model = load_weights(Path(directory) / BEST_MODEL_DIR)
    best = result.metrics[f"best/{metric}"]
    verdict = judge(config, client, model, store)
    log.info("promotion: %s", verdict.reason)
    registry.log_metrics(client, run_id, verdict.metrics(), epoch)
    registry.set_tags(client, run_id, verdict.tags())
    version_tags = {
        metric: best,
        "best_epoch": result.metrics["best/epoch"],
        **tags,
        registry.RUN_NAME_TAG: config.train.run_name,
        "mlflow.run_id": run_id,
        # the scores of the epoch whose weights are registered (the best), not of the last epoch
        **{k.removeprefix("best/"): v for k, v in result.metrics.items() if k.startswith("best/val/")},
        **verdict.tags(),
    }
    name = config.tracking.registered_model
    version = log_and_register(run_id, model, name, version_tags, config.tracking.tracking_uri, config.infer)
    champion = config.tracking.promote and registry.promote(client, name, version, verdict.wins,
                                                            verdict.champion_version)  # fmt: skip
    registry.record_registration(client, run_id, name, version, epoch)
    client.set_terminated(run_id, status="FINISHED")

    summary = {"run_id": run_id, "model_uri": f"models:/{name}/{version}", "epochs": epoch + 1,
               "resumed": resumed, metric: best, "champion": champion}  # fmt: skip
    report(config, result.metrics, summary, verdict)
    return {**summary, "promotion": verdict.reason}


def report(config: Config, metrics: dict[str, Any], summary: dict[str, Any], verdict: Verdict) -> None:
    metric = config.tracking.champion_metric
    aliases = "candidate, champion" if summary["champion"] else "candidate"
    print()
    print(f"  epochs          {summary['epochs']} (best: epoch {int(metrics['best/epoch']) + 1})")
    print(f"  {metric:<15} {summary[metric]:.4f} (best epoch)")
    uri = config.tracking.tracking_uri
    print(f"  MLflow run      {summary['run_id']} in {uri}")
    print(f"  model           {summary['model_uri']} (alias {aliases})")
    print(f"  promotion       {verdict.reason}")
    print(f"  checkpoints     {config.train.storage_path}/{config.train.run_name}")
    if uri.startswith(("http://", "https://")):  # the server is the UI
        print(f"  MLflow UI       {uri}/#/experiments")
    else:
        print(f"  MLflow UI       mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
