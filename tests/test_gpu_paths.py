"""The GPU paths, wherever their logic runs on a CPU: device checks that fail in one line instead of hanging,
one Dask worker per GPU offering the resource the chunk tasks ask for, training resources refused or awaited,
the gradient scaler resumed from any checkpoint, and normalisation on the device equal to the CPU's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipelines.infer.cluster import gpu_cluster, in_process, start_dask, task_resources, worker_count
from pipelines.train.job import check_gpu_build, check_resources
from tests.helpers import ROOT, environment
from unet.config import InferConfig, load_config
from unet.devices import DeviceError, check_device, compute_precision, device_name, visible_gpus
from unet.errors import UserError
from unet.inference import ChunkPredictor, InferenceSettings
from unet.intensity import scale_intensity
from unet.model import UNet
from unet.model_files import save_weights
from unet.serving import _load_pyfunc
from unet.training import TrainingParts, make_grad_scaler, restore_scaler, unwrap

CPU_ONLY = torch.version.cuda is None
needs_cpu_only_torch = pytest.mark.skipif(not CPU_ONLY, reason="checks the errors of a CPU-only PyTorch build")


@needs_cpu_only_torch
@pytest.mark.parametrize("setting", ["infer.device", "model_config device"])
def test_cuda_on_a_cpu_only_build_is_one_clear_error(setting: str) -> None:
    with pytest.raises(DeviceError, match=rf"^{setting} is cuda but PyTorch .* is a CPU-only build; install a CUDA"):
        check_device(setting, "cuda", "bf16")
    check_device(setting, "cpu", "bf16")  # nothing to check
    assert visible_gpus() == []


@needs_cpu_only_torch
def test_inference_asked_for_cuda_stops_at_once_with_one_line(trained_model_dir, tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "s.zarr", data=np.zeros((3, 64, 64), np.uint8), chunks=(3, 64, 64))
    items = [f"infer.input={tmp_path / 's.zarr'}", f"infer.output={tmp_path / 'o.zarr'}", "infer.device=cuda",
             f"infer.model={trained_model_dir}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]  # fmt: skip
    command = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    command += [a for item in items for a in ("--set", item)]
    started = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert result.stderr.strip().count("\n") == 0 and "infer.device is cuda but PyTorch" in result.stderr
    assert not (tmp_path / "o.zarr").exists() and not list(tmp_path.glob(".o.zarr*"))


def test_one_worker_per_gpu_offering_the_resource_the_tasks_ask_for() -> None:
    """Two 'GPUs' by name: each worker process sees only its own, and tasks asking for a share run (no hang)."""
    infer = InferConfig(device="cuda")
    assert worker_count(infer, ["0", "1"]) == 2 and not in_process(infer, ["0", "1"])
    assert in_process(infer, ["0"]) and worker_count(InferConfig(device="cpu"), []) == 1
    with pytest.raises(UserError, match=r"infer.workers=3 but 2 GPU\(s\) are visible"):
        worker_count(InferConfig(device="cuda", workers=3), ["0", "1"])
    from distributed import Client

    cluster = gpu_cluster(["0", "1"], tasks_per_worker=2)
    try:
        with Client(cluster) as client:
            resources = task_resources("cuda", 2)

            def visible() -> str | None:  # runs in the worker process: its own environment
                return os.environ.get("CUDA_VISIBLE_DEVICES")

            futures = [client.submit(visible, pure=False, resources=resources) for _ in range(8)]
            assert set(client.gather(futures)) == {"0", "1"}
            workers = client.scheduler_info()["workers"].values()
            assert sorted(w["resources"]["GPU"] for w in workers) == [1, 1]
            assert {w["host"] for w in workers} == {"127.0.0.1"}
    finally:
        cluster.close()


def test_a_single_gpu_is_driven_from_the_jobs_own_process() -> None:
    client, cluster = start_dask(InferConfig(device="cuda"), gpus=["0"])
    try:
        assert len(cluster.workers) == 1 and in_process(InferConfig(device="cuda"), ["0"])
        future = client.submit(os.getpid, pure=False, resources=task_resources("cuda", 8))
        assert future.result(timeout=30) == os.getpid()  # the resource is offered: no hang, and in this process
    finally:
        client.close()
        cluster.close()


def test_threads_follow_the_cores_the_job_may_use_not_the_machines() -> None:
    """A job pinned to one core (Slurm, taskset, a container's cpuset) sizes its threads by that core: more torch
    threads than cores only wait for one another."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from unet.devices import "
            "usable_cores, device_name; print(usable_cores(), device_name('cpu'))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment(), check=True)
    assert done.stdout.split(" ", 1)[0] == "1" and done.stdout.strip().endswith("(1 cores)")


def test_auto_precision_is_bf16_only_where_the_device_computes_it_in_hardware() -> None:
    """``infer.precision: auto``: bf16 on CPUs with bf16 instructions (x86-64's AVX512-BF16 or AMX, Arm's bf16),
    fp32 where bf16 would be emulated (2.6x slower on an AVX-512 Xeon without them); a set precision stays."""
    from unet.devices import cpu_computes_bf16

    assert cpu_computes_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert cpu_computes_bf16(frozenset({"avx512f", "amx_tile", "amx_bf16"}))
    assert cpu_computes_bf16(frozenset({"fp", "asimd", "sve", "bf16"}))  # Arm (Graviton 3, Grace)
    assert not cpu_computes_bf16(frozenset({"avx2", "avx512f", "avx512bw"}))  # bf16 emulated
    assert not cpu_computes_bf16(frozenset())  # no /proc/cpuinfo
    here = compute_precision("auto", "cpu")
    assert here == ("bf16" if cpu_computes_bf16() else "fp32")
    assert [compute_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    if CPU_ONLY:
        assert compute_precision("auto", "cuda") == "fp32"  # no GPU to compute bf16: never a half-made choice
    model = UNet(3, 2, base_channels=8, depth=2)
    with ChunkPredictor(model, InferenceSettings(device="cpu", precision="auto")) as predictor:
        assert predictor.precision == here
    assert device_name("cpu", "auto") == f"{device_name('cpu')}, {here}"


def test_normalising_on_the_device_equals_the_cpu_rule() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 30), dtype=np.uint8)
    ranges = ((3.0, 250.0), (0.0, 255.0), (17.5, 200.25))
    on_cpu = scale_intensity(pixels, ranges)
    as_tensor = scale_intensity(torch.from_numpy(pixels), ranges)
    assert as_tensor.dtype == torch.float32 and np.array_equal(as_tensor.numpy(), on_cpu)


