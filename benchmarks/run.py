"""Run the project's benchmarks and write their sections of docs/benchmarks.md.

    python -m benchmarks.run [--only NAME ...] [--quick] [--output docs/benchmarks.md]

Each section records when, on which machine, with which versions and by which command it was
measured, and every number in a section comes from that one run. ``--only`` re-measures the named
benchmarks and replaces just their sections; the other sections are kept as they were.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks import chunk_size, inference, memory, startup, train_step, weight_map

BENCHMARKS = {
    "weight_map": weight_map,
    "train_step": train_step,
    "inference": inference,
    "chunk_size": chunk_size,
    "memory": memory,
    "startup": startup,
}
PACKAGES = ("torch", "numpy", "scipy", "zarr", "dask", "ray", "mlflow", "monai")
HEADER = (
    "# Benchmarks\n\n"
    "Every section says when, where and by which command it was measured; `python -m benchmarks.run` "
    "measures them all again,\n`python -m benchmarks.run --only NAME ...` replaces just those sections "
    f"(names: {', '.join(BENCHMARKS)}).\n"
)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES)
    return (
        f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, Python {platform.python_version()}; "
        f"{versions}"
    )


def sections_of(report: str) -> dict[str, str]:
    """The ``## `` sections of an existing report, by title (each with its heading and text)."""
    parts = re.split(r"^(?=## )", report, flags=re.MULTILINE)
    return {part.splitlines()[0][3:].strip(): part.rstrip() + "\n" for part in parts if part.startswith("## ")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke test)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = sections_of(args.output.read_text()) if args.output.exists() else {}
    for name in names:
        print(f"running {name} ...", flush=True)
        module = BENCHMARKS[name]
        result = module.run(quick=args.quick)
        doc = (module.__doc__ or "").strip()
        stamp = f"_Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command.strip()}` on {machine()}._"
        sections[result["title"]] = f"## {result['title']}\n\n{stamp}\n\n{doc}\n\n{module.to_markdown(result)}\n"
        print(module.to_markdown(result), flush=True)
    order = [getattr(module, "TITLE", None) for module in BENCHMARKS.values()]
    titles = [t for t in order if t in sections] + [t for t in sections if t not in order]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(HEADER + "\n" + "\n".join(sections[t] for t in titles))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
