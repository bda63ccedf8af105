"""Segment a (whole-slide) image far larger than memory: overlap-tile U-Net inference on Dask.

    python -m pipelines.infer --config configs/infer.yaml \\
        [--set infer.input=slide.ome.zarr --set infer.output=out.ome.zarr \\
         --set infer.model=models:/unet@champion --set infer.scheduler=tcp://host:8786] [--resume | --overwrite]

One Dask task per output chunk, each predicted in one forward pass with its halo; the model is
loaded once per worker process and each worker keeps several chunks in flight, so reading and
writing overlap the model. Without a scheduler the worker runs inside this process (nothing to
start, the model loaded once). The output is an OME-Zarr image (foreground probability) with an
NGFF ``labels/nuclei`` group of instance ids that are unique across the slide, objects crossing
chunk seams merged. A killed job continues with ``--resume``; an existing output is replaced only
with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import make_parser, run
from unet.config import Config, InferConfig, flatten_config
from unet.errors import UserError, first_line

if TYPE_CHECKING:  # heavy modules are imported where they are used, so that --help answers at once
    from distributed import Client

    from pipelines.infer_tasks import JobSpec
    from unet.model import UNet
    from unet.slide import Slide
    from unet.storage import Staging

log = logging.getLogger("infer")


def resolve_model(uri: str, tracking_uri: str) -> tuple[str, str | None]:
    """(URI pinned to a version or an absolute folder, version or None); clear errors if missing."""
    from unet.training import ARCHITECTURE_FILE

    if uri.startswith("models:/") and "@" in uri:
        from pipelines import registry

        name, alias = uri.removeprefix("models:/").split("@", 1)
        client = registry.connect(tracking_uri)
        try:
            version = client.get_model_version_by_alias(name, alias).version
        except Exception as exc:
            raise UserError(f"cannot resolve model {uri}: {first_line(exc)}") from None
        return f"models:/{name}/{version}", str(version)
    if uri.startswith(("models:/", "runs:/")):
        return uri, uri.rstrip("/").rsplit("/", 1)[-1] if uri.startswith("models:/") else None
    path = Path(uri).expanduser().resolve()
    if (path / "best_model").is_dir():  # a Ray Train checkpoint folder
        path = path / "best_model"
    if not (path / ARCHITECTURE_FILE).is_file():
        raise UserError(f"model not found: {uri} (expected models:/NAME@ALIAS, models:/NAME/VERSION or a folder)")
    return str(path), None


def intensity_range(slide: Slide, input_path: str) -> tuple[tuple[float, float], ...]:
    """Per-channel normalisation range, by the training rule, from the lowest-resolution level (one small
    read, identical for every chunk; none at all for 8-bit images)."""
    from unet.io import intensity_ranges
    from unet.slide import open_slide

    return intensity_ranges(open_slide(input_path, slide.levels - 1))


@dataclass
class Job:
    """One inference job, as ``set_up`` found and prepared it."""

    slide: Slide
    model: UNet
    spec: JobSpec
    lineage: dict
    staged: Staging
    overwrite: bool
    gpus: list[str]  # CUDA: the GPUs its local workers use


def main(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.dask_cluster import dashboard, in_process, start_dask
    from pipelines.infer_output import finalize_output

    started = time.perf_counter()
    job = set_up(config, args)
    keys, tissue = chunk_keys(config, job.slide)
    client, cluster = start_dask(config.infer, job.gpus)
    if in_process(config.infer, job.gpus):
        from pipelines.infer_tasks import use_model

        use_model(job.spec, job.model)  # the worker shares this process: no second load
    computing = time.perf_counter()
    try:
        log.info("Dask dashboard: %s (%d workers)", dashboard(client, cluster), len(client.scheduler_info()["workers"]))
        objects = segment(client, job.spec, keys, tissue, config.infer)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    finishing = time.perf_counter()

    megapixels = job.slide.height * job.slide.width / 1e6
    stats = {
        "chunks": len(keys),
        "chunks_skipped": len(keys) - len(tissue),
        "objects": objects,
        "megapixels": megapixels,
        "startup_seconds": computing - started,
        "seconds": finishing - computing,
        "mpx_per_s": megapixels / (finishing - computing),
    }
    run_id = _track(config, job.lineage, stats)
    stats["total_seconds"] = time.perf_counter() - started  # all but the last metadata write and rename
    lineage = {**job.lineage, "stats": stats, "mlflow_run_id": run_id}
    finalize_output(job.staged, job.slide, lineage, overwrite=job.overwrite)
    report(config, job.slide, job.lineage["model_uri"], stats, run_id)
    return {**stats, "output": job.staged.final, "model_uri": job.lineage["model_uri"], "mlflow_run_id": run_id}


def set_up(config: Config, args: argparse.Namespace) -> Job:
    """Check the request, load the model, describe the job and create (or resume) its output."""
    from pipelines import registry
    from pipelines.dask_cluster import worker_count
    from pipelines.infer_output import output_staging
    from pipelines.infer_tasks import JobSpec
    from unet import __version__, storage
    from unet.devices import check_device, visible_gpus
    from unet.inference import InferenceSettings
    from unet.slide import open_slide

    infer = config.infer
    check_device("infer.device", infer.device, infer.precision)
    gpus = visible_gpus() if infer.device == "cuda" else []
    overwrite = infer.overwrite or getattr(args, "overwrite", False)
    resume = infer.resume or getattr(args, "resume", False)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if not infer.input or not infer.output:
        raise UserError("set infer.input and infer.output, e.g. --set infer.input=slide.ome.zarr")
    slide = open_slide(infer.input, infer.level)
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    model_uri, model_version = resolve_model(infer.model, tracking_uri)
    model = registry.load_model(model_uri, tracking_uri=tracking_uri)
    if slide.channels != model.n_channels:
        raise UserError(f"{infer.input} has {slide.channels} channels but the model expects {model.n_channels}")
    if infer.tile_size and infer.tile_size % model.size_multiple:  # the config checks it against model.depth
        raise UserError(f"infer.tile_size={infer.tile_size} must be a multiple of {model.size_multiple} for this model")

    staged = output_staging(infer.output)
    lineage = {
        "model": infer.model,
        "model_uri": model_uri,
        "model_version": model_version,
        "input": storage.resolve(infer.input),
        "level": infer.level,
        "code_version": registry.git_commit(),
        "unet_wsi": __version__,
        "config": flatten_config(config),
    }
    settings = InferenceSettings(
        tile=infer.tile_size,
        batch_size=infer.batch_size,
        precision=infer.precision,
        channels_last=infer.channels_last,
        tta=infer.tta,
        blend=infer.blend,
        device=infer.device,
        pass_memory_mb=infer.pass_memory_mb,
        compile=infer.compile,
    )
    spec = JobSpec(
        input=lineage["input"],
        level=infer.level,
        output=staged.partial,
        model_uri=model_uri,
        tracking_uri=tracking_uri,
        settings=settings,
        chunk=infer.chunk,
        threshold=infer.threshold,
        intensity_range=intensity_range(slide, infer.input),
        probability_dtype=infer.probability_dtype,
        threads=max(1, (os.cpu_count() or 1) // worker_count(infer, gpus)) if not infer.scheduler else 0,
    )
    _prepare_output(staged, slide, spec, lineage, overwrite=overwrite, resume=resume)
    return Job(slide, model, spec, lineage, staged, overwrite, gpus)


def chunk_keys(config: Config, slide: Slide) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    """Every chunk's (row, col), and those to predict (all, or those with tissue)."""
    from unet.tiling import grid
    from unet.tissue import chunks_with_tissue

    keys = [key for key, _ in grid(slide.height, slide.width, config.infer.chunk)]
    if not config.infer.tissue_mask:
        return keys, set(keys)
    return keys, chunks_with_tissue(config.infer.input, slide, config.infer.chunk)


