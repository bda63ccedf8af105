"""The sections of ``benchmarks.gpu``, each run as its own process by it:

    python -m benchmarks.gpu_sections SECTION --device cuda|cpu [--quick] --folder FOLDER

A section writes its result to FOLDER/SECTION.json: its figures, or {"error": one line} (a missing optional
package, a failure). The sections after ``inputs`` read FOLDER/inputs.json: the slide, training store, trained
model and tracking database it made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (without sparsity), by a part of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0}  # fmt: skip
SIZES = {  # the full run (one H100, see benchmarks.gpu) and the CPU smoke test
    False: {"base": 64, "slide": 16384, "patch": 256, "batch": 16, "steps": 40, "epochs": 3, "brief_steps": 40,
            "warmup": 3, "repeats": 20, "chunk": None},
    True: {"base": 8, "slide": 1024, "patch": 64, "batch": 2, "steps": 2, "epochs": 2, "brief_steps": 4,
           "warmup": 1, "repeats": 2, "chunk": 256},
}  # fmt: skip


# -- inputs -----------------------------------------------------------------------------------------------------
def inputs(device: str, sizes: dict, folder: Path) -> dict:
    """The slide (the real CMU slide mirrored about its borders; synthetic nuclei where the sample data is not in
    the cache), the training store (the real H&E nuclei; else synthetic), the model trained on it briefly (the
    recipe of ``benchmarks.models``, on ``device``) and an MLflow database that exists beforehand, as a user's."""
    from pipelines import registry
    from unet.samples import SampleDataError, fetch_samples

    try:  # offline: a machine without the network fails here at once instead of retrying pip
        sets = fetch_samples(["he_nuclei", "cmu_slide"], offline=True)
        real, why = sets["cmu_slide"] / "cmu_small_region.svs", ""
    except SampleDataError as error:
        real, why = None, _one_line(str(error))
    side = sizes["slide"]
    if real is not None:
        from benchmarks.inference import mirrored
        from unet.slides import open_slide

        cmu = open_slide(real)
        slide = mirrored(cmu.read(0, cmu.height, 0, cmu.width), side, side, folder / "slide.zarr")
        store = _he_store(folder)
        kind = f"the real CMU slide ({cmu.height} x {cmu.width}) mirrored; trained on the real H&E nuclei"
    else:
        slide, store = synthetic_slide(folder / "slide.zarr", side), synthetic_store(folder / "synthetic", sizes)
        kind = f"synthetic nuclei (no sample data: {why})"
    started = time.perf_counter()
    model = briefly_trained(store, sizes["base"], sizes["brief_steps"], device, folder / f"unet{sizes['base']}")
    trained = time.perf_counter() - started
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    registry.connect(tracking)  # creates the database's tables
    result = {"slide": str(slide), "store": store, "model": str(model), "tracking": tracking, "side": side,
              "kind": kind, "base": sizes["base"], "brief_steps": sizes["brief_steps"], "train_s": trained}  # fmt: skip
    return result  # FOLDER/inputs.json, read by the sections after this one


def briefly_trained(store: str, base: int, steps: int, device: str, output: Path) -> Path:
    """``benchmarks.models.briefly_trained``'s recipe (``steps`` steps of 4 x 128 x 128 patches, lr 3e-3, fp32) on
    ``device``: enough to predict nuclei-like objects, so that labelling and object counts are realistic."""
    import torch

    from unet.config import load_config
    from unet.data.dataset import PatchDataset
    from unet.loss import WeightedLoss
    from unet.model_files import save_weights
    from unet.training import build_model, build_optimizer, make_grad_scaler, train_step

    config = load_config(None, [f"model.base_channels={base}"])
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    optimizer = build_optimizer(model, config.train.model_copy(update={"lr": 3e-3}))
    dataset = PatchDataset(store, patch_size=128, length=steps * 4, foreground_bias=0.5, seed=0)
    scaler, loss_fn = make_grad_scaler("fp32", torch.device(device)), WeightedLoss()
    for batch in torch.utils.data.DataLoader(dataset, batch_size=4):
        train_step(model, batch, optimizer, loss_fn, scaler, device=torch.device(device), grad_clip=1.0)
    return save_weights(model.cpu().eval(), output)


def _he_store(folder: Path) -> str:
    from pipelines.prepare import prepare
    from unet.config import load_config

    return prepare(load_config(ROOT / "configs" / "prepare.yaml", [f"data.store={folder / 'he.zarr'}"]), previews=0)


