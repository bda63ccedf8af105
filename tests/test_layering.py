"""The library stays free of the orchestration frameworks (Ray, Dask, MLflow)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import ROOT

FILES = sorted((ROOT / "unet").rglob("*.py"))
MODULES = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__") for p in FILES]
FRAMEWORKS = {"ray", "dask", "distributed", "mlflow"}


def test_no_unet_module_imports_a_framework_at_module_level() -> None:
    """Imports inside functions (optional features) and ``if TYPE_CHECKING:`` blocks are allowed."""
    for path in FILES:
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad = {name.split(".")[0] for name in names} & FRAMEWORKS
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_unet_starts_no_ray_or_dask() -> None:
    """(MONAI, used for augmentation, imports MLflow itself when it is installed; that is not ours.)"""
    code = "import sys\n" + "".join(f"import {m}\n" for m in MODULES)
    code += "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'dask', 'distributed'})))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "", f"unet/ pulled in: {result.stdout.strip()}"