def segment(client: Client, spec: JobSpec, keys: list, tissue: set, infer: InferConfig) -> int:
    """Pass 1 predicts and labels every chunk alone; seams are merged; pass 2 writes slide-wide ids."""
    from pipelines.dask_cluster import run_chunks, task_resources
    from pipelines.infer_tasks import label_chunk_globally, predict_chunk
    from unet.instances import merge_ids, offsets, seam_pairs

    resources = task_resources(infer.device, infer.tasks)
    edges = run_chunks(client, predict_chunk, [(spec, k, k in tissue) for k in keys], "predict", resources)
    counts = {key: edge.count for key, edge in zip(keys, edges, strict=True)}
    starts = offsets(counts)
    mapping = merge_ids(sum(counts.values()), seam_pairs(dict(zip(keys, edges, strict=True)), starts))
    shared = client.scatter(mapping, broadcast=True)
    run_chunks(client, label_chunk_globally, [(spec, k, starts[k], shared) for k in keys], "label")
    return int(mapping.max())


def report(config: Config, slide: Slide, model_uri: str, stats: dict, run_id: str) -> None:
    infer = config.infer
    print()
    print(f"  input           {infer.input} (level {infer.level}, {slide.width} x {slide.height} px)")
    print(f"  model           {model_uri}")
    print(f"  output          {infer.output}  (probability: /0, instance labels: /labels/nuclei/0)")
    print(f"  chunks          {stats['chunks']} ({stats['chunks_skipped']} without tissue), {stats['objects']} objects")
    print(f"  throughput      {stats['mpx_per_s']:.2f} Mpx/s ({stats['seconds']:.1f} s segmenting)")
    print(f"  start-up        {stats['startup_seconds']:.1f} s (model, input, output, Dask)")
    total = stats["total_seconds"]
    print(f"  end to end      {total:.1f} s ({stats['megapixels'] / total:.2f} Mpx/s)")
    print(f"  MLflow run      {run_id}")
    print(f"  view            napari --plugin napari-ome-zarr {infer.output}")