def nuclei_image(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E-like (3, size, size) uint8 image with round dark nuclei, and their instance labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    count = size * size // 900
    for index, (cy, cx, r) in enumerate(zip(rng.integers(0, size, count), rng.integers(0, size, count),
                                            rng.integers(4, 10, count), strict=True), start=1):  # fmt: skip
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, size), max(cx - r, 0), min(cx + r + 1, size)
        disk = (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= r * r
        labels[y0:y1, x0:x1][disk] = index
    background = np.array([230, 180, 210], np.float32)[:, None, None]
    nucleus = np.array([90, 60, 150], np.float32)[:, None, None]
    image = np.where(labels[None] > 0, nucleus, background) + rng.normal(0, 12, (3, size, size))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def synthetic_slide(path: Path, side: int) -> Path:
    """A (3, side, side) Zarr slide of synthetic nuclei: one drawn tile mirrored about its borders."""
    from benchmarks.inference import mirrored

    return mirrored(nuclei_image(min(side, 2048), 0)[0], side, side, path)


def synthetic_store(folder: Path, sizes: dict) -> str:
    """A training store of synthetic nuclei, made by ``pipelines.prepare``."""
    from pipelines.prepare import prepare
    from unet.config import load_config

    for kind in ("images", "labels"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for seed in range(4):
        image, labels = nuclei_image(max(sizes["patch"] * 4, 256), seed)
        np.save(folder / "images" / f"s{seed}.npy", np.moveaxis(image, 0, -1))
        np.save(folder / "labels" / f"s{seed}.npy", labels)
    config = load_config(None, [f"data.images={folder / 'images'}", f"data.labels={folder / 'labels'}",
                                f"data.store={folder / 'store.zarr'}", "data.val_fraction=0.25",
                                "data.pixel_size_um=0.25"])  # fmt: skip
    return prepare(config, previews=0)


# -- inference --------------------------------------------------------------------------------------------------
def model_only(device: str, sizes: dict, folder: Path) -> dict:
    """Output Mpx/s of the inference model (random weights: speed does not depend on them) over one default chunk
    with its halo in one pass, and over the pass ``pipelines.infer`` would make with ``InferConfig(device=...)``'s
    defaults (smaller tiles where one pass would exceed ``infer.pass_memory_mb``); TFLOP/s and bf16 peak share."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unet.config import InferConfig
    from unet.devices import check_device
    from unet.inference import ChunkPredictor, InferenceSettings
    from unet.model import UNet, autocast_context
    from unet.tiling import Region, input_region, tiles_of

    check_device("--device", device, "bf16")
    info = {"device": _device_name(device)}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        info |= {"memory_free_gb": free / 1e9, "memory_total_gb": total / 1e9}
    torch.manual_seed(0)
    plain = UNet(3, 2, base_channels=sizes["base"]).eval().to(device)
    infer = InferConfig(device=device)
    chunk = sizes["chunk"] or infer.chunk
    settings = InferenceSettings.from_config(infer)
    with ChunkPredictor(plain, settings) as predictor:  # sets cudnn.benchmark as inference does
        region = Region(0, chunk, 0, chunk)
        tile = predictor.tile_for(region)
        limit = getattr(predictor, "pass_limit_mb", settings.pass_memory_mb)  # infer.pass_memory_mb or the device's
        tiles = len(tiles_of(region, tile, chunk, chunk))
        passes = {"chunk_pass": (chunk, 1), "inference_pass": (tile, min(settings.batch_size, tiles))}
        peak = _bf16_peak(info["device"])
        for name, (out_side, batch) in passes.items():
            if name == "inference_pass" and (out_side, batch) == passes["chunk_pass"]:
                info[name] = info["chunk_pass"]  # the same pass
                continue
            side = input_region(Region(0, out_side, 0, out_side), plain.halo, plain.size_multiple).height
            x = torch.rand(batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast_context(torch.device(device).type, "bf16"):
                with FlopCounterMode(display=False) as counter:  # the plain model: the counter knows its operators
                    plain(x)
                for _ in range(sizes["warmup"]):  # warm-up (and cuDNN's choice of kernels)
                    predictor.model(x)
                _synchronize(device)
                started = time.perf_counter()
                for _ in range(sizes["repeats"]):
                    predictor.model(x)
                _synchronize(device)
            seconds = (time.perf_counter() - started) / sizes["repeats"]
            tflops = counter.get_total_flops() / seconds / 1e12
            info[name] = {"output_mpx_s": batch * out_side**2 / seconds / 1e6, "tile": out_side, "batch": batch,
                          "input_mpx_s": batch * side**2 / seconds / 1e6, "pass": f"{batch} x {side} x {side}",
                          "tflops": tflops, "peak_fraction": tflops / peak if peak else None}  # fmt: skip
            del x
    if device == "cuda":
        info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return info | {"base": sizes["base"], "chunk": chunk, "pass_limit_mb": limit}


def end_to_end(device: str, sizes: dict, folder: Path) -> dict:
    """``pipelines.infer`` on the slide (Zarr in, OME-Zarr out) as a user runs it: its report and its wall time."""
    import zarr

    from pipelines.infer.output import LINEAGE_KEY

    given, output = _inputs(folder), folder / "out.ome.zarr"
    command = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    for item in (f"infer.input={given['slide']}", f"infer.output={output}", f"infer.model={given['model']}",
                 f"infer.device={device}", f"tracking.tracking_uri={given['tracking']}"):  # fmt: skip
        command += ["--set", item]
    started = time.perf_counter()
    _run(command)
    wall = time.perf_counter() - started
    stats = zarr.open_group(output, mode="r").attrs[LINEAGE_KEY]["stats"]
    return {"mpx": stats["megapixels"], "segment_mpx_s": stats["mpx_per_s"], "wall_mpx_s": stats["megapixels"] / wall,
            "startup_s": stats["startup_seconds"], "wall_s": wall, "objects": stats["objects"],
            "objects_per_mpx": stats["objects"] / stats["megapixels"]}  # fmt: skip


def monai(device: str, sizes: dict, folder: Path) -> dict:
    """MONAI's sliding window over the slide in memory, in its own process (``benchmarks.inference``)."""
    _require("monai")
    given = _inputs(folder)
    command = [sys.executable, "-m", "benchmarks.inference", "monai", given["slide"], given["model"]]
    command += ["--device", device]
    started = time.perf_counter()
    result = json.loads(_run(command).strip().splitlines()[-1])
    wall = time.perf_counter() - started
    return {"compute_mpx_s": result["mpx"] / result["compute_seconds"], "wall_mpx_s": result["mpx"] / wall,
            "wall_s": wall}  # fmt: skip


# -- training ---------------------------------------------------------------------------------------------------
def training_overrides(given: dict, sizes: dict, device: str) -> list[str]:
    """The config of both training sections: the same store, model, patches, batches, epochs and precision."""
    return [f"data.store={given['store']}", f"model.base_channels={sizes['base']}", f"data.patch_size={sizes['patch']}",
            f"train.batch_size={sizes['batch']}", f"train.steps_per_epoch={sizes['steps']}",
            f"train.epochs={sizes['epochs']}", "train.num_workers=1", f"train.use_gpu={str(device == 'cuda').lower()}",
            "train.precision=bf16", f"train.cpus_per_worker={os.cpu_count() if device == 'cpu' else 4}"]  # fmt: skip


def plain_training(device: str, sizes: dict, folder: Path) -> dict:
    """Images/s of a plain PyTorch loop, timed as ``pipelines.train``'s worker times an epoch: from the loader's
    start to the last step queued, no host sync in between; the last epoch's figure. Also the images/s of the same
    steps on one batch already on the device (what the model could train at without waiting for data)."""
    import torch

    from unet.config import load_config
    from unet.data.dataset import PatchDataset
    from unet.loss import WeightedLoss
    from unet.training import build_model, build_optimizer, make_grad_scaler, train_step

    config = load_config(None, training_overrides(_inputs(folder), sizes, device))
    train, dev = config.train, torch.device(device)
    dataset = PatchDataset.from_config(config.data.store, config)
    workers = train.loader_workers if train.loader_workers is not None else (4 if dev.type == "cuda" else 0)
    context = None  # loader processes must not fork this process once it uses CUDA: they start from a fork server
    if dev.type == "cuda" and workers:
        context = torch.multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "unet.data.dataset"])  # as a fork would start: imported
    loader = torch.utils.data.DataLoader(dataset, batch_size=train.batch_size, num_workers=workers,
                                         pin_memory=dev.type == "cuda", multiprocessing_context=context)  # fmt: skip
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in the Ray worker's timed epoch (set by its validation's predictor)
    torch.manual_seed(train.seed)
    model = build_model(config.model).to(dev, memory_format=torch.channels_last)
    optimizer, scaler = build_optimizer(model, train), make_grad_scaler(train.precision, dev)
    loss_fn = WeightedLoss(config.loss.dice_weight)
    step = {"device": dev, "precision": train.precision, "channels_last": train.channels_last,
            "grad_clip": train.grad_clip}  # fmt: skip
    per_epoch = []
    for epoch in range(train.epochs):
        dataset.set_epoch(epoch)
        model.train()
        started, loss_sum = time.perf_counter(), torch.zeros((), device=dev)
        for batch in loader:
            loss_sum += train_step(model, batch, optimizer, loss_fn, scaler, **step).loss
        per_epoch.append(len(dataset) / (time.perf_counter() - started))
        float(loss_sum)  # the epoch's steps are done
    batch = {k: v.to(dev) for k, v in batch.items()}  # the last one, now on the device
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(sizes["steps"]):
        train_step(model, batch, optimizer, loss_fn, scaler, **step)
    _synchronize(device)
    resident = sizes["steps"] * train.batch_size / (time.perf_counter() - started)
    return {"img_s": per_epoch[-1], "epochs_img_s": per_epoch, "resident_img_s": resident, "loader_workers": workers,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}  # fmt: skip


