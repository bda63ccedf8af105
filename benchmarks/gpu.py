"""The GPU path, measured: inference (model only, Zarr to Zarr end to end, MONAI's sliding window on the same
device and model) and training (Ray Train, 1 worker, against a plain PyTorch loop), in one command.

    python -m benchmarks.gpu [--device cuda|cpu] [--quick] [--output docs/benchmarks.md]

Self-contained: it makes its own synthetic slide (dark round "nuclei" on a pink background, 24576 x 24576)
and training store (the same drawing with its instance labels), and an untrained U-Net (base width 64,
depth 4; speed does not depend on the weights). bf16 autocast, channels_last. Model only: one pass over a
default chunk with its halo, timed with the device synchronised, as output megapixels per second and as a
fraction of the GPU's dense bf16 peak (FLOPs counted by ``torch.utils.flop_counter``). End to end:
``python -m pipelines.infer`` with ``infer.device`` set and nothing else tuned, its segmentation throughput
(reading, predicting, writing probabilities and labels) and its wall time from start to exit. MONAI:
``sliding_window_inference`` (roi 512, overlap 0.25, Gaussian, 16 windows per batch on a GPU) with the slide
in host memory. Training: the same patches, augmentation and DataLoader as ``pipelines.train``, images per
second after warm-up; "busy" is the fraction of the wall time spent inside training steps (the rest is
waiting for data); Ray Train again with ``train.deterministic`` (what reproducible GPU training costs).
``--device cpu --quick`` is a small smoke test of the same code (``make test`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TITLE = "GPU: inference and training on one device"
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (without sparsity), by a part of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0}  # fmt: skip
SIZES = {  # full run (under 8 minutes on one H100) and the CPU smoke test
    False: {"base": 64, "slide": 24576, "patch": 256, "batch": 16, "steps": 60, "warmup": 10},
    True: {"base": 8, "slide": 1024, "patch": 64, "batch": 2, "steps": 3, "warmup": 1},
}


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


def synthetic_slide(path: Path, side: int, tile: int = 2048) -> Path:
    """A (3, side, side) Zarr slide of synthetic tissue, written tile by tile (flipped copies of a few tiles)."""
    import zarr

    tiles = [nuclei_image(min(tile, side), seed)[0] for seed in range(4)]
    array = zarr.create_array(path, shape=(3, side, side), chunks=(3, 512, 512), dtype="uint8")
    for n, y0 in enumerate(range(0, side, tile)):
        for m, x0 in enumerate(range(0, side, tile)):
            block = tiles[(n + m) % 4][:, :: 1 if n % 2 else -1, :: 1 if m % 2 else -1]
            array[:, y0 : y0 + tile, x0 : x0 + tile] = block[:, : side - y0, : side - x0]
    return path


def model_only(base: int, device: str, chunk: int, repeats: int = 20) -> dict:
    """Output Mpx/s of one forward pass over a chunk and its halo, and the fraction of the bf16 peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unet.fused import inference_model
    from unet.model import UNet, autocast_context
    from unet.tiling import Region, input_region

    torch.manual_seed(0)
    plain = UNet(3, 2, base_channels=base).eval().to(device)
    model = inference_model(plain)
    side = input_region(Region(0, chunk, 0, chunk), model.halo, model.size_multiple).height
    x = torch.rand(1, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(torch.device(device).type, "bf16"):
        with FlopCounterMode(display=False) as counter:  # the plain model: the counter knows its operators
            plain(x)
        for _ in range(3):  # warm-up (and cuDNN's choice of kernels)
            model(x)
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
        _synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    tflops = counter.get_total_flops() / seconds / 1e12
    peak = _bf16_peak(device)
    return {"output_mpx_s": chunk * chunk / seconds / 1e6, "input_mpx_s": side * side / seconds / 1e6,
            "tflops": tflops, "peak_fraction": tflops / peak if peak else None, "pass": f"{side} x {side}"}  # fmt: skip


def end_to_end(slide: Path, model_dir: Path, device: str, folder: Path) -> dict:
    """``pipelines.infer`` on ``slide`` (Zarr in, OME-Zarr out) as a user runs it: its report and its wall time."""
    import zarr

    from pipelines.infer.output import LINEAGE_KEY

    output = folder / "out.ome.zarr"
    command = [sys.executable, "-m", "pipelines.infer", "--config", str(ROOT / "configs" / "infer.yaml")]
    for item in (f"infer.input={slide}", f"infer.output={output}", f"infer.model={model_dir}",
                 f"infer.device={device}", f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}"):  # fmt: skip
        command += ["--set", item]
    started = time.perf_counter()
    _run(command)
    wall = time.perf_counter() - started
    stats = zarr.open_group(output, mode="r").attrs[LINEAGE_KEY]["stats"]
    return {"mpx": stats["megapixels"], "segment_mpx_s": stats["mpx_per_s"], "wall_mpx_s": stats["megapixels"] / wall,
            "startup_s": stats["startup_seconds"], "wall_s": wall}  # fmt: skip


def monai(slide: Path, model_dir: Path, device: str) -> dict:
    """MONAI's sliding window over the slide in memory, in its own process (see benchmarks.inference)."""
    command = [sys.executable, "-m", "benchmarks.inference", "monai", str(slide), str(model_dir), "--device", device]
    started = time.perf_counter()
    result = json.loads(_run(command).strip().splitlines()[-1])
    return {"compute_mpx_s": result["mpx"] / result["compute_seconds"],
            "wall_mpx_s": result["mpx"] / (time.perf_counter() - started)}  # fmt: skip


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


def plain_training(store: str, sizes: dict, device: str) -> dict:
    """Images/s of a plain PyTorch loop over the training pipeline's patches, and how busy the device was."""
    import torch

    from unet.config import load_config
    from unet.data.augment import build_augmentation
    from unet.data.dataset import PatchDataset
    from unet.loss import WeightedLoss
    from unet.training import build_model, build_optimizer, make_grad_scaler, train_step

    config = load_config(None, [f"model.base_channels={sizes['base']}", f"data.patch_size={sizes['patch']}"])
    dev = torch.device(device)
    steps, batch = sizes["warmup"] + sizes["steps"], sizes["batch"]
    dataset = PatchDataset(store, "train", patch_size=sizes["patch"], length=steps * batch,
                           augmentation=build_augmentation(config.data), seed=0)  # fmt: skip
    workers = 4 if dev.type == "cuda" else 0  # as pipelines.train chooses
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=dev.type == "cuda")
    torch.manual_seed(0)
    model = build_model(config.model).to(dev, memory_format=torch.channels_last)
    optimizer, scaler, loss_fn = build_optimizer(model, config.train), make_grad_scaler("bf16", dev), WeightedLoss()
    busy, started = 0.0, None
    for index, data in enumerate(loader):
        if index == sizes["warmup"]:
            _synchronize(device)
            started, busy = time.perf_counter(), 0.0
        step_start = time.perf_counter()
        result = train_step(model, data, optimizer, loss_fn, scaler, device=dev, precision="bf16",
                            channels_last=True, grad_clip=1.0)  # fmt: skip
        float(result.loss)  # waits for the device: the step is done
        busy += time.perf_counter() - step_start
    wall = time.perf_counter() - started
    return {"img_s": sizes["steps"] * batch / wall, "busy": busy / wall}


