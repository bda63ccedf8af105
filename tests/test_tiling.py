"""Overlap-tile inference equals whole-image inference; chunk-wise labels equal global labels."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from unet.fused import inference_model
from unet.inference import ChunkPredictor, InferenceSettings, InputDataError, pass_memory_mb, predict_image
from unet.instances import ChunkEdges, merge_chunks
from unet.model import UNet, autocast_context
from unet.segmentation import ObjectRule, label_image
from unet.tiling import Region, grid, padded_reference_shape, read_mirrored, reflect_indices, tiles_of


@pytest.mark.parametrize("size", [1, 2, 5, 16])
@pytest.mark.parametrize(("start", "stop"), [(-40, 60), (-3, 7), (0, 5), (10, 30)])
def test_reflect_indices_match_numpy_pad(size: int, start: int, stop: int) -> None:
    data = np.arange(size)
    padded = np.pad(data, (max(-start, 0), max(stop - size, 0)), mode="reflect")
    expected = padded[start + max(-start, 0) : stop + max(-start, 0)]
    np.testing.assert_array_equal(data[reflect_indices(start, stop, size)], expected)


def test_read_mirrored_reads_only_the_needed_window() -> None:
    image = np.random.default_rng(0).random((2, 30, 20))
    seen = []

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        seen.append((y0, y1, x0, x1))
        return image[:, y0:y1, x0:x1]

    window = read_mirrored(read, 30, 20, Region(-5, 10, 15, 27))
    expected = np.pad(image, ((0, 0), (5, 0), (0, 7)), mode="reflect")[:, 0:15, 15:27]
    np.testing.assert_array_equal(window, expected)
    assert seen == [(0, 10, 12, 20)]  # columns 20..26 mirror to 18..12


def test_grid_and_tiles_cover_the_slide_exactly() -> None:
    covered = np.zeros((70, 45), int)
    for _, chunk in grid(70, 45, 32):
        for tile in tiles_of(chunk, 16, 70, 45):
            covered[tile.slices] += 1
    assert (covered == 1).all()


def whole_image_probability(model: UNet, image: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """Reference: the whole mirror-padded slide through the model (as inference runs it) at once, centre kept."""
    (top, bottom), (left, right) = padded_reference_shape(*image.shape[1:], model.halo, model.size_multiple)
    padded = np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="reflect")
    with torch.inference_mode(), autocast_context("cpu", precision):
        logits = inference_model(model, channels_last=False)(torch.from_numpy(padded)[None].float())
    probability = logits.float().softmax(1)[0, 1:].sum(0).numpy()
    return probability[top : top + image.shape[1], left : left + image.shape[2]]


def tiled_probability(model: UNet, image: np.ndarray, chunk: int, settings: InferenceSettings) -> np.ndarray:
    with ChunkPredictor(model, settings) as predictor:
        return predict_image(predictor, image, None, chunk)


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)
    net = UNet(3, 2, base_channels=8).eval()
    for module in net.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize(
    ("height", "width", "tile", "chunk"),
    [(100, 77, 64, 64), (300, 200, 64, 128), (33, 250, 32, 96), (200, 200, 64, 192), (17, 9, 16, 16),
     (300, 213, None, 128), (141, 250, None, 1024), (250, 141, 48, 144), (211, 190, None, 100),
     (211, 190, 32, 70)],
)  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiled_inference_equals_whole_image_inference(model, height, width, tile, chunk, channels_last) -> None:
    image = np.random.default_rng(height * width).random((3, height, width)).astype(np.float32)
    settings = InferenceSettings(tile=tile, batch_size=3, precision="fp32", channels_last=channels_last)
    tiled = tiled_probability(model, image, chunk, settings)
    np.testing.assert_allclose(tiled, whole_image_probability(model, image), rtol=0, atol=2e-5)


@pytest.mark.parametrize(("height", "width", "chunk"), [(300, 213, 128), (141, 250, 1024), (517, 389, 250)])
def test_whole_chunk_passes_equal_whole_image_inference_in_bf16(model, height, width, chunk) -> None:
    """The defaults: one bf16 pass per chunk (sizes not multiples of 16). bf16 keeps 8 bits of mantissa, so passes
    of different shapes may round differently; the probabilities agree to bf16 precision and almost every
    thresholded pixel is the same."""
    image = np.random.default_rng(height + width).random((3, height, width)).astype(np.float32)
    tiled = tiled_probability(model, image, chunk, InferenceSettings(precision="bf16"))
    whole = whole_image_probability(model, image, "bf16")
    assert np.abs(tiled - whole).max() < 0.02
    assert ((tiled > 0.5) != (whole > 0.5)).mean() < 1e-3


def test_a_pass_over_the_memory_budget_falls_back_to_tiles_once(model, caplog) -> None:
    image = np.random.default_rng(5).random((3, 300, 270)).astype(np.float32)
    whole_pass = pass_memory_mb(model, 256 + 2 * model.halo, 256 + 2 * model.halo, 1, "fp32")
    settings = InferenceSettings(precision="fp32", channels_last=False, pass_memory_mb=int(whole_pass) - 1)
    predictor = ChunkPredictor(model, settings)
    assert predictor.tile_for(Region(0, 256, 0, 256)) == 128
    with caplog.at_level(logging.INFO, logger="unet.inference"):
        tiled = tiled_probability(model, image, 256, settings)
    assert [r.message for r in caplog.records if "tiles of" in r.message] == [
        f"one pass over 256 px would need more than infer.pass_memory_mb={int(whole_pass) - 1}: "
        "predicting chunks in tiles of 128 px from now on"
    ]
    np.testing.assert_allclose(tiled, whole_image_probability(model, image), rtol=0, atol=2e-5)


def test_the_pass_budget_follows_the_device_unless_set(model) -> None:
    """``infer.pass_memory_mb: null``: the measured CPU budget on a CPU (on CUDA, a share of the GPU's free memory:
    ``benchmarks.gpu`` records the budget it got); a number is used as given, 0 is no limit."""
    from unet.devices import CPU_PASS_MEMORY_MB, pass_budget_mb

    assert InferenceSettings().pass_memory_mb is None and pass_budget_mb("cpu") == CPU_PASS_MEMORY_MB
    assert ChunkPredictor(model, InferenceSettings()).pass_limit_mb == CPU_PASS_MEMORY_MB
    assert ChunkPredictor(model, InferenceSettings(pass_memory_mb=0)).tile_for(Region(0, 4096, 0, 4096)) == 4096
    small = ChunkPredictor(model, InferenceSettings(pass_memory_mb=1))
    assert small.pass_limit_mb == 1 and small.tile_for(Region(0, 256, 0, 256)) < 256


def test_threads_sharing_a_predictor_get_what_one_thread_gets(model) -> None:
    """A Dask worker runs several chunks at once on one predictor: passes take turns on its model thread."""
    image = np.random.default_rng(7).random((3, 190, 260)).astype(np.float32)
    settings = InferenceSettings(precision="fp32", channels_last=False)
    sequential = tiled_probability(model, image, 64, settings)
    predictor = ChunkPredictor(model, settings)
    regions = [region for _, region in grid(190, 260, 64)]

    def predict(region: Region) -> np.ndarray:
        return predictor.predict_chunk(lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1], 190, 260, region)

    with ThreadPoolExecutor(4) as pool:
        for region, chunk in zip(regions, pool.map(predict, regions), strict=True):
            np.testing.assert_array_equal(chunk, sequential[region.slices])


def test_tta_averages_the_mirrored_predictions(model) -> None:
    batch = np.random.default_rng(1).random((2, 3, 64, 64)).astype(np.float32)
    plain = ChunkPredictor(model, InferenceSettings(tile=32, precision="fp32", channels_last=False))
    tta = ChunkPredictor(model, InferenceSettings(tile=32, precision="fp32", channels_last=False, tta=True))
    expected = np.mean(
        [np.flip(plain.probabilities(np.flip(batch, axes).copy()), tuple(a - 1 for a in axes)) for axes in
         [(), (3,), (2,), (2, 3)]], axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(tta.probabilities(batch), expected, atol=1e-5)


def test_gaussian_blending_stays_close_to_exact_tiles(model) -> None:
    image = np.random.default_rng(2).random((3, 150, 130)).astype(np.float32)
    exact = whole_image_probability(model, image)
    settings = InferenceSettings(tile=64, precision="fp32", channels_last=False, blend="gaussian")
    blended = tiled_probability(model, image, 64, settings)
    assert blended.shape == exact.shape and np.abs(blended - exact).mean() < 0.02


def test_nan_pixels_are_reported_with_their_place(model) -> None:
    image = np.zeros((3, 64, 64), np.float32)
    image[1, 40, 10] = np.nan
    with pytest.raises(InputDataError, match=r"NaN or infinite pixels in the input around rows"):
        tiled_probability(model, image, 64, InferenceSettings(tile=64, precision="fp32"))


def chunked_labels(foreground: np.ndarray, chunk: int, fill_holes: bool = False, min_area: int = 0) -> np.ndarray:
    """The objects inference labels from ``foreground`` with ``infer.chunk_size`` = ``chunk``."""
    stored = np.where(foreground, 255, 0).astype(np.uint8)
    return label_image(stored, ObjectRule(0.5, "uint8", fill_holes, min_area), chunk)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b label the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


@pytest.mark.parametrize("chunk", [16, 37, 64])
def test_chunked_labels_equal_global_connected_components(chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    foreground = ndi.binary_opening(rng.random((150, 170)) > 0.55, iterations=1)
    merged = chunked_labels(foreground, chunk)
    expected, count = ndi.label(foreground)
    assert same_partition(merged, expected)
    assert merged.max() == count and set(np.unique(merged)) == set(range(count + 1))  # unique, consecutive


def test_each_chunk_gets_only_its_own_mapping_to_final_ids() -> None:
    """What a label task is sent (``merge_chunks``): its chunk's local ids 0..n to final ids, not the slide's whole
    mapping (which grows with the slide: it was broadcast to every worker, and searched for its maximum per chunk)."""
    foreground = ndi.binary_opening(np.random.default_rng(3).random((150, 170)) > 0.55, iterations=1)
    rule = ObjectRule(0.5, "uint8", False, 0)
    local = {key: rule.label_chunk(np.where(foreground[region.slices], 255, 0).astype(np.uint8))
             for key, region in grid(150, 170, 37)}  # fmt: skip
    mappings, objects = merge_chunks({key: ChunkEdges.of(*labelled) for key, labelled in local.items()})
    assert objects == ndi.label(foreground)[1] and set(mappings) == set(local)
    for key, labelled in local.items():
        assert len(mappings[key]) == labelled.count + 1 and mappings[key][0] == 0 and mappings[key].dtype == np.int32
        assert mappings[key][1:].min(initial=1) >= 1  # no object dropped (min_area 0)


@pytest.mark.parametrize(("chunk", "min_area"), [(16, 5), (37, 12), (64, 30)])
def test_small_objects_go_before_ids_are_given_whatever_the_chunks(chunk: int, min_area: int) -> None:
    rng = np.random.default_rng(chunk)
    foreground = ndi.gaussian_filter(rng.random((150, 170)), 1.5) > 0.52  # blobs of many sizes
    merged = chunked_labels(foreground, chunk, min_area=min_area)
    expected, count = ndi.label(foreground)
    small = np.bincount(expected.ravel()) < min_area
    expected[small[expected]] = 0  # whole-image components of fewer pixels, wherever they lie
    assert small[1:].sum() > 5 and same_partition(merged, expected)
    kept = count - int(small[1:].sum())
    assert merged.max() == kept and set(np.unique(merged)) == set(range(kept + 1))  # unique, consecutive


def test_holes_inside_a_chunk_are_filled_those_cut_by_a_seam_stay_open() -> None:
    yy, xx = np.mgrid[:128, :128]
    ring = lambda y, x: ((yy - y) ** 2 + (xx - x) ** 2 < 12**2) & ((yy - y) ** 2 + (xx - x) ** 2 >= 4**2)  # noqa: E731
    foreground = ring(30, 30) | ring(64, 100)  # the second straddles the seam at row 64
    labels = chunked_labels(foreground, 64, fill_holes=True)
    assert labels[30, 30] > 0 and labels[64, 100] == 0 and labels.max() == 2
    diamond = np.zeros((5, 5), bool)
    diamond[[1, 2, 2, 3], [2, 1, 3, 2]] = True  # four objects touching only at corners: no hole between them
    assert chunked_labels(diamond, 64, fill_holes=True).max() == 4


@pytest.mark.parametrize("seed", range(6))
def test_hole_filling_equals_scipys_binary_fill_holes(seed: int) -> None:
    """``fill_holes_of`` (one labelling of the background) gives the pixels of ``ndi.binary_fill_holes`` (iterated
    dilations), on blobs with holes of every shape, all foreground, all background and holes only."""
    from unet.instances import fill_holes_of

    rng = np.random.default_rng(seed)
    blobs = ndi.gaussian_filter(rng.random((97, 131)), 1.0 + seed % 3) > 0.5
    for foreground in (blobs, ~blobs, np.ones((8, 9), bool), np.zeros((8, 9), bool), np.pad(~blobs[:5, :5], 1)):
        expected = ndi.binary_fill_holes(foreground, structure=np.ones((3, 3), bool))
        assert fill_holes_of(foreground).dtype == bool
        np.testing.assert_array_equal(fill_holes_of(foreground), expected)
    assert (ndi.binary_fill_holes(blobs) != blobs).sum() > 0  # there were holes to fill


@pytest.mark.parametrize("seed", range(4))
def test_connected_gives_scipys_ids_in_the_same_order(seed: int) -> None:
    """``unet.instances.connected`` (cc3d) finds ``ndi.label``'s components, 4- and 8-connected, and numbers
    4-connected ones (objects) as it does, pixel for pixel; on blobs, noise, a transposed (Fortran-ordered) view and
    empty or full masks."""
    from unet.instances import connected

    rng = np.random.default_rng(seed)
    blobs = ndi.gaussian_filter(rng.random((97, 131)), 1.0 + seed % 3) > 0.5
    noise = rng.random((64, 45)) > 0.5
    for mask in (blobs, ~blobs, noise, noise.T, np.zeros((5, 7), bool), np.ones((5, 7), bool)):
        for connectivity, structure in ((4, None), (8, np.ones((3, 3), bool))):
            expected, count = ndi.label(mask, structure=structure)
            labels, found = connected(mask, connectivity)
            assert labels.dtype == np.int32 and found == count and same_partition(labels, expected)
            if connectivity == 4:  # objects' local ids: the order their first pixels come in
                np.testing.assert_array_equal(labels, expected)


def test_connected_and_hole_filling_agree_with_scipy_on_many_small_masks() -> None:
    """Hundreds of small masks of every shape and density: cc3d 4.1.1 labelled background pixels of about one
    boolean mask in twenty 8-connected (a CI failure: hole filling indexed past its components), so ``connected``
    must hand it bytes; every component and every filled pixel must equal scipy's."""
    from unet.instances import connected, fill_holes_of

    rng = np.random.default_rng(0)
    for _ in range(400):
        height, width = rng.integers(1, 60, 2)
        mask = rng.random((height, width)) < rng.random()
        for connectivity, structure in ((4, None), (8, np.ones((3, 3), bool))):
            expected, count = ndi.label(mask, structure=structure)
            labels, found = connected(mask, connectivity)
            assert found == count and same_partition(labels, expected), (height, width, connectivity)
        filled = ndi.binary_fill_holes(mask, structure=np.ones((3, 3), bool))
        np.testing.assert_array_equal(fill_holes_of(mask), filled)


