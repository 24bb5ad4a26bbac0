"""The servable MLflow model: chest X-ray files in, P(TB) and decisions out.

An MLflow "models from code" file: tracking.register_servable_model logs this file as the model (MLflow
runs it; no pickle is read), the tbcxr package as its code_paths and a checkpoint as its one artifact.
A request is a DataFrame with a column `image` of base64-encoded file bytes (PNG, JPEG or DICOM, with or
without extension or preamble); each image goes through predict.image_tensor, the preprocessing batch
prediction and --test-only use, so a served image gets the P(TB) the prediction CSV gives it. The answer:
p_tb (with the checkpoint's calibration), decision and threshold at the checkpoint's recommended operating
point, its name, and model_version, the checkpoint file's digest (the prediction CSV's `checkpoint`).
A malformed request answers HTTP 400 with the reason (the scoring server's code for INVALID_PARAMETER_VALUE).

Imports are absolute: MLflow loads this file as a module of its own, outside the tbcxr package.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tbcxr.config import CLASS_NAMES
from tbcxr.metrics import probability_of
from tbcxr.predict import Predictor, UnusableImage, image_tensor
from tbcxr.runtime import resolve_device

CHECKPOINT_ARTIFACT = "checkpoint"
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("p_tb", "decision", "threshold", "operating_point", "model_version")
BATCH_SIZE = 16  # images scored at once: a large request never holds more than this many tensors on the device
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec("double", "p_tb"),
            ColSpec("string", "decision"),
            ColSpec("double", "threshold"),
            ColSpec("string", "operating_point"),
            ColSpec("string", "model_version"),
        ]
    ),
)


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


def decoded_image(row: int, value, transform) -> torch.Tensor:
    """One request row's base64 file bytes as the model's input tensor; a 400 error naming the row otherwise."""
    if not isinstance(value, str):
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` must hold a base64-encoded image file, not {value!r:.80}")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` is not valid base64 ({exc})") from None
    try:
        return image_tensor(io.BytesIO(data), transform, screen=True)
    except UnusableImage as exc:
        raise bad_request(f"row {row}: not a usable chest X-ray (PNG, JPEG or DICOM): {exc}") from None


class TuberculosisClassifier(mlflow.pyfunc.PythonModel):
    """P(TB) with the checkpoint's calibration, and the decision at its recommended operating point."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], resolve_device("auto"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise bad_request(f"the request needs a column `{IMAGE_COLUMN}` of base64-encoded image files")
        predictor, values = self.predictor, list(model_input[IMAGE_COLUMN])
        tensors = [decoded_image(row, value, predictor.transform) for row, value in enumerate(values)]
        batches = [torch.stack(tensors[i : i + BATCH_SIZE]) for i in range(0, len(tensors), BATCH_SIZE)]
        scores = np.concatenate([predictor.log_odds(batch) for batch in batches]) if tensors else np.zeros(0)
        return pd.DataFrame(
            {
                "p_tb": probability_of(scores),
                "decision": [CLASS_NAMES[int(called)] for called in predictor.decisions(scores)],
                "threshold": predictor.threshold_probability,
                "operating_point": predictor.operating_point,
                "model_version": predictor.digest,
            },
            columns=list(OUTPUT_COLUMNS),
        )


if __name__ != "tbcxr.serving":  # loaded by MLflow as the model's code file, not imported as part of tbcxr
    mlflow.models.set_model(TuberculosisClassifier())
