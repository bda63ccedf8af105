"""Train the U-Net with Ray Train (DDP), tracked and registered in MLflow.

    python -m pipelines.train --config configs/train.yaml                 # starts a local Ray
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.train --config configs/train.yaml             # on a Ray cluster

Re-running with the same ``train.run_name`` and ``train.storage_path`` resumes from the last
checkpoint and continues the same MLflow run. At the end the best epoch's model is logged,
registered as a new version (alias ``candidate``) and promoted to ``champion`` if it beats it.
"""

from __future__ import annotations

import argparse

from pipelines.cli import make_parser, run
from unet.config import Config

# the job (pipelines.train.job: Ray, MLflow) is imported where it runs, so that --help answers at once


def main(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.train.job import train

    return train(config)


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.train", __doc__.splitlines()[0], default_config="configs/train.yaml")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