def ray_training(device: str, sizes: dict, folder: Path, deterministic: bool = False) -> dict:
    """Images/s of ``pipelines.train`` itself (Ray Train, 1 worker, DDP): its worker's ``throughput/img_per_s`` of
    the last epoch, from its MLflow run; ``deterministic``: with ``train.deterministic``."""
    _require("ray")
    from mlflow.tracking import MlflowClient

    given, name = _inputs(folder), "deterministic" if deterministic else "ray"
    tracking = given["tracking"]  # the database exists beforehand, as a user's would
    overrides = [*training_overrides(given, sizes, device), f"train.run_name={name}",
                 f"train.deterministic={str(deterministic).lower()}", f"train.storage_path={folder / 'runs'}",
                 f"tracking.tracking_uri={tracking}", f"tracking.registered_model=bench-{name}",
                 f"tracking.experiment=bench-{name}"]  # fmt: skip
    started = time.perf_counter()
    _run([sys.executable, "-m", "pipelines.train", *[a for o in overrides for a in ("--set", o)]])
    wall = time.perf_counter() - started
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name(f"bench-{name}").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "throughput/img_per_s"), key=lambda m: m.step)
    return {"img_s": history[-1].value, "epochs_img_s": [m.value for m in history], "wall_s": wall}


SECTIONS = {"model": model_only, "inputs": inputs, "end_to_end": end_to_end, "monai": monai,
            "plain": plain_training, "ray": ray_training,
            "deterministic": lambda *a: ray_training(*a, deterministic=True)}  # fmt: skip