def ray_training(store: str, sizes: dict, device: str, folder: Path, deterministic: bool = False) -> dict:
    """Images/s of ``pipelines.train`` itself (Ray Train, 1 worker, DDP), from its MLflow run; ``deterministic``:
    with ``train.deterministic``."""
    from mlflow.tracking import MlflowClient

    name = "deterministic" if deterministic else "bench"
    tracking = f"sqlite:///{folder / f'{name}-mlflow.db'}"
    overrides = [f"data.store={store}", f"model.base_channels={sizes['base']}", f"data.patch_size={sizes['patch']}",
                 f"train.batch_size={sizes['batch']}", f"train.steps_per_epoch={sizes['steps']}", "train.epochs=2",
                 "train.num_workers=1", f"train.use_gpu={str(device == 'cuda').lower()}", "train.precision=bf16",
                 f"train.cpus_per_worker={os.cpu_count() if device == 'cpu' else 4}", f"train.run_name={name}",
                 f"train.deterministic={str(deterministic).lower()}",
                 f"train.storage_path={folder / 'runs'}", f"tracking.tracking_uri={tracking}",
                 "tracking.registered_model=bench", "tracking.experiment=bench"]  # fmt: skip
    _run([sys.executable, "-m", "pipelines.train", *[a for o in overrides for a in ("--set", o)]])
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    history = client.get_metric_history(run.info.run_id, "throughput/img_per_s")
    return {"img_s": max(history, key=lambda m: m.step).value}  # the second epoch: past the warm-up


