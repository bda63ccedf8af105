"""The benchmark entry point runs and writes its report (timings are reported, never asserted)."""

from __future__ import annotations

from pathlib import Path

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
