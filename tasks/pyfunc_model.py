"""The trained FSS model as an MLflow pyfunc model: base64 images in, base64 masks out.

Input, one row per query: a pandas DataFrame (what ``mlflow models serve`` makes of
``dataframe_records`` or ``dataframe_split``), a list of records (dicts) or one record:

- ``query``: the image to segment, base64 of a PNG/JPEG/… file (EXIF orientation applied);
- ``support_images``: list of base64 images, one per shot;
- ``support_masks``: list of base64 mask PNGs, one per support image and of its size;
  every nonzero pixel is foreground.

Output, one row per query: ``mask`` (base64 of a palette PNG at the query's size, pixel values
0 = background and 1 = foreground), ``height`` and ``width`` (the query's size).

The model carries its own code (``fss_core``, ``storage_schemas``, ``tasks`` as MLflow
``code_paths``), so it loads in any environment with the pinned requirements installed.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

import fss_core
import storage_schemas
from fss_core.data.images import ImageReadError, label_palette, load_mask, load_rgb
from fss_core.evaluation.protocol import ModelPredictor
from fss_core.inference.predict import PredictInputError, predict
from fss_core.models.fss.bundle import SPEC_FILE, WEIGHTS_FILE, is_bundle, load_bundle

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("query", "support_images", "support_masks")
# What the model needs at load and predict time; versions are read from this environment.
REQUIREMENTS = ("torch", "numpy", "pillow", "pandas", "scipy", "scikit-image", "pydantic", "zarr", "tqdm")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "query"), ColSpec(Array("string"), "support_images"),
                   ColSpec(Array("string"), "support_masks")]),
    outputs=Schema([ColSpec("string", "mask"), ColSpec("long", "height"), ColSpec("long", "width")]),
)


class ModelInputError(PredictInputError, MlflowException):
    """Unusable model input: a ``PredictInputError`` to Python callers, and an HTTP 400 carrying this
    message from ``mlflow models serve`` (which answers other errors with a generic message)."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