def test_foreground_probability_is_the_softmax_of_the_logits() -> None:
    from unet.inference import foreground_probability

    logits = torch.randn(2, 2, 33, 47, generator=torch.Generator().manual_seed(0)) * 8
    torch.testing.assert_close(foreground_probability(logits), logits.softmax(1)[:, 1], atol=1e-6, rtol=0)
    three = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(foreground_probability(three), 1 - three.softmax(1)[:, 0], atol=1e-6, rtol=0)


def test_objects_on_seams_get_one_id() -> None:
    yy, xx = np.mgrid[:128, :128]
    foreground = ((yy - 64) ** 2 + (xx - 64) ** 2 < 20**2) | ((yy - 10) ** 2 + (xx - 64) ** 2 < 6**2)
    foreground |= (yy > 100) & (yy < 104)  # a thin bar across two seams
    labels = chunked_labels(foreground, 64)
    assert len(np.unique(labels[(yy - 64) ** 2 + (xx - 64) ** 2 < 20**2])) == 1  # disk over 4 chunks
    assert len(np.unique(labels[(yy > 100) & (yy < 104)])) == 1
    assert labels.max() == 3


def test_compiled_model_predicts_the_same() -> None:
    """``infer.compile``: torch.compile (Inductor; on a CPU too, with the fused convolutions) changes nothing."""
    image = np.random.default_rng(9).random((3, 100, 90)).astype(np.float32)
    small = UNet(3, 2, base_channels=4, depth=2).eval()  # compiling takes long; the wiring is what is tested
    compiled = tiled_probability(small, image, 64, InferenceSettings(precision="fp32", compile=True))
    np.testing.assert_array_equal(compiled, tiled_probability(small, image, 64, InferenceSettings(precision="fp32")))
