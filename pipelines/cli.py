"""What every entry point shares: ``--config``, ``--set``, printing/saving the resolved config (for those that read
a config), and turning user errors into one line on stderr with a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from unet.config import Config, dump_config, load_config, save_config
from unet.errors import UserError

EXIT_USER_ERROR = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``ray job stop``, a pod being stopped): the job stops as it does for Ctrl-C."""


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Ctrl-C (SIGINT, Python's KeyboardInterrupt) and SIGTERM both stop the job in the main thread, where it marks
    what it leaves behind (its MLflow runs KILLED, checkpoints and partial outputs kept for a resume)."""

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def make_parser(
    prog: str, description: str, default_config: str | None = None, config: bool = True
) -> argparse.ArgumentParser:
    """An argument parser with the options common to every entry point: ``-v``, and for one that reads a config
    (``config``) ``--config``, ``--set``, ``--print-config`` and ``--save-config``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.set_defaults(reads_config=config)
    if config:
        _add_config_options(parser, default_config)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _add_config_options(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(default_config) if default_config else None,
        help=f"YAML config file (default: {default_config or 'built-in defaults'})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--save-config", type=Path, metavar="PATH", help="also write the resolved config here")


def resolve_config(args: argparse.Namespace) -> Config | None:
    """Load the config named by ``args``; print it and return None when ``--print-config`` is set."""
    config = load_config(args.config, args.overrides)
    if args.save_config:
        save_config(config, args.save_config)
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return None
    return config


def run(
    main: Callable[[Config, argparse.Namespace], object] | Callable[[argparse.Namespace], object],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, load the config and call ``main(config, args)``, or ``main(args)`` where the parser offers
    no ``--config`` (``make_parser(config=False)``); return an exit status."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # MLflow's migrations and botocore's credential lookups are not the user's business
        for name in ("mlflow", "botocore", "aiobotocore", "s3fs", "torch"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if not args.reads_config:
            job = functools.partial(main, args)
        elif (config := resolve_config(args)) is not None:
            job = functools.partial(main, config, args)
        else:  # --print-config printed it
            return 0
        with stopped_by_signals():
            job()
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # what was kept, if the job says: its notes
        stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{parser.prog}: {'; '.join([stopped, *getattr(exc, '__notes__', [])])}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        # Nothing is left to collect; without this the interpreter's last collections over the object graphs
        # of PyTorch, MLflow and Dask add most of a second to every command's exit.
        gc.freeze()
    return 0
