"""Models in the MLflow registry: registered with the digests of their files, loaded back only as registered.

A model is logged as an MLflow ``python_function`` model whose ``loader_module`` is ``pipelines.serving``:
weights as safetensors, architecture as JSON, nothing pickled. When it is registered, the version records the
sha256 of every file of its artifacts in the tag ``unet.sha256`` (DIGESTS_TAG), which the team server lets no
account change afterwards (``pipelines.mlflow_app``); every loader here checks every file against it before
reading any of them, so a version's weights changed in the bucket or through the server are refused in one line.

    load_model("models:/NAME@ALIAS")  # or models:/NAME/VERSION, runs:/RUN/model, a local folder
    mlflow.pyfunc.load_model("models:/NAME@ALIAS", model_config={"device": "cuda", "precision": "bf16"})
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unet import __version__
from unet.errors import UserError, first_line

if TYPE_CHECKING:  # MLflow (about a second to import) and PyTorch are imported by the functions that use them
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient

    from unet.config import InferConfig
    from unet.model import UNet

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"  # the logged model's name in its run
DIGESTS_TAG = "unet.sha256"  # on a model version: {file: sha256} of every file of its artifacts, written once
# on a model version: what its model records of its training data (model.json), searchable in the registry
PIXEL_SIZE_TAG, OBJECT_AREA_TAG = "unet.pixel_size_um", "unet.object_area_um2"
LOADER_MODULE = "pipelines.serving"
LOADER_MODULES = frozenset({LOADER_MODULE, "unet.serving"})  # unet.serving: models logged before the digests
# Jobs move a model's files through the tracking server only: they need no route to (and no account of) the
# artifact bucket, where MLflow would otherwise send them with presigned URLs (infra/s3, docs/operations.md)
THROUGH_THE_SERVER = {f"MLFLOW_ENABLE_PROXY_MULTIPART_{way}": "false" for way in ("DOWNLOAD", "UPLOAD")}
MLFLOW_ADDS = frozenset({"registered_model_meta"})  # written by MLflow into a models:/ download, not stored


def signature_for(model: UNet) -> ModelSignature:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.n_channels, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1), "foreground_probability")]),
    )


def resolution_tags(pixel_size_um: float | None, object_area_um2: dict | None) -> dict[str, str]:
    """Tags of the resolution a model is trained at and of its training objects' areas (compact JSON), each where
    known: on the training run (from its store) and on the registered version (from its model.json)."""
    tags = {}
    if pixel_size_um is not None:
        tags[PIXEL_SIZE_TAG] = str(pixel_size_um)
    if object_area_um2 is not None:
        tags[OBJECT_AREA_TAG] = json.dumps(object_area_um2, separators=(",", ":"))
    return tags


def log_and_register(
    run_id: str,
    model: UNet,
    registered_name: str,
    version_tags: dict[str, Any],
    tracking_uri: str,
    infer: InferConfig | None = None,
) -> str:
    """Log ``model`` into the run as a pyfunc model (``infer``'s prediction settings as its default
    ``model_config``), check that the stored files are the ones written, and only then register them as a new
    version tagged ``version_tags``, what the model records of its training data (``resolution_tags``) and the files'
    digests; returns the version."""
    import mlflow
    import numpy as np
    import torch

    from pipelines.registry import environment, using_tracking_uri
    from unet.config import InferConfig
    from unet.model_files import file_digests, save_weights
    from unet.serving import default_model_config

    with using_tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        data = save_weights(model, Path(tmp) / "unet")
        with environment(THROUGH_THE_SERVER), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                loader_module=LOADER_MODULE,
                data_path=str(data),
                signature=signature_for(model),
                input_example=np.zeros((1, model.n_channels, model.size_multiple, model.size_multiple), np.float32),
                model_config=default_model_config(infer or InferConfig()),
                pip_requirements=[f"unet-wsi=={__version__}", f"torch=={torch.__version__.split('+')[0]}"],
            )
        stored = _download(info.model_uri, Path(tmp) / "stored")
        digests = {name: digest for name, digest in file_digests(stored).items() if name not in MLFLOW_ADDS}
        written = {f"data/unet/{name}": digest for name, digest in file_digests(data).items()}
        if any(digests.get(name) != digest for name, digest in written.items()):
            raise UserError(f"the model stored for run {run_id} differs from the one written; nothing registered")
        tags = {
            **{k: str(v) for k, v in version_tags.items()},
            **resolution_tags(model.pixel_size_um, model.object_area_um2),
        }
        tags[DIGESTS_TAG] = json.dumps(digests, sort_keys=True)
        version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return str(version.version)


def load_model(uri: str, tracking_uri: str | None = None) -> UNet:
    """The ``UNet`` behind ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model`` or a folder. A
    registered version's files are checked against the digests recorded when it was registered before any of
    them is read; a mismatch is one line naming the version and the file."""
    if Path(uri).exists():
        return _load_folder(Path(uri), uri)
    import mlflow

    from pipelines.registry import connect, using_tracking_uri

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    client = connect(tracking_uri)
    with using_tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        version = registered_version(client, uri)
        location = client.get_model_version_download_uri(version.name, version.version) if version else uri
        local = _download(location, Path(tmp) / "model", uri)
        if version is not None:
            verify(local, version, uri)
        return _load_folder(local, uri)


def registered_version(client: MlflowClient, uri: str) -> ModelVersion | None:
    """The registered version ``uri`` names (``models:/``) or holds (``runs:/RUN/NAME``: the version registered
    from that run's logged model NAME); None for anything else."""
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("models:/"):
            name, _, alias = uri.removeprefix("models:/").partition("@")
            if alias:
                return client.get_model_version_by_alias(name, alias)
            name, _, number = name.rstrip("/").rpartition("/")
            if name:
                return client.get_model_version(name, number)
            return _version_of_logged_model(client, number, client.get_logged_model(number).source_run_id)
        if uri.startswith("runs:/"):
            run_id, _, name = uri.removeprefix("runs:/").strip("/").partition("/")
            for version in client.search_model_versions(f"run_id = '{run_id}'"):
                model_id = (version.source or "").removeprefix("models:/")
                if model_id != version.source and client.get_logged_model(model_id).name == name:
                    return version
    except MlflowException as exc:
        raise UserError(f"cannot load model {uri}: {first_line(exc)}") from None
    return None


def _version_of_logged_model(client: MlflowClient, model_id: str, run_id: str | None) -> ModelVersion | None:
    """A registered version of the logged model ``model_id`` (None if none is)."""
    if not run_id:
        return None
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.source == f"models:/{model_id}"]
    return found[0] if found else None


