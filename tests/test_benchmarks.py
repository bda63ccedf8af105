"""The benchmark entry point runs and writes its report (timings are reported, never asserted)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu import main as gpu_main
from benchmarks.run import main


def test_quick_weight_map_benchmark_writes_a_report(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    assert main(["--only", "weight_map", "--quick", "--output", str(output)]) == 0
    report = output.read_text()
    assert "# Benchmarks" in report and "python -m benchmarks.run --only weight_map --quick" in report
    row = next(line for line in report.splitlines() if line.startswith("| 512x512"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "125"  # the real image's nuclei
    assert float(cells[-1]) <= 1e-5  # the fast weight map equals the reference


def test_gpu_benchmark_runs_on_a_cpu_as_a_smoke_test(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu --device cpu --quick`: the same code as on a GPU, small sizes."""
    output = tmp_path / "benchmarks.md"
    assert gpu_main(["--device", "cpu", "--quick", "--output", str(output)]) == 0
    report = output.read_text()
    assert "## GPU: inference and training on one device" in report and "--device cpu --quick" in report
    values = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].split(" ")[0].replace(".", "").isdigit():
            values[cells[0]] = float(cells[1].split(" ")[0])
    assert set(values) == {"model only", "end to end, Zarr to Zarr", "MONAI sliding window",
                           "training, plain PyTorch", "training, Ray Train 1 worker"}  # fmt: skip
    assert all(value > 0 for value in values.values())
