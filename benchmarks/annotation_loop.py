"""The annotation loop on the real slide, measured: corrections in, a fine-tuned champion out.

Real: the slide (the CMU Aperio sample, 2220 x 2967 px at 0.499 um/px, read up-sampled 2x to the model's 0.25
um/px); the champion (a U-Net of base 8 trained for 150 steps on the real H&E nuclei sample by
``benchmarks.models.briefly_trained``, version 1 of a registered model, alias ``champion``); and every job of the
loop as a user runs it, MLflow in sqlite: ``pipelines.infer``, ``pipelines.export --format qupath``,
``pipelines.prepare`` with ``data.annotations`` (``data.split_by: region``, 3 of the 8 regions held out),
``pipelines.evaluate`` (in this process) and ``pipelines.train`` with ``train.init_from`` (Ray Train, 1 worker, 20
steps an epoch of 4 patches of 128 px, lr 3e-4 without warm-up) and its fair promotion.

Made up: the pathologist. Their corrections are a fixed rule applied in code to the exported detections in 8
squares of 200 x 200 level-0 px (``Region*`` rectangles) where the detections' centroids are densest (cells of a
200-px grid, no two touching): (a) an object under 4 um2 is a fragment: deleted; (b) an object over twice the median
nucleus (the median area of the slide's detections that are not fragments) is split into nuclei: a watershed of its
distance transform from the maxima standing 3 label-image px above their surroundings, pieces under 4 um2 dropped,
the object kept whole where fewer than two are left; the pieces are written as annotations of class Nucleus, the
untouched detections as they were; (c) no missed nucleus is added. Objects crossing a region's border are corrected
whole. No ground truth stands behind the rule: the scores say how well a model reproduces these corrections on
regions it did not train on, not how well it finds nuclei.

Before: the champion on the held-out regions (``pipelines.evaluate``, inside the regions only). After: the
fine-tuned candidate on them, as its training job scored it for promotion (``promotion/candidate/*``;
``promotion/champion/*`` is the champion scored again there). Controls: the champion with the candidate's minimum
object area (inference drops objects under half the 1st-percentile area of a model's training objects, and the
corrected store has no fragments), and the same fine-tuning at lr 1e-9 (the weights kept, the BatchNorm statistics
re-estimated on the training patches as training does; not promoted). "Split nuclei matched": of the split pieces
in held-out regions, how many a model's objects match at IoU 0.5.

    python -m benchmarks.annotation_loop [--folder DIR] [--epochs 4] [--lr 3e-4] [--output docs/benchmarks.md]
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

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TITLE = "The annotation loop on the real slide: corrections in, a fine-tuned champion out"
NAME, MODEL_UM, CHAMPION_STEPS = "unet-loop", 0.25, 150
REGIONS, REGION_PX, VAL_FRACTION = 8, 200, 0.34  # 3 of 8 regions held out
FRAGMENT_UM2, SPLIT_FACTOR, H_PX = 4.0, 2.0, 3.0
SCORES = ("f1", "precision", "recall", "dice")
REGION_CLASS = {"name": "Region*", "color": [0, 0, 180]}


def job(folder: Path, module: str, *args: str | Path, sets: tuple[str, ...] = ()) -> None:
    """``python -m MODULE ARGS --set ...``, run in ``folder`` (where MLflow's artifacts land)."""
    command = [sys.executable, "-m", module, *map(str, args), *[arg for item in sets for arg in ("--set", item)]]
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "RAY_ADDRESS"}}
    done = subprocess.run(command, cwd=folder, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if done.returncode:
        tail = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{tail}")


def make_champion(folder: Path, tracking: str) -> None:
    """The briefly trained model, told its training pixel size and objects, as version 1 and ``champion``."""
    from benchmarks.models import briefly_trained, with_resolution
    from pipelines.models import load_model, log_and_register
    from pipelines.registry import connect, promote
    from unet.data.store import TrainingStore

    trained = briefly_trained(folder, base_channels=8, steps=CHAMPION_STEPS)
    areas = TrainingStore(str(folder / "he.zarr")).object_area_um2
    model = load_model(str(with_resolution(trained, folder, MODEL_UM, areas)))
    client = connect(tracking)
    experiment = client.create_experiment(NAME, artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(experiment, run_name=f"champion: {CHAMPION_STEPS} steps on the H&E sample")
    version = log_and_register(run.info.run_id, model, NAME, {}, tracking)
    client.set_terminated(run.info.run_id)
    promote(client, NAME, version, wins=True)


def choose_regions(objects: dict, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) in level-0 px of the grid cells holding most centroids, no two touching (ties: first cell)."""
    import numpy as np

    rows, cols = height // REGION_PX, width // REGION_PX
    r, c = ((np.asarray(objects[k]) // REGION_PX).astype(int) for k in ("centroid_y", "centroid_x"))
    inside = (r < rows) & (c < cols)
    counts = np.bincount(r[inside] * cols + c[inside], minlength=rows * cols)
    chosen: list[tuple[int, int]] = []
    for cell in np.argsort(-counts, kind="stable"):
        y, x = divmod(int(cell), cols)
        if all(max(abs(y - b), abs(x - a)) > 1 for b, a in chosen):
            chosen.append((y, x))
    return [(x * REGION_PX, y * REGION_PX, (x + 1) * REGION_PX, (y + 1) * REGION_PX) for y, x in chosen[:REGIONS]]


def split(labels, table: dict, row: int, to_level0: float) -> list:
    """The nuclei of object ``row`` (see the rule) as level-0 outlines; [] where it stays whole."""
    import numpy as np
    import shapely
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from unet.outlines import outline

    y0, x0, y1, x1 = (int(table[k][row]) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"))
    mask = np.asarray(labels[y0:y1, x0:x1]) == table["id"][row]
    distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    markers, count = ndi.label(h_maxima(distance, H_PX) & mask)
    pieces = watershed(-distance, markers, mask=mask) if count > 1 else markers
    kept = [pieces == i for i in range(1, count + 1) if (pieces == i).sum() >= FRAGMENT_UM2 / MODEL_UM**2]
    return [shapely.transform(outline(p, y0, x0), lambda xy: xy * to_level0) for p in kept] if len(kept) > 1 else []


def correct(output: Path, exported: Path, height: int, width: int, destination: Path) -> dict:
    """The made-up pathologist's rule in the chosen regions, written as QuPath GeoJSON to ``destination``; the
    counts, and the split pieces' regions and level-0 points."""
    import numpy as np
    import pyarrow.parquet as pq
    import shapely
    import zarr
    from shapely.geometry import box, shape

    from pipelines.infer.output import level0_scale, objects_location
    from unet.outlines import QUPATH_CLASS

    table = pq.read_table(objects_location(str(output))).to_pydict()
    to_level0, labels = level0_scale(str(output)), zarr.open_group(str(output), mode="r")["labels/nuclei/0"]
    rows, areas = {int(i): n for n, i in enumerate(table["id"])}, np.asarray(table["area_um2"])
    median = float(np.median(areas[areas >= FRAGMENT_UM2]))
    features = json.loads(exported.read_text())["features"]
    geometries = np.asarray([shape(f["geometry"]) for f in features], dtype=object)
    regions = choose_regions(table, height, width)
    counts = dict.fromkeys(("objects", "deleted", "split", "pieces", "added"), 0) | {"regions": len(regions)}
    drop, added, points = set(), [], []
    for index, region in enumerate(box(*bounds) for bounds in regions):
        meeting = np.flatnonzero(shapely.intersects(geometries, region) & ~shapely.touches(geometries, region))
        counts["objects"] += len(meeting)
        for f in meeting:
            row = rows[int(features[f]["properties"]["measurements"]["Label id"])]
            pieces = split(labels, table, row, to_level0) if areas[row] > SPLIT_FACTOR * median else []
            if areas[row] < FRAGMENT_UM2 or pieces:
                drop.add(f)
            added += [annotation(f"nucleus-{len(added) + i}", p, QUPATH_CLASS) for i, p in enumerate(pieces)]
            points += [(index, *shapely.get_coordinates(p.representative_point())[0]) for p in pieces]
            counts["deleted"] += bool(areas[row] < FRAGMENT_UM2)
            counts["split"], counts["pieces"] = counts["split"] + bool(pieces), counts["pieces"] + len(pieces)
    kept = [feature for f, feature in enumerate(features) if f not in drop]
    marked = [annotation(f"region-{i}", box(*b), REGION_CLASS) for i, b in enumerate(regions)]
    destination.write_text(json.dumps({"type": "FeatureCollection", "features": kept + added + marked}))
    return {"counts": counts, "median_um2": median, "points": points, "to_level0": to_level0}


def annotation(fid: str, geometry, classification: dict) -> dict:
    from unet.outlines import geometry_json

    properties = {"objectType": "annotation", "classification": classification}
    return {"type": "Feature", "id": fid, "geometry": geometry_json(geometry), "properties": properties}


def prepare(folder: Path, slide: Path, annotations: Path) -> Path:
    """``pipelines.prepare`` of the corrected regions at the champion's pixel size, a third of them held out."""
    store = folder / "corrections.zarr"
    sets = (f"data.images={slide}", "data.labels=null", f"data.annotations={annotations}", f"data.store={store}",
            f"data.pixel_size_um={MODEL_UM}", "data.split_by=region", f"data.val_fraction={VAL_FRACTION}")  # fmt: skip
    job(folder, "pipelines.prepare", "--config", CONFIGS / "prepare.yaml", sets=sets)
    return store


def config_for(folder: Path, tracking: str, store: Path):
    from unet.config import load_config

    overrides = [f"data.store={store}", f"tracking.tracking_uri={tracking}", f"tracking.experiment={NAME}",
                 f"tracking.registered_model={NAME}", "model.base_channels=8", f"evaluate.output={folder / 'evaluate'}",
                 f"evaluate.model=models:/{NAME}@champion"]  # fmt: skip
    return load_config(CONFIGS / "train.yaml", overrides)


def fine_tune(folder: Path, tracking: str, store: Path, epochs: int, *extra: str) -> dict:
    """``pipelines.train`` from the champion on the corrections; what its run and the registry say afterwards."""
    from pipelines.registry import connect

    sets = (f"data.store={store}", "model.base_channels=8", f"train.init_from=models:/{NAME}@champion",
            "train.num_workers=1", "data.patch_size=128", "train.batch_size=4", f"train.epochs={epochs}",
            "train.steps_per_epoch=20", "train.lr=3e-4", "train.warmup_steps=0", f"tracking.experiment={NAME}",
            f"train.storage_path={folder / 'runs'}", f"tracking.tracking_uri={tracking}",
            f"tracking.registered_model={NAME}", *extra)  # fmt: skip
    job(folder, "pipelines.train", "--config", CONFIGS / "train.yaml", sets=sets)
    client = connect(tracking)
    version = max(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    metrics = client.get_run(version.run_id).data.metrics
    sides = {side: {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"promotion/{side}/")}
             for side in ("candidate", "champion")}  # fmt: skip
    return {"version": str(version.version), "verdict": version.tags["promotion.verdict"],
            "champion_now": str(client.get_model_version_by_alias(NAME, "champion").version), **sides,
            "best_epoch": int(float(version.tags["best_epoch"])) + 1}  # fmt: skip


def score_models(config, tracking: str, fixed: dict, versions: dict[str, str]) -> dict[str, dict]:
    """Each version of ``versions`` (label -> version) scored again in this process as ``pipelines.evaluate`` scores,
    with its split pieces matched; "control" is the champion with the candidate's minimum object area."""
    from pipelines.evaluate import held_out, score
    from pipelines.models import load_model

    store, examples = held_out(config)
    models = {label: load_model(f"models:/{NAME}/{v}", tracking_uri=tracking) for label, v in versions.items()}
    minimum = {label: 0.5 * model.object_area_um2["p1"] for label, model in models.items()}
    control = config.model_copy(deep=True)
    control.infer.min_object_area_um2 = minimum["candidate"]
    rows, runs = {"minimum": minimum}, [(k, m, config) for k, m in models.items()]
    for label, model, settings in [*runs, ("control", models["champion"], control)]:
        evaluation = score(settings, model, store, examples)
        rows[label] = {**evaluation.scores, "matched": matched(store, evaluation, fixed)}
    return rows


def matched(store, evaluation, fixed: dict) -> tuple[int, int]:
    """(matched, all) split pieces in the held-out regions: a piece is matched by a predicted object of IoU >= 0.5."""
    import numpy as np

    hits, total, scale = 0, 0, fixed["to_level0"]
    for prediction in evaluation.predictions:
        attrs = store.example(prediction.example.name).attrs
        truth, objects = prediction.example.labels, prediction.objects
        y0, x0 = attrs["box"][:2]
        ids = [truth[int(y / scale) - y0, int(x / scale) - x0] for i, x, y in fixed["points"] if i == attrs["region"]]
        for true in filter(None, ids):  # 0: the piece's point is not in it (never seen)
            piece = truth == true
            found, overlap = np.unique(objects[piece], return_counts=True)
            iou = [n / np.sum(piece | (objects == i)) for i, n in zip(found, overlap, strict=True) if i]
            hits, total = hits + (max(iou, default=0) >= 0.5), total + 1
    return hits, total


def run(folder: Path, epochs: int, lr: float = 3e-4, sets: tuple[str, ...] = ()) -> dict:
    """The whole loop in ``folder``; every number of the section."""
    from pipelines.evaluate import evaluate
    from unet.samples import fetch_samples
    from unet.slides import open_slide

    slide = fetch_samples(["cmu_slide"])["cmu_slide"] / "cmu_small_region.svs"
    tracking, output = f"sqlite:///{folder / 'mlflow.db'}", folder / "slide.ome.zarr"
    with open_slide(str(slide), 0) as level0:
        height, width = level0.height, level0.width
    seconds, started = {}, time.perf_counter()

    def timed(step: str, work, *args, **kwargs):
        clock = time.perf_counter()
        done = work(*args, **kwargs)
        seconds[step] = time.perf_counter() - clock
        return done

    infer = (f"infer.input={slide}", f"infer.output={output}", f"infer.model=models:/{NAME}@champion",
             f"tracking.tracking_uri={tracking}", f"tracking.experiment={NAME}")  # fmt: skip
    timed(f"champion: {CHAMPION_STEPS} steps on the H&E sample, registered", make_champion, folder, tracking)
    timed("pipelines.infer (up-sampled 2x)", job, folder, "pipelines.infer", "--config", CONFIGS / "infer.yaml",
          sets=infer)  # fmt: skip
    timed("pipelines.export --format qupath", job, folder, "pipelines.export", str(output), "--format", "qupath")
    corrected = folder / "slide.geojson"
    fixed = timed("the made-up corrections", correct, output, folder / "slide.qupath.geojson", height, width, corrected)
    store = timed("pipelines.prepare", prepare, folder, slide, corrected)
    config = config_for(folder, tracking, store)
    before = timed("pipelines.evaluate (in this process)", evaluate, config)
    after = timed(f"pipelines.train: {epochs} x 20 steps at lr {lr:g}", fine_tune, folder, tracking, store, epochs,
                  f"train.lr={lr}", "train.run_name=loop-fine-tune", *sets)  # fmt: skip
    # the control starts from version 1 by number: the candidate may be the champion by now
    frozen = timed(f"pipelines.train at lr 1e-9 (control): {epochs} x 20 steps", fine_tune, folder, tracking, store,
                   epochs, "train.lr=1e-9", "train.run_name=loop-lr-1e-9", "tracking.promote=false",
                   f"train.init_from=models:/{NAME}/1")  # fmt: skip
    versions = {"champion": "1", "candidate": after["version"], "frozen": frozen["version"]}
    rows = timed("the 4 models scored again (split nuclei)", score_models, config, tracking, fixed, versions)
    seconds["the whole loop"] = time.perf_counter() - started
    return {**fixed, "before": before, "after": after, "frozen": frozen, "rows": rows, "seconds": seconds,
            "epochs": epochs, "lr": lr}  # fmt: skip


def to_markdown(result: dict) -> str:
    c, before, after, frozen, rows = (result[k] for k in ("counts", "before", "after", "frozen", "rows"))
    moved = "moved to the candidate" if after["champion_now"] == after["version"] else "stayed at version 1"
    lines = [f"The made-up corrections in {c['regions']} regions meeting {c['objects']} detections (median nucleus "
             f"{result['median_um2']:.1f} um2): {c['deleted']} fragments deleted, {c['split']} objects split into "
             f"{c['pieces']} nuclei, {c['added']} added, the rest left as they were. Held out: {before['images']} "
             f"regions, {before['n_true']:.0f} true objects scored in them.", "",
             "| model, on the held-out corrected regions | F1 | precision | recall | dice | objects predicted | "
             "split nuclei matched (IoU 0.5) |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    minimum, epochs = rows["minimum"], result["epochs"]
    table = [("before: champion (version 1), `pipelines.evaluate`", before, rows["champion"]),
             ("before: champion (version 1), scored in the training job", after["champion"], None),
             (f"**after: fine-tuned candidate** (version {after['version']}, best epoch {after['best_epoch']} of "
              f"{epochs}, lr {result['lr']:g}), scored in the training job", after["candidate"], rows["candidate"]),
             (f"control: champion with the candidate's minimum object area ({minimum['candidate']:.2f} um2, not "
              f"{minimum['champion']:.2f})", rows["control"], rows["control"]),
             (f"control: the same fine-tuning at lr 1e-9 (version {frozen['version']}, best epoch "
              f"{frozen['best_epoch']} of {epochs}), in its job", frozen["candidate"], rows["frozen"])]  # fmt: skip
    for label, scores, mine in table:
        hits = f"{mine['matched'][0]} of {mine['matched'][1]}" if mine else ""
        numbers = " | ".join(f"{scores[k]:.3f}" for k in SCORES)
        lines.append(f"| {label} | {numbers} | {scores['n_pred']:.0f} | {hits} |")
    steps = [f"| {step} | {seconds:.0f} |" for step, seconds in result["seconds"].items()]
    verdict = f'Promotion: the champion {moved}. The training job\'s verdict: "{after["verdict"]}".'
    change = {k: scores["f1"] - before["f1"] for k, scores in (("tuned", after["candidate"]), ("area", rows["control"]),
                                                                ("frozen", frozen["candidate"]))}  # fmt: skip
    changes = (f"Held-out F1 against the champion's: fine-tuned {change['tuned']:+.3f}; the champion with the "
               f"candidate's minimum object area alone {change['area']:+.3f}; at lr 1e-9, the weights kept (the "
               f"BatchNorm statistics and the minimum area changed) {change['frozen']:+.3f}.")  # fmt: skip
    lines += ["", verdict, changes, "", "| step | seconds |", "|---|---:|", *steps]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.annotation_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="work here and keep it (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of 20 steps (default 4)")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (default 3e-4)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another setting of the fine-tuning job (repeatable), e.g. data.augment=false",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.annotation_loop " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="annotation-loop-") as tmp:
        folder = (args.folder or Path(tmp)).resolve()
        if (folder / "mlflow.db").exists():
            parser.error(f"{folder} holds an earlier run; name a new --folder")
        folder.mkdir(parents=True, exist_ok=True)
        result = run(folder, args.epochs, args.lr, tuple(args.sets))
    table = to_markdown(result)
    print(table)
    from benchmarks.run import write_section

    doc = (__doc__ or "").split("\n\n    python -m")[0].strip()
    write_section(args.output, TITLE, doc, table, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
