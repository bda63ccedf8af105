"""Segment (whole-slide) images far larger than memory: overlap-tile U-Net inference on Dask.

    python -m pipelines.infer --config configs/infer.yaml \\
        [--set infer.input=slide.ome.zarr --set infer.output=out.ome.zarr \\
         --set infer.model=models:/unet@champion --set infer.scheduler=tcp://host:8786] [--resume | --overwrite]

``infer.input`` is one slide, or a cohort: a glob (``'slides/*.ome.zarr'``, ``'s3://bucket/cohort/*.zarr'``),
a folder or prefix of slides, or a CSV / YAML manifest (see ``pipelines.infer.cohort``); then ``infer.output`` is a
folder and slide NAME.EXT is written to OUTPUT/NAME.ome.zarr, with OUTPUT/batch_summary.csv beside them.

One Dask task per output chunk, each predicted in one forward pass with its halo; the model is loaded
once per worker process for all slides, and the chunks of every slide form one bounded stream, so
workers never idle between slides. Without a scheduler the worker runs inside this process. Each
output is an OME-Zarr image (foreground probability) with an NGFF ``labels/nuclei`` group of instance
ids unique across the slide, objects crossing chunk seams merged. A killed single-slide job continues
with ``--resume``; a re-run batch skips complete outputs and resumes interrupted ones by itself. An
existing output is replaced only with ``--overwrite``. In a batch, a slide that fails is reported with
its reason, the others finish, and the job exits non-zero naming the failures.
"""

from __future__ import annotations

import argparse

from pipelines.cli import make_parser, run
from unet.config import Config

# the job (pipelines.infer.job) is imported where it runs, so that --help answers at once


def main(config: Config, args: argparse.Namespace) -> dict:
    """The command line: ``--overwrite`` and ``--resume`` join ``infer.overwrite`` and ``infer.resume``."""
    from pipelines.infer.job import infer

    update = {"overwrite": config.infer.overwrite or args.overwrite, "resume": config.infer.resume or args.resume}
    return infer(config.model_copy(update={"infer": config.infer.model_copy(update=update)}))


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.infer", __doc__.splitlines()[0], default_config="configs/infer.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