def verify(folder: Path, version: ModelVersion, uri: str, ignored: frozenset[str] = frozenset()) -> None:
    """Refuse, in one line, files under ``folder`` that are not the ones ``version`` registered."""
    from unet.model_files import digest_mismatch

    recorded = version.tags.get(DIGESTS_TAG)
    name = f"{version.name}/{version.version}"
    if recorded is None:
        log.warning("model version %s (%s) was registered without file digests: loaded unverified", name, uri)
        return
    if problem := digest_mismatch(folder, json.loads(recorded), ignored):
        raise UserError(f"model version {name} ({uri}) is not the model that was registered: {problem}; not loaded")


def verify_pyfunc(root: Path) -> None:
    """For the pyfunc loader, which MLflow hands a downloaded folder only: find the registered version these
    files belong to (named by MLflow's ``registered_model_meta`` for a models:/ URI, else by the logged model's
    id in MLmodel, when a tracking URI is set) in the current registry and check them against it."""
    import mlflow
    import yaml

    client = mlflow.MlflowClient()
    meta = root / "registered_model_meta"
    if meta.is_file():
        named = yaml.safe_load(meta.read_text()) or {}
        uri = f"models:/{named.get('model_name')}/{named.get('model_version')}"
        version = client.get_model_version(str(named.get("model_name")), str(named.get("model_version")))
    elif mlflow.is_tracking_uri_set():  # else no registry to ask (and none to create by asking)
        mlmodel = yaml.safe_load((root / "MLmodel").read_text()) or {}
        uri = f"models:/{mlmodel.get('model_id')}"
        model_id = mlmodel.get("model_id")
        version = model_id and _version_of_logged_model(client, model_id, mlmodel.get("run_id"))
    else:
        return
    if version:
        verify(root, version, uri, ignored=MLFLOW_ADDS)


def _download(location: str, destination: Path, uri: str | None = None) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from pipelines.registry import environment

    destination.mkdir(parents=True)
    try:  # through the server, never straight from its bucket (presigned URLs); a few files: no progress bar
        with environment(THROUGH_THE_SERVER | {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(destination)))
    except MlflowException as exc:
        raise UserError(f"cannot load model {uri or location}: {first_line(exc)}") from None


def _load_folder(local: Path, uri: str) -> UNet:
    """A model folder: an MLflow model (MLmodel naming our loader) or one written by ``save_weights``."""
    from unet.model_files import load_weights

    if (local / "MLmodel").is_file():
        from mlflow.models import Model

        flavor = Model.load(str(local)).flavors.get("python_function", {})
        if flavor.get("loader_module") not in LOADER_MODULES:
            raise UserError(f"{uri} is not a unet-wsi model (loader {flavor.get('loader_module')!r})")
        local = local / flavor["data"]
    with contextlib.suppress(FileNotFoundError):
        return load_weights(local)
    raise UserError(f"{uri} holds no unet-wsi model (no weights in {local})")
