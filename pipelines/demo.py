"""``make demo``: the whole product on real data, on one machine, with the embedded defaults.

1. fetch the real sample data (sha256-verified);  2. prepare the training store (weight maps);
3. train with Ray Train (local Ray, 2 CPU workers) logging to MLflow and registering a model;
4. convert the real Aperio slide to OME-Zarr;  5. segment it with Dask using ``models:/...@champion``;
6. evaluate on the held-out images;  7. show the results from the output's pyramid: a zoomed-out overview and
a zoomed-in crop with the outlines, and the first rows of the objects table;  8. export the outlines for QuPath.

A second run reuses what it can: the store, a finished training run, the converted slide and an
inference output made by the current champion.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.cli import make_parser, run
from unet.config import Config, flatten_config
from unet.errors import UserError

if TYPE_CHECKING:  # heavy modules and the other pipelines are imported where they are used: --help answers at once
    import pandas as pd

    from unet.data.store import TrainingStore

log = logging.getLogger("demo")
STEPS = 9
CROP = 512  # the cohort's crops of the slide: their side (level-0 pixels) and top-left corners
COHORT_CROPS = {"tissue-1": (1200, 1200), "tissue-2": (2000, 1200), "tissue-3": (1600, 800), "glass": (1600, 0)}


class Steps:
    """Numbered progress lines and a summary table of what each step did and how long it took."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []
        self.started = time.perf_counter()

    def begin(self, title: str) -> None:
        self.title, self.t0 = title, time.perf_counter()
        log.info("[%d/%d] %s", len(self.rows) + 1, STEPS, title)

    def done(self, result: str) -> None:
        self.rows.append((self.title, result, time.perf_counter() - self.t0))

    def table(self) -> str:
        width = max(len(title) for title, _, _ in self.rows)
        lines = [f"  {'step':<{width}}  {'seconds':>7}  result"]
        lines += [f"  {title:<{width}}  {seconds:>7.1f}  {result}" for title, result, seconds in self.rows]
        lines.append(f"  {'total':<{width}}  {time.perf_counter() - self.started:>7.1f}")
        return "\n".join(lines)


def store_is_current(path: Path, config: Config) -> bool:
    """A complete store made from the same data and weight-map settings."""
    from unet.data.store import TrainingStore

    try:
        recorded = TrainingStore(path).attrs["config"]
    except UserError:
        return False
    wanted = flatten_config(config)
    return all(recorded.get(k) == wanted[k] for k in wanted if k.split(".")[0] in {"data", "loss", "model"})


