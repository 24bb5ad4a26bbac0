"""The servable MLflow model: chest X-ray files in, P(TB) and decisions out.

An MLflow "models from code" file: model_registry.register_servable_model logs this file as the model (MLflow
runs it; no pickle is read), the tbcxr package as its code_paths and a checkpoint as its one artifact.
A request is a DataFrame with a column `image` of base64-encoded file bytes (PNG, JPEG or DICOM, with or
without extension or preamble; line breaks in the base64 are allowed). Each image goes through
predict.image_tensor with its screening rule, the preprocessing batch prediction and --test-only use, so a
served image gets the P(TB) the prediction CSV gives it. The answer per row, in request order: status ("ok",
or "unreadable: <reason>" as in the prediction CSV, with no P(TB) or decision), p_tb and log_odds (with the
checkpoint's calibration), decision, threshold_p_tb and threshold_log_odds at the checkpoint's recommended operating
point (log_odds >= threshold_log_odds decides: near P(TB) = 1 two probabilities can print alike where the
log-odds differ), its name, and model_version, the checkpoint file's digest (the prediction CSV's `checkpoint`).

The scoring server runs requests in threads side by side: exact float32 is set once when the model loads,
never saved and restored per batch. A request is decoded and scored CHUNK images at a time, so it holds one
chunk's tensors, whatever its length. A request without an `image` column, or of more than
MAX_REQUEST_IMAGES rows, answers HTTP 400 with the reason (the scoring server's code for
INVALID_PARAMETER_VALUE).

Imports are absolute: MLflow loads this file as a module of its own, outside the tbcxr package.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tbcxr.config import CLASS_NAMES
from tbcxr.metrics import probability_of
from tbcxr.predict import OK, UNREADABLE, Predictor, UnusableImage, image_tensor
from tbcxr.runtime import resolve_device, set_exact_float32

CHECKPOINT_ARTIFACT = "checkpoint"
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = (
    "status", "p_tb", "log_odds", "decision", "threshold_p_tb", "threshold_log_odds", "operating_point", "model_version"
)  # fmt: skip
CHUNK = 16  # images decoded and scored at once: a request never holds more than this many tensors
# Batch prediction of a 224 px model ran at 4.24 images/s on a 2-core CPU (docs/performance.md): 128 images
# take about 30 s there, half the scoring server's default request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
# 60 s), past which the client gets a 504 and no answer at all.
MAX_REQUEST_IMAGES = 128
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec("string", "status"),
            ColSpec("double", "p_tb", required=False),
            ColSpec("double", "log_odds", required=False),
            ColSpec("string", "decision", required=False),
            ColSpec("double", "threshold_p_tb"),
            ColSpec("double", "threshold_log_odds"),
            ColSpec("string", "operating_point"),
            ColSpec("string", "model_version"),
        ]
    ),
)


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


def decoded_image(value, transform) -> torch.Tensor:
    """One request row's base64 file bytes as the model's input tensor; UnusableImage with the reason otherwise."""
    if not isinstance(value, str):
        raise UnusableImage(f"`{IMAGE_COLUMN}` must hold a base64-encoded image file, not {value!r:.80}")
    try:  # line breaks and spaces (base64 tools wrap at 76 characters) are no part of the data
        data = base64.b64decode("".join(value.split()), validate=True)
    except binascii.Error as exc:
        raise UnusableImage(f"`{IMAGE_COLUMN}` is not valid base64 ({exc})") from None
    return image_tensor(io.BytesIO(data), transform, screen=True)


class TuberculosisClassifier(mlflow.pyfunc.PythonModel):
    """P(TB) with the checkpoint's calibration, and the decision at its recommended operating point."""

    def load_context(self, context) -> None:
        set_exact_float32()  # once for the process: requests are scored in threads side by side
        predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], resolve_device("auto"))
        self.predictor = dataclasses.replace(predictor, precision_fixed=True)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise bad_request(f"the request needs a column `{IMAGE_COLUMN}` of base64-encoded image files")
        if len(model_input) > MAX_REQUEST_IMAGES:
            raise bad_request(
                f"the request holds {len(model_input)} images; at most {MAX_REQUEST_IMAGES} are scored per "
                "request: send them in several requests"
            )
        values = list(model_input[IMAGE_COLUMN])
        rows = []
        for start in range(0, len(values), CHUNK):
            rows += self.answer_chunk(values[start : start + CHUNK])
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS), dtype=object)  # None stays null in JSON, not NaN

    def answer_chunk(self, values: list) -> list[tuple]:
        """One answer row per value: decoded, screened and scored together. The decision is the log-odds'
        (log_odds >= threshold_log_odds); P(TB) and its threshold are the same numbers as probabilities."""
        predictor, statuses, tensors = self.predictor, [], []
        for value in values:
            try:
                tensors.append(decoded_image(value, predictor.transform))
                statuses.append(OK)
            except UnusableImage as exc:
                statuses.append(f"{UNREADABLE}: {exc}")
        scores = iter(predictor.log_odds(torch.stack(tensors)).tolist() if tensors else [])
        point = (predictor.threshold_probability, predictor.threshold, predictor.operating_point, predictor.digest)
        rows = []
        for status in statuses:
            if status == OK:
                log_odds = next(scores)
                decision = CLASS_NAMES[int(predictor.decisions(log_odds))]
                rows.append((status, float(probability_of(log_odds)), log_odds, decision, *point))
            else:
                rows.append((status, None, None, None, *point))
        return rows


if __name__ != "tbcxr.serving":  # loaded by MLflow as the model's code file, not imported as part of tbcxr
    mlflow.models.set_model(TuberculosisClassifier())