def _prepare_output(staged: Staging, slide: Slide, spec: JobSpec, lineage: dict, overwrite: bool, resume: bool) -> None:
    """Create the partial output, continue an interrupted one (--resume) or replace one (--overwrite)."""
    from pipelines.infer_output import create_output, lineage_matches, recorded_lineage
    from unet import storage

    final_exists = storage.exists(staged.final)
    if staged.in_place:  # object store: an interrupted output sits at the final location, marked incomplete
        recorded = recorded_lineage(staged.final) if final_exists else None
        partial = recorded is not None and not recorded.get("complete")
        final_exists = final_exists and not partial
    else:
        partial = storage.exists(staged.partial)
        recorded = recorded_lineage(staged.partial) if partial else None
    if final_exists and not (overwrite or resume):
        raise UserError(f"{staged.final} already exists; pass --overwrite to replace it or --resume to continue")
    if partial:
        if resume:
            if recorded is None or not lineage_matches(recorded, lineage):
                raise UserError(f"{staged.partial} was started with another model, input or config; use --overwrite")
            log.info("resuming into %s", staged.partial)
            return
        if not overwrite:
            raise UserError(f"an interrupted run left {staged.partial}; pass --resume to continue or --overwrite")
        storage.remove(staged.partial)
    elif resume and final_exists:
        raise UserError(f"{staged.final} is already complete; nothing to resume")
    elif final_exists and staged.in_place:  # --overwrite without a rename: the old output goes first
        storage.remove(staged.final)
    create_output(staged.partial, slide, spec, lineage)


def _track(config: Config, lineage: dict, stats: dict) -> str:
    """An MLflow run recording the inference job: what went in, what came out, how fast."""
    from pipelines import registry
    from unet import storage

    params = {k: lineage[k] for k in ("model_uri", "model_version", "input", "level", "code_version")}
    params |= {"output": storage.resolve(config.infer.output), "chunk_size": config.infer.chunk}
    name = f"infer {storage.basename(config.infer.output)}"
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    return registry.log_job_run(tracking_uri, config.tracking.experiment, "inference", name, params, stats)


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.infer", __doc__.splitlines()[0], default_config="configs/infer.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
