"""The benchmark entry point runs and writes its report (timings are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from benchmarks.gpu import main as gpu_main
from benchmarks.run import main
from benchmarks.seeds import main as seeds_main
from benchmarks.seeds import splits


def test_quick_weight_map_benchmark_writes_a_report(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    assert main(["--only", "weight_map", "--quick", "--output", str(output)]) == 0
    report = output.read_text()
    assert "# Benchmarks" in report and "python -m benchmarks.run --only weight_map --quick" in report
    row = next(line for line in report.splitlines() if line.startswith("| 512x512"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "125"  # the real image's nuclei
    assert float(cells[-1]) <= 1e-5  # the fast weight map equals the reference


def test_pipeline_benchmark_profiles_the_cpu_side_with_a_stand_in_network(capsys) -> None:
    """`python -m benchmarks.pipeline --quick`: a job with the nearly free stand-in (about a thousand objects per
    Mpx of real H&E), its stages profiled, then one with the stand-in as slow as a GPU, the GIL that a GPU
    worker's layout holds, by part, and its model thread beside the hand-off to post-processing processes."""
    from benchmarks.pipeline import main as pipeline_main

    assert pipeline_main(["--quick"]) == 0
    table = capsys.readouterr().out.split("| cores |")[1]
    free, gpu_worker = (line.strip("|").split("|") for line in table.splitlines()[2:4])
    assert free[1].strip() == "one process, the CPU's 1024-px chunks, stand-in nearly free"
    assert "a GPU worker's chunks (2048 px, one pass), stand-in as slow as a GPU" in gpu_worker[1]
    assert "a GPU worker's GIL switch interval, labelling in 1 post-processing process(es)" in gpu_worker[1]
    assert 300 < float(free[2]) < 3000  # objects per Mpx: a realistic density
    # per core; the stand-in's own time left out; also the normalising and the model thread's pass (a GPU's work)
    assert 0 < float(free[4]) <= float(free[5]) <= float(free[6])
    stages = {line.split("|")[1].strip() for line in table.split("| stage |")[1].splitlines()[2:] if "|" in line}
    assert {"read, decode input", "label chunk", "objects", "encode, write", "pyramid", "merge seams"} <= stages
    held = table.split("GIL held by the job's process")[1].split("A GPU worker's model thread beside")[0]
    if "Not measured: " not in held:  # py-spy needs ptrace, which a container may forbid: then it says why
        parts = {line.split("|")[1].strip(): float(line.split("|")[2].strip(" *")) for line in held.splitlines()[3:]
                 if line.startswith("| ")}  # fmt: skip
        from benchmarks.gil_profile import OTHER, PARTS

        assert parts.pop("**all**") > 0 and set(parts) <= {name for name, _ in PARTS} | {OTHER}
        assert "So one process drives at most" in held
    handed = table.split("| model thread | median pass (ms) | vs alone |")[1].split("Profile on 1 core")[0]
    passes = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in handed.splitlines()[2:] if "|" in line}
    assert list(passes) == ["model thread alone", "chunks handed off, their pixels sent",
                            "chunks handed off, read back from Zarr (used)"] and min(passes.values()) > 0  # fmt: skip


def _gpu_table(report: str) -> dict[str, str]:
    """The GPU section's table: measurement -> (value, notes)."""
    section = report.split("## GPU: inference and training on one device")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): (cells[1].strip(), cells[2].strip()) for cells in rows[1:]}


