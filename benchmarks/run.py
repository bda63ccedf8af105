"""Run the project's benchmarks and write docs/benchmarks.md.

    python -m benchmarks.run [--only NAME ...] [--quick] [--output docs/benchmarks.md]

Every number in the report comes from this one run, on this machine; the report records the
machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from benchmarks import inference, train_step, weight_map

BENCHMARKS = {"weight_map": weight_map, "train_step": train_step, "inference": inference}
PACKAGES = ("torch", "numpy", "scipy", "zarr", "dask", "ray", "mlflow", "monai")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES)
    return (
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}\n- versions: {versions}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke test)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = []
    for name in names:
        print(f"running {name} ...", flush=True)
        module = BENCHMARKS[name]
        result = module.run(quick=args.quick)
        doc = (module.__doc__ or "").strip()
        sections.append(f"## {result['title']}\n\n{doc}\n\n{module.to_markdown(result)}\n")
        print(module.to_markdown(result), flush=True)
    report = (
        "# Benchmarks\n\n"
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command.strip()}` "
        "(reproduce with the same command).\n\n"
        f"{machine()}\n\n" + "\n".join(sections)
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
