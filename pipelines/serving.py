"""The ``loader_module`` of the models ``pipelines.models`` logs: ``mlflow.pyfunc.load_model(uri)`` calls
``_load_pyfunc`` here, which checks the downloaded files against the digests their registered version recorded
(``pipelines.models.verify_pyfunc``) before ``unet.serving`` reads any of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unet.serving import UNetPredictor, load_predictor


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> UNetPredictor:
    """MLflow's entry point (``model_config``: keys of the ``infer`` section, see ``unet.serving``)."""
    from pipelines.models import verify_pyfunc

    verify_pyfunc(_model_root(Path(data_path)))
    return load_predictor(data_path, model_config)


def _model_root(data_path: Path) -> Path:
    """The downloaded model's folder (the one holding MLmodel) above its data folder."""
    for folder in (data_path, *data_path.parents):
        if (folder / "MLmodel").is_file():
            return folder
    raise FileNotFoundError(f"no MLmodel file above {data_path}")
