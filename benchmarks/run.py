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

from benchmarks import (
    batch,
    chunk_size,
    inference,
    memory,
    receipt,
    resolution,
    results,
    startup,
    train_step,
    weight_map,
)
from unet.devices import cpu_model

BENCHMARKS = {
    "weight_map": weight_map,
    "train_step": train_step,
    "inference": inference,
    "chunk_size": chunk_size,
    "memory": memory,
    "batch": batch,
    "receipt": receipt,
    "results": results,
    "resolution": resolution,
    "startup": startup,
}
PACKAGES = ("torch", "numpy", "scipy", "zarr", "dask", "ray", "mlflow", "monai")
HEADER = (
    "# Benchmarks\n\n"
    "Every section says when, where and by which command it was measured; `python -m benchmarks.run` "
    "measures them all again,\n`python -m benchmarks.run --only NAME ...` replaces just those sections "
    f"(names: {', '.join(BENCHMARKS)}); `python -m benchmarks.gpu` writes the GPU section, `python -m "
    "benchmarks.pipeline` the one on the pipeline around the model.\n"
)


def machine() -> str:
    import torch

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES)
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}; {versions}"
    )


def sections_of(report: str) -> dict[str, str]:
    """The ``## `` sections of an existing report, by title (each with its heading and text)."""
    parts = re.split(r"^(?=## )", report, flags=re.MULTILINE)
    return {part.splitlines()[0][3:].strip(): part.rstrip() + "\n" for part in parts if part.startswith("## ")}


def write_section(output: Path, title: str, doc: str, table: str, command: str) -> None:
    """Put one benchmark's section into ``output`` (replacing its earlier one), stamped with time, machine, command."""
    sections = sections_of(output.read_text()) if output.exists() else {}
    stamp = f"_Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` on {machine()}._"
    sections[title] = f"## {title}\n\n{stamp}\n\n{doc}\n\n{table}\n"
    order = [getattr(module, "TITLE", None) for module in BENCHMARKS.values()]
    titles = [t for t in order if t in sections] + [t for t in sections if t not in order]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(HEADER + "\n" + "\n".join(sections[t] for t in titles))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke test)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.only or list(BENCHMARKS):
        print(f"running {name} ...", flush=True)
        module = BENCHMARKS[name]
        result = module.run(quick=args.quick)
        table = module.to_markdown(result)
        print(table, flush=True)
        write_section(args.output, result["title"], (module.__doc__ or "").strip(), table, command.strip())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