def run(device: str = "cuda", quick: bool = False) -> dict:
    from unet.config import InferConfig
    from unet.model import UNet
    from unet.model_files import save_weights

    sizes = SIZES[quick]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        import torch

        torch.manual_seed(0)
        model_dir = save_weights(UNet(3, 2, base_channels=sizes["base"]).eval(), folder / "unet")
        slide = synthetic_slide(folder / "slide.zarr", sizes["slide"])
        chunk = InferConfig(device=device).chunk
        result = {"device": _device_name(device), "base": sizes["base"], "slide": sizes["slide"], "chunk": chunk}
        result["model"] = model_only(sizes["base"], device, chunk)
        result["ours"] = end_to_end(slide, model_dir, device, folder)
        result["monai"] = monai(slide, model_dir, device)
        store = synthetic_store(folder / "train", sizes)
        result["plain"] = plain_training(store, sizes, device)
        result["ray"] = ray_training(store, sizes, device, folder)
        result["deterministic"] = ray_training(store, sizes, device, folder, deterministic=True)
    return {"title": TITLE, **result}


def to_markdown(r: dict) -> str:
    m, ours, mon, plain, ray, same = r["model"], r["ours"], r["monai"], r["plain"], r["ray"], r["deterministic"]
    peak = f"{m['peak_fraction'] * 100:.0f}% of the bf16 peak" if m["peak_fraction"] else "peak unknown for this device"
    rows = [
        ("device", r["device"], f"UNet base {r['base']}, bf16, channels_last, chunk {r['chunk']}"),
        ("model only", f"{m['output_mpx_s']:.1f} Mpx/s", f"one {m['pass']} pass; {m['tflops']:.1f} TFLOP/s, {peak}"),
        ("end to end, Zarr to Zarr", f"{ours['segment_mpx_s']:.1f} Mpx/s",
         f"{ours['mpx']:.0f} Mpx slide; {ours['wall_mpx_s']:.1f} Mpx/s counting the process's "
         f"{ours['wall_s']:.1f} s from start to exit (start-up {ours['startup_s']:.1f} s)"),
        ("MONAI sliding window", f"{mon['compute_mpx_s']:.1f} Mpx/s",
         f"slide in memory; ours is {ours['segment_mpx_s'] / mon['compute_mpx_s']:.2f}x; "
         f"process start to exit {mon['wall_mpx_s']:.1f} Mpx/s (ours {ours['wall_mpx_s'] / mon['wall_mpx_s']:.2f}x)"),
        ("training, plain PyTorch", f"{plain['img_s']:.1f} img/s", f"busy {plain['busy'] * 100:.0f}% of the time"),
        ("training, Ray Train 1 worker", f"{ray['img_s']:.1f} img/s", f"{ray['img_s'] / plain['img_s']:.2f}x plain"),
        ("training, Ray Train 1 worker, `train.deterministic`", f"{same['img_s']:.1f} img/s",
         f"{same['img_s'] / ray['img_s']:.2f}x without it"),
    ]  # fmt: skip
    lines = ["| measurement | value | notes |", "|---|---:|---|"]
    return "\n".join([*lines, *(f"| {a} | {b} | {c} |" for a, b, c in rows)])


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    from unet.devices import cpu_model

    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def _bf16_peak(device: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, when known."""
    if not device.startswith("cuda"):
        return None
    name = _device_name(device)
    return next((peak for part, peak in BF16_PEAK_TFLOPS.items() if part in name), None)


def _run(command: list[str]) -> str:
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: nobody reads it while the command runs
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True).returncode
        log.seek(0)
        output = log.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    return output


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import write_section

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the same code")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        from unet.devices import check_device

        check_device("--device", "cuda", "bf16")
    started = time.perf_counter()
    result = run(args.device, args.quick)
    table = to_markdown(result)
    print(table)
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    write_section(args.output, result["title"], (__doc__ or "").strip(), table, command.strip())
    print(f"wrote {args.output} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