def _encode_mask(mask: np.ndarray) -> str:
    """``uint8 [H, W]`` of 0/1 → base64 of a palette PNG (the dataset labels' format)."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(label_palette())
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(value: Any, read, what: str) -> np.ndarray:
    """One base64 cell → the array ``read`` makes of its bytes; errors name the cell."""
    if not isinstance(value, str):
        raise PredictInputError(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PredictInputError(f"{what}: not valid base64 ({exc})") from exc
    try:
        return read(io.BytesIO(raw))
    except ImageReadError as exc:
        reason = str(exc).split(": ", 1)[-1]  # drop the BytesIO repr that stands for the path
        raise PredictInputError(f"{what}: {reason}") from exc


def _as_frame(model_input: Any) -> pd.DataFrame:
    """A DataFrame, a list of records or one record → a DataFrame with the input columns."""
    if isinstance(model_input, dict):
        model_input = [model_input]
    if isinstance(model_input, list):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise PredictInputError(f"expected a DataFrame or JSON records with columns {', '.join(INPUT_COLUMNS)}, "
                                f"got {type(model_input).__name__}")
    missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
    if missing:
        raise PredictInputError(f"input lacks column(s) {', '.join(missing)}; "
                                f"expected {', '.join(INPUT_COLUMNS)}, got {', '.join(map(str, model_input.columns))}")
    return model_input


def _as_list(value: Any, what: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise PredictInputError(f"{what}: expected a list of base64 strings, got {type(value).__name__}")
    return list(value)


class FSSPyfuncModel(mlflow.pyfunc.PythonModel):
    """Serves a model bundle (artifact ``bundle``) through ``fss_core.inference.predict``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        model, self.spec = load_bundle(context.artifacts["bundle"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = ModelPredictor(model, device)
        log.info("loaded FSS model (%s backbone, %d px) on %s", self.spec.backbone, self.spec.image_size, device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Rows of (query, support_images, support_masks) → rows of (mask, height, width).

        Raises:
            ModelInputError: a missing column, a cell that is not base64 of an image, a mask
                whose size differs from its image's, an empty mask, no support; the message
                names the row and the field.
        """
        try:
            return self._segment(_as_frame(model_input))
        except PredictInputError as exc:
            raise ModelInputError(str(exc)) from exc

    def _segment(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows with the same supports are segmented together, in batches."""
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
        for row, (images, masks) in enumerate(zip(frame["support_images"], frame["support_masks"])):
            images = _as_list(images, f"row {row}: support_images")
            masks = _as_list(masks, f"row {row}: support_masks")
            if len(images) != len(masks):
                raise PredictInputError(f"row {row}: {len(images)} support_images but {len(masks)} support_masks; "
                                        "give one mask per support image")
            if not all(isinstance(v, str) for v in images + masks):
                raise PredictInputError(f"row {row}: support_images and support_masks must hold base64 strings")
            groups.setdefault((tuple(images), tuple(masks)), []).append(row)
        queries = [_decode(q, load_rgb, f"row {row}: query") for row, q in enumerate(frame["query"])]
        results: list[np.ndarray] = [np.empty(0)] * len(frame)
        for (images, masks), rows in groups.items():
            supports = [
                (_decode(image, load_rgb, f"row {rows[0]}: support_images[{shot}]"),
                 _decode(mask, load_mask, f"row {rows[0]}: support_masks[{shot}]"))
                for shot, (image, mask) in enumerate(zip(images, masks))
            ]
            try:
                out = predict(self.predictor, supports, [queries[r] for r in rows], image_size=self.spec.image_size)
            except PredictInputError as exc:
                raise PredictInputError(f"row {rows[0]}: {exc}") from exc
            for row, mask in zip(rows, out):
                results[row] = mask
        return pd.DataFrame({
            "mask": [_encode_mask(mask) for mask in results],
            "height": [int(mask.shape[0]) for mask in results],
            "width": [int(mask.shape[1]) for mask in results],
        })


def pip_requirements() -> list[str]:
    """``name==version`` of every requirement, from this environment (local labels like ``+cpu`` dropped,
    so a GPU box installs its own build)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def code_paths() -> list[str]:
    """The project packages the model imports (this module's package too), copied into the model."""
    return [str(Path(fss_core.__file__).parent), str(Path(storage_schemas.__file__).parent),
            str(Path(__file__).parent)]


def example_request() -> list[dict]:
    """One request row that shows the input format (the MLflow UI lists it with the model, and MLflow
    checks the model answers it when logging): a 64 px query and one support, each with a red
    disc on grey, and the support's mask of the disc."""
    yy, xx = np.mgrid[:64, :64]

    def png(array: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def disc(cy: int, cx: int) -> tuple[np.ndarray, np.ndarray]:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < 14**2
        rgb = np.full((64, 64, 3), 128, dtype=np.uint8)
        rgb[inside] = (220, 40, 40)
        return rgb, inside.astype(np.uint8)

    (support, mask), (query, _) = disc(24, 24), disc(40, 36)
    return [{"query": png(query), "support_images": [png(support)], "support_masks": [png(mask)]}]


def log_fss_model(
    bundle_dir: str | os.PathLike,
    name: str = "model",
    registered_model_name: str | None = None,
    input_example: pd.DataFrame | Sequence[dict] | None = None,
) -> ModelInfo:
    """Log a model bundle as a pyfunc model (in the active run, if any).

    Requirements are explicit (no slow inference of them); the signature is fixed (``SIGNATURE``);
    the input example is ``example_request()`` unless one is given.
    """
    bundle_dir = Path(bundle_dir)
    if not is_bundle(bundle_dir):
        raise FileNotFoundError(f"{bundle_dir} is not a model bundle (needs {SPEC_FILE} and {WEIGHTS_FILE})")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # code, not a pickle
        artifacts={"bundle": str(bundle_dir)},
        code_paths=code_paths(),
        pip_requirements=pip_requirements(),
        signature=SIGNATURE,
        input_example=example_request() if input_example is None else input_example,
        registered_model_name=registered_model_name,
    )