def test_the_scaler_resumes_from_checkpoints_written_without_one() -> None:
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)  # what an fp16 run on a GPU has
    disabled = make_grad_scaler("bf16", torch.device("cpu"))
    assert disabled.state_dict() == {}  # what a bf16, fp32 or CPU checkpoint holds
    restore_scaler(enabled, disabled.state_dict())  # loading {} into an enabled scaler raised before
    assert enabled.get_scale() == 1024.0
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    restore_scaler(enabled, saved)
    assert enabled.get_scale() == 8.0
    restore_scaler(disabled, saved)  # an fp16 checkpoint resumed in bf16: no scaler to load into
    assert not disabled.is_enabled()


def test_training_resources_are_refused_locally_and_awaited_on_a_cluster() -> None:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        config = load_config(None, ["train.num_workers=4", "train.resource_wait_s=1"])
        started = time.monotonic()
        with pytest.raises(UserError, match=r"^train.num_workers=4 workers need 4 CPU \(the cluster has 1\); lower"):
            check_resources(config, local=True)
        assert time.monotonic() - started < 1  # a local Ray never grows: at once
        with pytest.raises(UserError, match=r"need 4 CPU \(the cluster has 1\) after 1 s; .* train.resource_wait_s"):
            check_resources(config, local=False)  # an autoscaling cluster may grow: waited for
        assert time.monotonic() - started >= 1
        check_resources(load_config(None, ["train.num_workers=1"]), local=True)  # fits
    finally:
        ray.shutdown()


@needs_cpu_only_torch
def test_training_on_gpus_needs_a_cuda_build() -> None:
    with pytest.raises(UserError, match=r"train.use_gpu needs a CUDA build of PyTorch .* this one is CPU-only"):
        check_gpu_build(load_config(None, ["train.use_gpu=true"]))
    check_gpu_build(load_config(None, ["train.use_gpu=false"]))


def test_the_pyfunc_model_runs_where_its_model_config_says(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = save_weights(UNet(3, 2, base_channels=4, depth=2).eval(), tmp_path / "m")
    batch = np.random.default_rng(0).random((1, 3, 32, 32)).astype(np.float32)
    exact = _load_pyfunc(str(folder), {"precision": "fp32"}).predict(batch)  # no device: a GPU when there is one
    fast = _load_pyfunc(str(folder), {"device": "cpu", "precision": "bf16"}).predict({"image": batch})
    assert fast.dtype == np.float32 and fast.shape == exact.shape and np.abs(fast - exact).max() < 0.05
    if CPU_ONLY:
        with pytest.raises(DeviceError, match="model_config device is cuda but PyTorch"):
            _load_pyfunc(str(folder), {"device": "cuda"})


@needs_cpu_only_torch
def test_evaluation_on_cuda_stops_with_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pipelines.evaluate", "--config", str(ROOT / "configs" / "train.yaml"),
               "--set", "infer.device=cuda", "--set", f"evaluate.model={tmp_path}"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "infer.device is cuda but PyTorch" in result.stderr  # evaluation predicts with the infer settings


def test_compiled_training_models_save_the_plain_weights() -> None:
    """train.compile wraps the (DDP) model; checkpoints and registered weights keep the plain UNet's keys."""
    model = UNet(3, 2, base_channels=4, depth=2)
    compiled = torch.compile(model)  # compiling itself waits for the first call; the wrapper is what matters
    assert unwrap(compiled) is model and unwrap(model) is model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainingParts(compiled, optimizer, scheduler, make_grad_scaler("fp32", torch.device("cpu"))).state(epoch=0)
    assert state["model"].keys() == model.state_dict().keys()
