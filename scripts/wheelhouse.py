"""Wheels for an air-gapped GPU node: the project's own wheel and everything it needs at run time (its
dependencies and the `server` extra), at the versions of constraints.txt, for Linux x86-64 and each supported
CPython, without PyTorch: such nodes have their CUDA build of torch (and its NVIDIA and triton libraries, GBs).

    python scripts/wheelhouse.py DIR        (make wheelhouse [WHEELHOUSE=DIR])

Which packages: the closure of pyproject's requirements, followed through the installed packages' metadata
(importlib.metadata) with each requirement's markers evaluated for the target (Linux x86-64, CPython 3.11 and
3.12 apart) and extras followed as asked; torch is not followed, so what only torch needs stays out too. The
`server` extra goes in because a node may run the MLflow server (PostgreSQL, S3 artifacts, accounts); `dev`
(tests, linters, browsers) stays out. Each set is then downloaded with --no-deps, binary wheels only: a pinned
package without a wheel for a target stops the build (pip's error names it). DIR also gets the pins of what it
holds as constraints.txt, so the folder alone installs: `pip install --no-index --find-links DIR -c
DIR/constraints.txt 'unet-wsi[server]'` (make install-offline).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# pyproject: requires-python = ">=3.11,<3.13". Requires-Python is checked against a full release: ome-zarr 0.18
# asks for ">3.11", which "3.11" (3.11.0) fails and every later 3.11 release meets.
PYTHONS = ("3.11.1", "3.12.0")
EXTRAS = {"server"}
# CUDA torch's own wheels need glibc 2.28 (manylinux_2_28), so any node running them accepts these. pip 23 does
# not expand manylinux_2_28 to the older tags itself.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip


def left_out(name: str) -> bool:
    """PyTorch and what it brings: the node's CUDA build provides them."""
    return name in {"torch", "triton"} or name.startswith("nvidia-")


def constraint_pins() -> dict[str, str]:
    """Canonical name -> exact version, from constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def closure(python: str, pins: dict[str, str]) -> dict[str, str]:
    """Canonical name -> 'Name==version' of every package the project needs at run time under `python`."""
    env = {**TARGET, "python_version": python.rsplit(".", 1)[0], "python_full_version": python}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    todo = [r for r in map(Requirement, wanted) if not r.marker or r.marker.evaluate(env)]
    followed: dict[str, set[str]] = {}
    needed: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if left_out(name) or (name in needed and req.extras <= followed[name]):
            continue
        if name not in pins:
            sys.exit(f"wheelhouse: {name} is needed at run time (Python {python}) but not pinned in constraints.txt")
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"wheelhouse: {name} is not installed in {sys.prefix}, so its dependencies are unknown")
        if dist.version != pins[name]:
            sys.exit(f"wheelhouse: {name} {dist.version} is installed, constraints.txt pins {pins[name]}: make install")
        needed[name] = f"{dist.metadata['Name']}=={dist.version}"
        followed.setdefault(name, set()).update(req.extras)
        for line in dist.requires or []:
            dep = Requirement(line)
            # "" evaluates the requirement itself; each extra asked for adds the ones marked `extra == ...`
            if not dep.marker or any(dep.marker.evaluate({**env, "extra": e}) for e in followed[name] | {""}):
                todo.append(dep)
    return needed


def download(python: str, requirements: list[str], folder: Path) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(requirements) + "\n")
        listing.flush()
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        target = ["--implementation", "cp", "--python-version", python, *platforms]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *target]
        command += ["-d", str(folder), "-r", listing.name]
        if subprocess.run(command).returncode:
            sys.exit(f"wheelhouse: a pinned package has no manylinux x86-64 wheel for Python {python} (named above)")


def project_wheel(folder: Path) -> str:
    """Build the project's wheel from a copy of its sources, so that no build/ folder is left in the checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, tmp)
        for package in ("unet", "pipelines"):
            shutil.copytree(ROOT / package, Path(tmp) / package, ignore=shutil.ignore_patterns("__pycache__"))
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder), tmp]
        if subprocess.run(command).returncode:
            sys.exit("wheelhouse: building the project's wheel failed (see above)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return f"{project['name']}=={project['version']}"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/wheelhouse.py DIR")
    folder = Path(sys.argv[1]).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pins, held = constraint_pins(), {}
    for python in PYTHONS:
        needed = closure(python, pins)
        print(f"wheelhouse: Python {python}: {len(needed)} packages (torch, triton and nvidia-* left out)")
        download(python, sorted(needed.values()), folder)
        held.update(needed)
    own = project_wheel(folder)
    lines = ["# The versions in this wheelhouse (scripts/wheelhouse.py). No torch: the node's own build is kept.", own]
    (folder / "constraints.txt").write_text("\n".join([*lines, *sorted(held.values(), key=str.lower)]) + "\n")
    wheels = list(folder.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels) / 1e6
    print(f"wheelhouse: {len(wheels)} wheels, {size:.0f} MB in {folder}")


if __name__ == "__main__":
    main()