def test_gpu_benchmark_runs_on_a_cpu_as_a_smoke_test(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu --device cpu --quick`: the same code as on a GPU, small sizes; every section runs
    in its own process and gives its figures, in the report and in the raw results. The Ray Train section (40 s,
    most of it Ray's start) runs in make test-cluster: the next test."""
    from unet.samples import fetch_samples

    fetch_samples(["he_nuclei", "cmu_slide"])  # the benchmark itself looks in the cache only (no network on a node)
    output, raw = tmp_path / "benchmarks.md", tmp_path / "gpu.json"
    sections = ["model", "inputs", "end_to_end", "monai", "plain", "deterministic"]
    arguments = ["--device", "cpu", "--quick", "--output", str(output), "--json", str(raw), "--only", *sections]
    assert gpu_main(arguments) == 0
    report = output.read_text()
    assert "--device cpu --quick" in report and "5 of 6 sections ran" in report
    result = json.loads(raw.read_text())
    ran = dict.fromkeys(sections[:-1], "ok") | {"deterministic": "skipped"}
    assert result["finished"] and {name: r["status"] for name, r in result["sections"].items()} == ran
    assert "changes only GPU kernels" in result["sections"]["deterministic"]["reason"]  # a minute less in make test
    assert result["versions"]["torch"] and result["versions"]["driver"] == "n/a"  # no NVIDIA driver here
    table = _gpu_table(report)
    numbers = {
        "model only, one chunk": "Mpx/s",
        "model only, inference's pass": "Mpx/s",
        "end to end, Zarr to Zarr": "Mpx/s",
        "MONAI sliding window": "Mpx/s",
        "training, plain PyTorch": "img/s",
    }
    for row, unit in numbers.items():
        value, number_unit = table[row][0].split(" ")
        assert float(value) > 0 and number_unit == unit, (row, table[row])
    assert "the real CMU slide" in table["inputs"][1]
    assert result["sections"]["end_to_end"]["result"]["objects"] > 0  # the briefly trained model finds nuclei


@pytest.mark.cluster  # a local Ray: make test-cluster
def test_gpu_benchmark_ray_section_runs_on_a_cpu(tmp_path: Path) -> None:
    """The Ray Train section of `benchmarks.gpu --device cpu --quick` (with the inputs it needs)."""
    from unet.samples import fetch_samples

    fetch_samples(["he_nuclei", "cmu_slide"])
    output, raw = tmp_path / "benchmarks.md", tmp_path / "gpu.json"
    assert gpu_main(["--device", "cpu", "--quick", "--output", str(output), "--json", str(raw), "--only", "ray"]) == 0
    result = json.loads(raw.read_text())
    assert {name: r["status"] for name, r in result["sections"].items()} == {"inputs": "ok", "ray": "ok"}
    value, unit = _gpu_table(output.read_text())["training, Ray Train 1 worker"][0].split(" ")
    assert float(value) > 0 and unit == "img/s"


def test_gpu_benchmark_records_a_section_over_time_or_failing_and_runs_the_next(tmp_path: Path, monkeypatch) -> None:
    """A section past its limit is stopped with every process it started and recorded as timed out, one missing
    a package is recorded as skipped, and the sections after them still run; without the model-only figure the
    exit status says so. Without the sample data the inputs are synthetic nuclei."""
    import psutil

    shadow = tmp_path / "shadow"  # ray, as if it were not installed
    (shadow / "ray").mkdir(parents=True)
    (shadow / "ray" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    monkeypatch.setenv("UNET_SAMPLES_DIR", str(tmp_path / "no-samples"))
    output, raw = tmp_path / "benchmarks.md", tmp_path / "gpu.json"
    arguments = ["--device", "cpu", "--quick", "--output", str(output), "--json", str(raw), "--only", "model",
                 "end_to_end", "ray", "--limit", "model=0.01", "--limit", "end_to_end=2"]  # fmt: skip
    assert gpu_main(arguments) == 1  # the model-only section did not run
    sections = json.loads(raw.read_text())["sections"]
    assert {name: r["status"] for name, r in sections.items()} == {
        "model": "timed out", "inputs": "ok", "end_to_end": "timed out", "ray": "skipped"}  # fmt: skip
    table = _gpu_table(output.read_text())
    assert table["model only"] == ("-", "timed out after 0.01 s")
    assert table["end to end, Zarr to Zarr"] == ("-", "timed out after 2 s")
    assert table["training, Ray Train 1 worker"] == ("-", "skipped: ray not installed")
    assert table["inputs"][0] == "1024 x 1024" and "synthetic nuclei (no sample data" in table["inputs"][1]
    left = [p for p in psutil.process_iter(["cmdline"]) if "pipelines.infer" in " ".join(p.info["cmdline"] or [])
            and str(tmp_path) in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    assert not left  # the stopped section's job went with it


def test_seed_study_holds_its_test_images_out_and_reports_every_variant(tmp_path: Path) -> None:
    """`benchmarks.seeds`: what each dataset trains on never overlaps what it is scored on; the section lists every
    variant's seeds, mean and spread (the trainings themselves are the benchmark, not this test)."""
    for dataset, trained in (("he", 12), ("he-small", 6), ("fluo", 12)):
        parts = splits(dataset, tmp_path / dataset)
        names = {part: {p.stem for p in (folder / "images").glob("*.tif")} for part, folder in parts.items()}
        assert len(names["trainval"]) == trained and names["test"] and not names["trainval"] & names["test"]
    held_out = tifffile.imread(tmp_path / "fluo" / "test" / "images" / "quadrant11.tif")
    assert held_out.shape[:2] == (256, 256)  # the fluorescence image's fourth quadrant: in no training tile
    for tile in (tmp_path / "fluo" / "trainval" / "images").glob("*.tif"):
        assert not np.array_equal(tifffile.imread(tile), held_out[:128, :128]), tile

    curve = [0.2, 0.5, 0.6, 0.7, 0.6, 0.7]  # over its second half, the validation F1 moves by 0.1 an epoch
    rows = [{"seed": seed, "f1": f1, "merged": merged, "train_seconds": 60.0, "val_curve": curve}
            for seed, f1, merged in ((0, 0.80, 2), (1, 0.90, 0), (2, 0.85, 1))]  # fmt: skip
    results, output = tmp_path / "seeds.json", tmp_path / "benchmarks.md"
    results.write_text(json.dumps({"v": {"what": "a variant", "commit": "abc", "command": "c", "when": "w",
                                         "datasets": {"he": rows}}}))  # fmt: skip
    assert seeds_main(["--table-only", "--results", str(results), "--output", str(output)]) == 0
    row = next(line for line in output.read_text().splitlines() if line.startswith("| v | he |"))
    assert row.endswith("| 0: 0.800 (2), 1: 0.900 (0), 2: 0.850 (1) | 0.850 | 0.100 | 1.0 | 0.100 | 1.0 min |"), row


def test_resampling_benchmark_times_every_window_inference_resamples(tmp_path: Path) -> None:
    """`benchmarks.resolution` counts each chunk with its halo and the chunk again, as inference reads them."""
    import zarr

    from benchmarks.resolution import resampling_seconds, to_markdown
    from unet.tiling import grid, input_region

    rgb = np.random.default_rng(0).integers(0, 255, (3, 150, 130), dtype=np.uint8)
    zarr.create_array(tmp_path / "slide.zarr", data=rgb, chunks=(3, 64, 64))
    seconds, pixels = resampling_seconds(tmp_path / "slide.zarr", 0.5, chunk=128, halo=32, multiple=16)
    regions = [region for _, region in grid(300, 260, 128)]  # the slide at twice its pixels
    assert seconds > 0 and pixels == sum(
        input_region(r, 32, 16).height * input_region(r, 32, 16).width + r.height * r.width for r in regions
    )
    row = {"slide": "s", "model_um": 0.25, "scale": 0.5, "output_mpx": 0.078, "seconds": 2.0, "resampling": seconds,
           "resampled_mpx": pixels / 1e6}  # fmt: skip
    assert "| s | 0.25 | 0.50 |" in to_markdown({"rows": [row]})


def test_quick_receipt_benchmark_counts_every_part(tmp_path: Path) -> None:
    """`--only receipt --quick`: a 3-slide batch, each part of the receipt and report counted and shown."""
    output = tmp_path / "benchmarks.md"
    assert main(["--only", "receipt", "--quick", "--output", str(output)]) == 0
    report = output.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 1024 x 1024 | base 16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    parts = [float(c) for c in cells[3:8]]  # tissue mask, chunk counts, QC picture, flags, report
    assert all(p >= 0 for p in parts) and parts[2] > 0 and float(cells[8]) == pytest.approx(sum(parts), abs=0.02)
    assert "Goal: receipt and report under 3% of the batch's wall time" in report


def test_without_py_spy_the_gil_job_still_runs_and_says_why_it_has_no_figure(tmp_path: Path, monkeypatch) -> None:
    """A machine without py-spy (or where ptrace is forbidden) still gets the job's figures, and the GIL table says
    why it has none instead of failing the benchmark."""
    from benchmarks import gil_profile
    from benchmarks.pipeline import _gil_held, _job, make_model, make_slide
    from pipelines import registry

    monkeypatch.setattr(gil_profile, "py_spy", lambda: None)
    slide, model = make_slide(tmp_path, 1024), make_model(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.connect(tracking)
    row = _job(slide, model, tmp_path, tracking, 1, postprocess=1, gpu_chunks=True, gil=True)
    assert row["held"] is None and row["stats"]["megapixels"] > 1
    assert _gil_held([row])[-1] == "Not measured: py-spy is not installed (it comes with ray[default])"


def test_gil_samples_are_summed_by_part_of_the_process_leaving_out_start_up(tmp_path: Path) -> None:
    """py-spy's raw lines (``thread (id): name;frame;... count``) become GIL-held seconds by part; samples under the
    job's set-up, imports or a slide's finishing, and samples without a Python frame, are left out."""
    from benchmarks.gil_profile import OTHER, RATE_HZ, held_seconds

    raw = tmp_path / "raw.txt"
    raw.write_text(
        "\n".join([
            "thread (1): 0-Dask-Default-Threads-9-0;_worker (t.py:1);timed (tasks.py:2);relabel (i.py:3) 40",
            "thread (2): zarr_io;run_forever (a.py:1) 10",
            "thread (3): IO loop;run_forever (a.py:1);Worker.trigger_profile (w.py:1) 20",
            "thread (4): MainThread;<module> (m.py:1);infer (j.py:1);set_up (j.py:2);load_model (m.py:3) 99",
            "thread (4): MainThread;<module> (m.py:1);_find_and_load (<frozen>:1) 99",
            "thread (4): MainThread 99",
            "thread (5): Finisher;_finish_or_fail (j.py:1);dumps (p.py:1) 99",
            "thread (6): QueueFeederThread;_feed (q.py:1) 6",
            "thread (7): sampler;loop (s.py:1) 4",
        ])
    )  # fmt: skip
    held = held_seconds(raw)
    assert held == {
        "chunk tasks (read, normalise, store, label, objects, pyramid)": 40 / RATE_HZ,
        "Zarr's event loop and its threads": 10 / RATE_HZ,
        "Dask's event loop (scheduler, worker, client)": 20 / RATE_HZ,
        "hand-off to post-processing processes (pickling)": 6 / RATE_HZ,
        OTHER: 4 / RATE_HZ,
    }
