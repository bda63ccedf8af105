"""Prepare a training Zarr store from images and instance labels (TIFF, PNG, NumPy, Zarr), or from slides and
their QuPath annotations.

    python -m pipelines.prepare --config configs/prepare.yaml [--set data.images=DIR] [--overwrite]
    python -m pipelines.prepare --set data.images=SLIDES --set data.annotations=GEOJSON --set data.labels=null

The examples come from ``pipelines.prepare_pairs`` (image/label pairs) or ``pipelines.prepare_regions`` (one per
annotated region, with a mask of the region outside which the weights are 0). For every example the store gets the
image, the labels, the training target (touching objects split) and the paper's weight map, all computed here once
rather than every epoch. Inputs are read and processed chunk by chunk with Dask, but training reads every example
whole, so an image of more than ``data.max_image_pixels`` is refused from its header. Everything is checked before
anything is written; the store only appears under its name once it is complete, and it may not be, hold or lie
inside an input. Label ids may be any non-negative integers: ids that do not fit int32 are stored renumbered 1..n in
order.

Every example is stored at one pixel size, the store's (and so the model's): ``data.pixel_size_um``, else the one
the images' metadata agree on. An image whose metadata states another size is resampled to it (image and labels,
before the target and weight map are computed); images of several sizes without ``data.pixel_size_um``, or an
image without metadata and no ``data.pixel_size_um``, are refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.cli import make_parser, run
from unet.config import Config, flatten_config

if TYPE_CHECKING:  # heavy modules are imported where they are used, so that --help answers at once
    import dask.array as da
    import zarr

    from pipelines.prepare_pairs import Prepared
    from pipelines.prepare_regions import RegionExample
    from unet.data.sources import Pair
    from unet.weights import WeightMapParams

log = logging.getLogger("prepare")
CHUNK, PREVIEWS = 1024, 3  # the defaults of --chunk-size and --previews, and of prepare()'s arguments


def training_pixel_size(examples: list[Prepared], configured: float | None) -> float:
    """The store's pixel size: ``data.pixel_size_um``, else the one the images' metadata state, all within
    ``unet.resample.TOLERANCE`` of each other (never a silent mix of resolutions)."""
    from unet.data.sources import DataError
    from unet.resample import TOLERANCE, same_size

    if configured is not None:
        return configured
    for ex in examples:
        if ex.stated_pixel_size is None:
            raise DataError(f"image {ex.pair.image} has no pixel size in its metadata; set data.pixel_size_um "
                            "(micrometres per pixel) to the size its pixels have")  # fmt: skip
    finest = min(examples, key=lambda ex: ex.stated_pixel_size)
    coarsest = max(examples, key=lambda ex: ex.stated_pixel_size)
    if not same_size(coarsest.stated_pixel_size, finest.stated_pixel_size):
        raise DataError(
            f"images {finest.pair.image} ({finest.stated_pixel_size:.4g} um/px) and {coarsest.pair.image} "
            f"({coarsest.stated_pixel_size:.4g} um/px) differ in pixel size by more than {TOLERANCE:.0%}; set "
            "data.pixel_size_um (micrometres per pixel) to resample them to one"
        )
    return float(np.median([ex.stated_pixel_size for ex in examples]))


def split_names(
    names: list[str], val_fraction: float, seed: int, groups: dict[str, str] | None = None
) -> dict[str, str]:
    """Assign each example to train or val: a seeded shuffle, at least one of each when possible. With ``groups``
    (name -> group, e.g. its slide) whole groups are held out, never part of one."""
    groups = groups or {name: name for name in names}
    order = sorted(set(groups.values()))
    random.Random(seed).shuffle(order)
    n_val = min(max(round(val_fraction * len(order)), 1 if val_fraction > 0 else 0), len(order) - 1)
    held_out = set(order[:n_val])
    return {name: ("val" if groups[name] in held_out else "train") for name in names}


def overlap_depth(params: WeightMapParams) -> int:
    """Pixels of context a chunk needs for its weights to equal the whole-image ones (border term + separation)."""
    from unet.weights import cutoff_radius

    return math.ceil(cutoff_radius(params.w0, params.sigma, params.tolerance)) + 2


def compact_ids(block: np.ndarray) -> np.ndarray:
    """A block's instance ids as int32, renumbered 1..n (in order) when the largest is not below the block's
    pixel count: the weight map's ``find_objects`` allocates a list as long as the largest id (2**40 would be
    terabytes), and ``separate_touching`` adds one to it. Only which pixels share an id matters to both."""
    if block.size == 0 or int(block.max()) < block.size:
        return block.astype(np.int32, copy=False)
    ids, inverse = np.unique(block, return_inverse=True)
    return (inverse.reshape(block.shape) + (ids[0] != 0)).astype(np.int32)


def weights_and_target(
    labels: da.Array, params: WeightMapParams, mask: da.Array | None = None
) -> tuple[da.Array, da.Array]:
    """Target and weight map, chunk by chunk with enough overlap to equal the whole-image result; the class
    frequencies are counted inside ``mask`` (an annotated region) where given."""
    import dask

    from unet.weights import separate_touching, target_and_weights

    target = labels.map_overlap(
        lambda block: (separate_touching(compact_ids(block)) > 0).astype(np.uint8),
        depth=1,
        boundary="none",
        dtype=np.uint8,
    )
    if mask is None:
        foreground = float(target.mean().compute())
    else:  # a region small enough to hold no pixel centre has an empty mask: no foreground rather than NaN
        inside, total = dask.compute((target * mask).sum(), mask.sum())
        foreground = float(inside) / float(total) if total else 0.0
    frequencies = {0: 1.0 - foreground, 1: foreground}
    weights = labels.map_overlap(
        lambda block: target_and_weights(compact_ids(block), params, frequencies)[1],
        depth=overlap_depth(params),
        boundary="none",
        dtype=np.float32,
    )
    return target, weights


def example_arrays(ex: Prepared | RegionExample, params: WeightMapParams) -> dict[str, da.Array]:
    """What the store holds of an example: image, labels (int32), target and weight map; for an annotated region
    also its mask, outside which the weights are 0 (the loss leaves those pixels out)."""
    target, weights = weights_and_target(ex.labels, params, ex.mask)
    arrays = {"image": ex.image, "labels": ex.labels.astype(np.int32), "target": target, "weights": weights}
    if ex.mask is not None:
        arrays |= {"weights": weights * ex.mask, "mask": ex.mask}
    return arrays


def prepare(config: Config, overwrite: bool = False, chunk: int = CHUNK, previews: int = PREVIEWS) -> str:
    """Build the training store named by ``config.data.store`` (a path or URL); return its location."""
    from unet.weights import WeightMapParams

    if config.data.annotations:  # regions of slides annotated in QuPath
        from pipelines.prepare_regions import open_annotated, region_examples

        slides = open_annotated(config)
        check_store_location(config.data.store, [], [slide.pair for slide in slides])
        pixel_size = training_pixel_size(slides, config.data.pixel_size_um)
        examples = region_examples(slides, pixel_size, config, chunk)
    else:
        from pipelines.prepare_pairs import open_examples

        examples, folders = open_examples(config, chunk)
        check_store_location(config.data.store, folders, [ex.pair for ex in examples])
        pixel_size = training_pixel_size(examples, config.data.pixel_size_um)
    check_examples(examples)
    for ex in examples:  # before the target and weight map: they are computed at the training resolution
        ex.resample_to(pixel_size, chunk, config.data.max_image_pixels)
    path = write_store(config, examples, pixel_size, WeightMapParams.from_config(config.loss), overwrite, chunk)
    write_previews(path, previews)
    return path


def check_examples(examples: list[Prepared]) -> None:
    """Refuse unusable examples (``Prepared.check``) and renumber labels whose ids do not fit int32, from what one
    Dask computation finds in all of them."""
    import dask

    checks, largest = dask.compute([ex.checks() for ex in examples], [ex.labels.max() for ex in examples])
    for ex, computed in zip(examples, checks, strict=True):
        ex.check(computed)
    for ex, top in zip(examples, largest, strict=True):
        ex.renumber_if_needed(int(top))


def write_store(
    config: Config, examples: list[Prepared], pixel_size: float, params: WeightMapParams, overwrite: bool, chunk: int
) -> str:
    """Every example's arrays and attributes into ``data.store``, committed with the store's; return its location."""
    from pipelines import zarr_store
    from unet.data.store import StoreWriter

    data = config.data
    by_slide = data.annotations and data.split_by == "slide"
    groups = {ex.name: str(ex.pair.image) for ex in examples} if by_slide else None
    splits = split_names([ex.name for ex in examples], data.val_fraction, config.train.seed, groups)
    with StoreWriter(data.store, overwrite=overwrite) as writer:
        sources, targets = [], []
        for ex in examples:
            for kind, array in example_arrays(ex, params).items():
                chunks = (ex.channels, chunk, chunk) if kind == "image" else (chunk, chunk)
                sources.append(array)
                targets.append(writer.create(ex.name, kind, array.shape, array.dtype, chunks))
            writer.set_example_attrs(ex.name, ex.attrs(splits[ex.name], pixel_size))
        log.info(
            "computing targets and weight maps (w0=%g, sigma=%g) and writing %s", params.w0, params.sigma, data.store
        )
        zarr_store.store(sources, targets)  # chunk-aligned, then read back and checked before commit
        return writer.commit(store_attrs(config, examples, writer.root, pixel_size, params))


def store_attrs(
    config: Config, examples: list[Prepared], root: zarr.Group, pixel_size: float, params: WeightMapParams
) -> dict[str, Any]:
    """The store's attributes; object areas from its stored labels (resampled where the images were), one example
    in memory at a time."""
    from unet.data.store import object_area_distribution, object_areas

    areas = [object_areas(root[ex.name]["labels"][:]) for ex in examples]
    return {
        "examples": [ex.name for ex in examples],
        "channels": examples[0].channels,
        "pixel_size_um": pixel_size,
        "object_area_um2": object_area_distribution(np.concatenate(areas) * pixel_size**2),
        "weight_map": {"w0": params.w0, "sigma": params.sigma, "class_balance": params.class_balance},
        "config": flatten_config(config),
    }


def check_store_location(store: str, folders: list[str], pairs: list[Pair]) -> None:
    """Refuse a ``data.store`` (or its previews folder) that is, holds or lies inside an input: a folder of
    ``data.images`` or ``data.labels``, or one of their files. ``--overwrite`` would replace it; a store inside an
    input folder would be read as an input next time."""
    from unet import storage
    from unet.data.sources import DataError
    from unet.storage import overlap

    inputs = [folder for folder in folders if not storage.is_url(folder) and Path(folder).is_dir()]
    inputs += [str(path) for pair in pairs for path in (pair.image, pair.labels)]
    for output in (store, f"{storage.resolve(store)}.previews"):
        clashes = [(relation, location) for location in inputs if (relation := overlap(output, location))]
        if clashes:  # the input it is, if any, rather than a folder holding it
            relation, location = min(clashes, key=lambda clash: clash[0] != "is the same location as")
            raise DataError(
                f"data.store {store} {relation} the input {location}: the training store (and its .previews "
                "folder beside it) must not be, hold or lie inside an input; choose another data.store"
            )


def write_previews(location: str, count: int) -> list[str]:
    """PNG panels (image | target | weights) of the first ``count`` examples, beside the store."""
    from unet.data.store import TrainingStore
    from unet.visualize import save_weight_map_png

    store = TrainingStore(location)
    out_dir = f"{store.location}.previews"
    written = []
    for name in store.names[:count]:
        ex = store.example(name)
        height, width = ex.labels.shape
        window = (
            slice(max(height // 2 - 256, 0), height // 2 + 256),
            slice(max(width // 2 - 256, 0), width // 2 + 256),
        )
        written.append(
            save_weight_map_png(
                f"{out_dir}/{name}.png", ex.image[(slice(None), *window)], ex.target[window], ex.weights[window]
            )
        )
    if written:
        log.info("weight-map previews (image | target | weights): %s", out_dir)
    return written


def main(config: Config, args: argparse.Namespace) -> None:
    from unet.data.store import TrainingStore

    try:
        path = prepare(config, overwrite=args.overwrite, chunk=args.chunk_size, previews=args.previews)
    except KeyboardInterrupt as exc:
        from unet import storage

        replaced = args.overwrite and storage.is_url(storage.resolve(config.data.store))  # no rename on object stores
        before = "the store it replaced was removed first" if replaced else "a store already there is unchanged"
        exc.add_note(f"{config.data.store} was not written (the partial store is removed; {before}): run the same "
                     "command again")  # fmt: skip
        raise
    store = TrainingStore(path)
    print(f"wrote {path}: {len(store.names_in('train'))} training and {len(store.names_in('val'))} validation examples")


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.prepare", __doc__.splitlines()[0], default_config="configs/prepare.yaml")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing store (only once the new one is complete)"
    )
    parser.add_argument("--chunk-size", type=int, default=CHUNK, help=f"pixels per chunk side (default {CHUNK})")
    parser.add_argument("--previews", type=int, default=PREVIEWS,
                        help=f"weight-map preview PNGs to write (default {PREVIEWS})")  # fmt: skip
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
