"""``make demo``: run the U-Net on real sample data, end to end on one machine.

So far it fetches the real H&E sample images (verified sha256), prepares the training Zarr store
with the paper's weight maps (and preview pictures of them), builds the configured U-Net and runs
it the way tiled inference will (eval, channels_last, autocast) on every image. The weights are
untrained until the training pipeline lands, so the probabilities are not a segmentation yet.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.cli import make_parser, run
from pipelines.prepare import prepare
from unet.config import Config, flatten_config, save_config
from unet.data.store import TrainingStore
from unet.errors import UserError
from unet.io import normalize_intensity, read_image, to_channels_first, write_png
from unet.model import UNet, autocast_context, prepare_for_inference
from unet.samples import fetch_samples, sample_pairs

log = logging.getLogger("demo")


def _store_is_current(path: Path, config: Config) -> bool:
    """True when ``path`` is a complete store made from the same data and weight-map settings."""
    try:
        recorded = TrainingStore(path).attrs["config"]
    except UserError:
        return False
    wanted = flatten_config(config)
    return all(recorded.get(key) == wanted[key] for key in wanted if key.split(".")[0] in {"data", "loss", "model"})


def side_by_side(image: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """An RGB uint8 panel: the image on the left, the foreground probability on the right."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    heat = (np.clip(probability, 0, 1) * 255).astype(np.uint8)
    return np.concatenate([rgb.astype(np.uint8), np.repeat(heat[..., None], 3, axis=-1)], axis=1)


def main(config: Config, args: argparse.Namespace) -> None:
    out_dir = Path(config.infer.output or "outputs/demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")

    log.info("1/4 fetching real sample data (H&E nuclei, sha256-verified)")
    he_dir = fetch_samples(["he_nuclei"])["he_nuclei"]
    pairs = sample_pairs(he_dir)

    store_path = Path(config.data.store)
    if _store_is_current(store_path, config):
        log.info("2/4 training store %s is up to date; reusing it", store_path)
    else:
        log.info("2/4 preparing the training store %s (targets + weight maps)", store_path)
        prepare(config, overwrite=True)
    store = TrainingStore(store_path)

    torch.manual_seed(config.train.seed)
    model = UNet(**config.model.model_dump(exclude={"checkpointing"}))
    log.info(
        "3/4 model: %s parameters, size multiple %d, halo %d px (receptive-field reach %d px)",
        f"{model.num_parameters():,}",
        model.size_multiple,
        model.halo,
        model.receptive_field_reach,
    )
    forward = prepare_for_inference(model, channels_last=config.infer.channels_last)

    log.info(
        "4/4 running the model on %d images (%s, channels_last=%s)",
        len(pairs),
        config.infer.precision,
        config.infer.channels_last,
    )
    pixels, started = 0, time.perf_counter()
    for image_path, _ in pairs:
        image = read_image(image_path)
        x = torch.from_numpy(normalize_intensity(to_channels_first(image, model.n_channels, str(image_path))))
        with autocast_context("cpu", config.infer.precision):
            logits = forward(x[None])
        probability = torch.softmax(logits.float(), dim=1)[0, -1].numpy()
        write_png(out_dir / f"{image_path.stem}_forward.png", side_by_side(image, probability))
        pixels += probability.size
    seconds = time.perf_counter() - started

    print()
    print(f"  sample data     {he_dir}")
    print(f"  images          {len(pairs)} real H&E crops")
    print(f"  training store  {store.path} ({len(store.names_in('train'))} train / {len(store.names_in('val'))} val)")
    print(f"  weight maps     {store.path.parent / (store.path.name + '.previews')}/*.png (image | target | weights)")
    print(f"  throughput      {pixels / seconds / 1e6:.2f} Mpx/s ({seconds:.1f} s)")
    print(f"  outputs         {out_dir}/*_forward.png (image | foreground probability)")
    print(f"  resolved config {out_dir / 'config.yaml'}")
    print("  note            weights are untrained: the probability map shows the path runs, not a segmentation")


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.demo", __doc__.splitlines()[0], default_config="configs/demo.yaml")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