# -- helpers ----------------------------------------------------------------------------------------------------
def _inputs(folder: Path) -> dict:
    return json.loads((folder / "inputs.json").read_text())


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    from unet.devices import cpu_model

    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def _bf16_peak(name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, when known."""
    return next((peak for part, peak in BF16_PEAK_TFLOPS.items() if part in name), None)


def _require(package: str) -> None:
    """A missing optional package: the section is skipped, with its name (found without importing it)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(f"No module named {package!r}", name=package)


def _one_line(text: str, width: int = 200) -> str:
    """The line of ``text`` that says what went wrong (the last ``...Error: ...`` line, else the last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or ["(no output)"]
    errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception", "Interrupt"))]
    line = (errors or lines)[-1]
    return line if len(line) <= width else line[: width - 3] + "..."


def _run(command: list[str]) -> str:
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: nobody reads it while the command runs
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True).returncode
        log.seek(0)
        output = log.read()
    if code != 0:
        print(output[-5000:], file=sys.stderr)
        line = _one_line(output)
        if line.startswith("ModuleNotFoundError: No module named "):  # a package the command needs is missing
            raise ModuleNotFoundError(line, name=line.split()[-1].strip("'\"").split(".")[0])
        raise RuntimeError(f"{' '.join(command[1:3])} exited {code}: {line}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sections", description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args(argv)
    answer = args.folder / f"{args.section}.json"
    try:
        result = SECTIONS[args.section](args.device, SIZES[args.quick], args.folder)
    except ModuleNotFoundError as error:
        answer.write_text(json.dumps({"error": f"skipped: {error.name or error} not installed"}))
        return 3
    except Exception as error:
        traceback.print_exc()
        answer.write_text(json.dumps({"error": f"failed: {_one_line(f'{type(error).__name__}: {error}')}"}))
        return 1
    answer.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
