"""The layers hold: the library stays free of the orchestration frameworks (Ray, Dask, MLflow) and of
``pipelines/``, and no module imports one that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import ROOT

FILES = sorted((ROOT / "unet").rglob("*.py"))
MODULES = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__") for p in FILES]
FRAMEWORKS = {"ray", "dask", "distributed", "mlflow"}


# the only framework imports the library makes, each inside the one function that needs it
# Slide.to_dask, intensity_ranges of lazy arrays
ALLOWED = {("unet/slides/base.py", "dask"), ("unet/intensity.py", "dask")}


def test_the_library_imports_frameworks_only_where_allowed() -> None:
    """Every import statement, at module level or inside functions (``if TYPE_CHECKING:`` blocks aside)."""
    for path in FILES:
        tree = ast.parse(path.read_text())
        type_only = {id(n) for node in ast.walk(tree) if _is_type_checking(node) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for framework in {name.split(".")[0] for name in names} & FRAMEWORKS:
                place = (path.relative_to(ROOT).as_posix(), framework)
                assert place in ALLOWED, f"{place[0]} imports {framework} (line {node.lineno})"


def _project_imports(path) -> set[str]:
    """The project modules (``unet.*``, ``pipelines.*``) a file imports anywhere: at module level, inside
    functions, under ``TYPE_CHECKING`` (a circle of types is a circle for its reader too)."""
    modules = {module for module, _ in PROJECT}
    module = PROJECT_NAMES[path]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a name imported from a module: that module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


PROJECT = [(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"), p)
           for p in sorted([*(ROOT / "unet").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")])]  # fmt: skip
PROJECT_NAMES = {path: module for module, path in PROJECT}


def test_the_library_never_imports_the_pipelines() -> None:
    for module, path in PROJECT:
        if module.startswith("unet"):
            wrong = sorted(name for name in _project_imports(path) if name.startswith("pipelines"))
            assert not wrong, f"{module} imports {', '.join(wrong)}"


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No circle of imports of any length (strongly connected components of the import graph)."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {module: i for i, (module, _) in enumerate(PROJECT)}
    edges = [(index[module], index[imported]) for module, path in PROJECT for imported in _project_imports(path)]
    rows, cols = np.array(edges).T
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(index), len(index)))
    _, component = connected_components(graph, directed=True, connection="strong")
    circles = [sorted(m for m, c in zip(index, component, strict=True) if c == k) for k in np.unique(component)]
    circles = [circle for circle in circles if len(circle) > 1]
    assert not circles, f"import circles: {circles}"


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def test_intensity_ranges_of_numpy_images_need_no_dask() -> None:
    code = (
        "import sys, numpy as np\nfrom unet.intensity import intensity_ranges\n"
        "rng = np.random.default_rng(0)\n"
        "print(intensity_ranges(rng.integers(0, 4000, (2, 64, 64)).astype(np.uint16)))\n"
        "print(intensity_ranges(rng.random((1, 64, 64)).astype(np.float32)))\n"
        "print('dask' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_numpy_and_dask_inputs_give_the_same_ranges() -> None:
    import dask.array as da
    import numpy as np

    from unet.intensity import intensity_ranges

    rng = np.random.default_rng(1)
    for image in (rng.integers(-50, 4000, (2, 96, 80)).astype(np.int16), rng.random((1, 96, 80)).astype(np.float32)):
        assert intensity_ranges(image) == intensity_ranges(da.from_array(image))  # one chunk: exact both ways


def test_importing_unet_starts_no_ray_or_dask() -> None:
    """(MONAI, used for augmentation, imports MLflow itself when it is installed; that is not ours.)"""
    code = "import sys\n" + "".join(f"import {m}\n" for m in MODULES)
    code += "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'dask', 'distributed'})))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "", f"unet/ pulled in: {result.stdout.strip()}"