def finished_model(config: Config, store_sha: str) -> str | None:
    """The model registered by a finished training run of this config and store, if there is one."""
    from pipelines import registry
    from unet import storage

    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)
    client = registry.connect(tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    storage_path = storage.resolve(config.train.storage_path)
    for found in registry.ray_run_runs(client, experiment.experiment_id, config.train.run_name, storage_path):
        tags = found.data.tags
        if tags.get(registry.STORE_SHA_TAG) == store_sha and (uri := registry.registered_model_uri(tags)):
            return uri
    return None


def result_pictures(slide_path: str, output: str, folder: Path, size: int = 768) -> tuple[str, str]:
    """From the pyramids: the whole slide zoomed out (the slide's lowest level, outlined with the output's level of
    about its size; never level 0) and a crop from the middle at full resolution, nuclei outlined in green. The
    output may be at another resolution than the slide (the model's): its labels are mapped onto the slide's
    pixels through the output's frame (``unet.resolution``)."""
    import zarr

    from pipelines.infer.output import labels_level, level0_scale
    from pipelines.infer.qc import on_picture, overview
    from unet.io import write_png
    from unet.slides import open_slide
    from unet.visualize import outline

    root = zarr.open_group(output, mode="r")
    to_level0 = level0_scale(output)
    slide = open_slide(slide_path)
    view = overview(slide_path, open_slide(output).levels, to_level0, max_side=None)
    if view is None:
        raise UserError(f"{slide_path}: its lowest level is too large for an overview; convert it with a pyramid")
    overview_labels = on_picture(root[labels_level(view.level)], view.side, view.window)
    rgb = np.moveaxis(view.pixels, 0, -1)
    pictures = [write_png(folder / "slide_overview.png", outline(np.ascontiguousarray(rgb), overview_labels))]
    y0, x0 = max(slide.height // 2 - size // 2, 0), max(slide.width // 2 - size // 2, 0)
    y1, x1 = min(y0 + size, slide.height), min(x0 + size, slide.width)
    rgb = np.moveaxis(slide.read(y0, y1, x0, x1), 0, -1)
    crop_labels = on_picture(root[labels_level(0)], to_level0, (y0, y1, x0, x1))
    pictures.append(write_png(folder / "slide_overlay.png", outline(np.ascontiguousarray(rgb), crop_labels)))
    return pictures[0], pictures[1]


def nuclei(stats: dict, store: TrainingStore) -> str:
    """The slide's objects beside the training nuclei: how many, and their median area."""
    median = stats.get("object_area_um2_median")
    area = f", median {median:.1f} um2" if median is not None else ""
    training = store.object_area_um2
    return f"{stats['objects']} nuclei{area} (training nuclei: median {training['p50']:.1f} um2)"


def main(config: Config, args: argparse.Namespace) -> None:
    from pipelines import registry

    steps = Steps()
    samples = fetch_step(steps)
    store = prepare_step(steps, config)
    train_or_reuse_step(steps, config, store)
    slide_zarr = convert_step(steps, config, samples)
    tracking_uri = registry.resolve_tracking_uri(config.tracking.tracking_uri)  # the training step's lookup used it
    output, champion = segment_step(steps, config, store, tracking_uri)
    evaluate_step(steps, config)
    folder, table = show_step(steps, config, slide_zarr, output)
    export_step(steps, output, folder)
    page = cohort_step(steps, config, slide_zarr, output, folder)
    report(steps, config, output, table, tracking_uri, champion, page)


def fetch_step(steps: Steps) -> dict[str, Path]:
    from unet.samples import fetch_samples

    steps.begin("fetch real sample data")
    samples = fetch_samples(["he_nuclei", "cmu_slide"])
    steps.done(f"H&E nuclei + Aperio slide in {samples['he_nuclei'].parent}")
    return samples


def prepare_step(steps: Steps, config: Config) -> TrainingStore:
    from pipelines.prepare import prepare
    from unet.data.store import TrainingStore

    steps.begin("prepare the training store")
    store_path = Path(config.data.store)
    if not store_is_current(store_path, config):
        prepare(config, overwrite=True)
    store = TrainingStore(store_path)
    steps.done(f"{store.location}: {len(store.names_in('train'))} train / {len(store.names_in('val'))} val images, "
               f"{store.pixel_size_um:g} um/px (configs/demo.yaml: the crops' pixel size, see the README)")  # fmt: skip
    return store


def train_or_reuse_step(steps: Steps, config: Config, store: TrainingStore) -> None:
    from pipelines.train.job import train
    from unet import storage

    steps.begin("train with Ray Train (2 workers)")
    model_uri = finished_model(config, storage.sha256(store.location))
    if model_uri is None:
        trained = train(config)
        steps.done(f"{trained['model_uri']}, {trained['epochs']} epochs")
    else:
        steps.done(f"{model_uri} (finished earlier; reused)")


def convert_step(steps: Steps, config: Config, samples: dict[str, Path]) -> Path:
    from pipelines.convert import convert
    from unet.slides import open_slide

    steps.begin("convert the slide to OME-Zarr")
    slide_zarr = Path(config.infer.input)
    if not (slide_zarr / "zarr.json").is_file():
        convert(samples["cmu_slide"] / "cmu_small_region.svs", slide_zarr, overwrite=slide_zarr.exists())
    steps.done(f"{slide_zarr} ({open_slide(slide_zarr).levels} levels)")
    return slide_zarr


def segment_step(steps: Steps, config: Config, store: TrainingStore, tracking_uri: str) -> tuple[Path, str]:
    """Segment the slide with the champion, unless its output by that model is complete; return the output and the
    champion's URI."""
    import zarr

    from pipelines import registry
    from pipelines.infer.job import infer
    from pipelines.infer.output import LINEAGE_KEY, OUTPUT_LAYOUT, recorded_resolution

    steps.begin("segment the slide with Dask")
    champion, _ = registry.resolve_model(config.infer.model, tracking_uri)
    output = Path(config.infer.output)
    lineage = zarr.open_group(output, mode="r").attrs.get(LINEAGE_KEY, {}) if output.exists() else {}
    current = lineage.get("layout") == OUTPUT_LAYOUT  # an output of an earlier version is made again
    if lineage.get("complete") and lineage.get("model_uri") == champion and current:
        steps.done(f"{output} by {champion} (reused): {nuclei(lineage['stats'], store)}")
    else:
        stats = infer(config.model_copy(update={"infer": config.infer.model_copy(update={"overwrite": True})}))
        steps.done(f"{output}: {nuclei(stats, store)}, {stats['mpx_per_s']:.2f} Mpx/s")
        lineage = zarr.open_group(output, mode="r").attrs[LINEAGE_KEY]
    if (resolution := recorded_resolution(lineage)) is not None:
        log.info("segmented at %s", resolution.describe())
    return output, champion


def evaluate_step(steps: Steps, config: Config) -> None:
    from pipelines import evaluate

    steps.begin("evaluate on held-out images")
    scores = evaluate.evaluate(config)
    steps.done(
        f"F1@{config.evaluate.iou_threshold:g} {scores['f1']:.3f}, Dice {scores['dice']:.3f}, IoU {scores['iou']:.3f}, "
        f"merged {scores['merged']:.0f}, split {scores['split']:.0f} ({scores['images']} images)"
    )


def show_step(steps: Steps, config: Config, slide_zarr: Path, output: Path) -> tuple[Path, pd.DataFrame]:
    """The pictures of the output and its objects table; return the pictures' folder and the table."""
    import pandas as pd

    from pipelines.infer.output import OBJECTS

    steps.begin("show the results: pyramid pictures, objects table")
    folder = Path(config.evaluate.output).parent
    overview, crop = result_pictures(str(slide_zarr), str(output), folder)
    table = pd.read_parquet(output / OBJECTS)
    steps.done(f"{overview} (zoomed out), {crop} (full resolution), {output / OBJECTS} ({len(table)} rows)")
    return folder, table


def export_step(steps: Steps, output: Path, folder: Path) -> None:
    from pipelines.export import export
    from unet.io import stem

    steps.begin("export the outlines for QuPath")
    geojson = folder / f"{stem(output)}.qupath.geojson"
    exported, count = export(output, "qupath", destination=geojson, overwrite=True)
    steps.done(f"{exported}: {count} nuclei (QuPath: File > Import objects from file)")


def cohort_step(steps: Steps, config: Config, slide_zarr: Path, output: Path, folder: Path) -> str:
    """Segment a small cohort, the slide and crops of it (tissue, and glass only), listed in a manifest; outputs
    complete from an earlier run are skipped, the slide's own among them: its output from the segment step (the same
    model and settings) is copied in. Returns its report's location."""
    import shutil

    from pipelines.infer.cohort import output_for
    from pipelines.infer.job import infer
    from unet.io import write_tiff
    from unet.slides import open_slide

    steps.begin("segment a small cohort: the slide and crops of it, and its report")
    slides = slide_zarr.parent / "cohort"
    manifest = slides / "cohort.csv"
    if not manifest.is_file():
        slides.mkdir(parents=True, exist_ok=True)
        with open_slide(slide_zarr) as slide:
            for name, (y, x) in COHORT_CROPS.items():
                write_tiff(slides / f"{name}.tif", slide.read(y, y + CROP, x, x + CROP), slide.pixel_size_um)
        rows = [f"../{slide_zarr.name}", *(f"{name}.tif" for name in COHORT_CROPS)]
        manifest.write_text("input\n" + "".join(f"{row}\n" for row in rows))
    own = Path(output_for(str(slide_zarr), str(folder / "cohort")))  # where the batch writes the slide's
    if not own.exists():  # not segmented twice: the batch finds it complete, by this model and config, and skips it
        shutil.copytree(output, own)
    update = {"input": str(manifest), "output": str(folder / "cohort")}
    result = infer(config.model_copy(update={"infer": config.infer.model_copy(update=update)}))
    steps.done(f"{result['report']}: {len(COHORT_CROPS) + 1} slides (the whole slide's output is the segment "
               f"step's), {result['flagged']} flagged (open it in a browser; every slide is up-sampled 2x to the demo "
               "model's 0.25 um/px)")  # fmt: skip
    return result["report"]


def report(steps: Steps, config: Config, output: Path, table: pd.DataFrame, tracking_uri: str, champion: str,
           page: str) -> None:  # fmt: skip
    """The summary: what each step did, the first rows of the objects table, and where to look further."""
    from pipelines.infer.output import OBJECTS

    print("\nSummary (real data; the model is small and briefly trained, see configs/demo.yaml)\n")
    print(steps.table())
    print(f"\n  objects     {output / OBJECTS} (first rows; pixels and micrometres)\n")
    print(table.head(5).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\n  MLflow UI   mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    print(f"  napari      napari --plugin napari-ome-zarr {output}")
    print(f"  cohort      {page} (each slide's receipt, flags and QC picture)")
    print(f"  champion    {champion}  (load: pipelines.models.load_model('{config.infer.model}'))")


def cli(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m pipelines.demo", __doc__.splitlines()[0], default_config="configs/demo.yaml")
    return run(main, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
