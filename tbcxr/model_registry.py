"""MLflow model logging: the best model in pt2 format, and the servable pyfunc (serving.py) registered in the
Model Registry. Both go through a run's RunLogger (tracking.py), so an unreachable store queues nothing and
warns once, as every other record does.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from torch import nn

from .tracking import RunLogger, active_run


def log_model(logger: RunLogger, model: nn.Module, image_size: int) -> None:
    """The best model in MLflow's pt2 format (torch.export: loading it runs no pickled code). Where torch.export
    fails, a warning and the run's tag pt2_model say why; the servable model needs no pt2 copy."""
    if logger.offline:
        return
    import mlflow

    example = np.zeros((2, 3, image_size, image_size), dtype=np.float32)
    requirements = [installed_pin("torch")]  # given, so MLflow skips slow inference
    try:
        with active_run(logger):
            mlflow.pytorch.log_model(
                model.cpu().eval(),
                name="model",
                input_example=example,
                pip_requirements=requirements,
                serialization_format="pt2",  # explicit: the default depends on the MLflow version
            )
    except logger.store_errors() as exc:
        logger.go_offline(
            exc, "the model was not logged; it is in the best checkpoint; --resume logs it once the store answers"
        )
    except Exception as exc:  # torch.export raises many types, by the operation or graph it cannot trace
        reason = f"torch.export failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        print(f"WARNING: the pt2 copy of the model was not logged: {reason}", file=sys.stderr)
        logger.client.set_tag(logger.run_id, "pt2_model", f"not logged: {reason}")


# What serving imports, pinned to the versions here, so that MLflow need not infer them (slow).
SERVING_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "pillow", "pydicom", "opencv-python-headless",
                         "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg")  # fmt: skip


def installed_pin(distribution: str) -> str:
    """ "name==version" of an installed distribution; "" when it is not installed under that name (conda's
    opencv, say): serving with --env-manager local then uses what this environment has."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution}=={version(distribution).split('+')[0]}"
    except PackageNotFoundError:
        return ""


def register_servable_model(logger: RunLogger, checkpoint_path: Path, registered_model: str) -> str:
    """Log the checkpoint as a servable pyfunc (tbcxr/serving.py: images in, decisions out) to the run and
    register it as a new version of `registered_model`. Returns the console line saying how to serve it;
    "" when the store cannot be reached (one warning line; the run goes on)."""
    skipped = (
        f"the servable model was not registered as {registered_model}; --resume registers it once the store answers"
    )
    if logger.offline:
        print(f"WARNING: MLflow store {logger.tracking_uri} is not reachable; {skipped}", file=sys.stderr)
        return ""
    import mlflow

    from . import serving

    requirements = [pin for name in SERVING_DISTRIBUTIONS if (pin := installed_pin(name))]
    try:
        with active_run(logger), warnings.catch_warnings():
            # An example would be an image file in every version; the signature says what a request holds.
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="servable",
                python_model=serving.__file__,  # models from code: loading runs this file, unpickles nothing
                code_paths=[str(Path(serving.__file__).parent)],  # the tbcxr package it imports
                artifacts={serving.CHECKPOINT_ARTIFACT: str(checkpoint_path)},
                signature=serving.SIGNATURE,
                pip_requirements=requirements,
                registered_model_name=registered_model,
            )
    except logger.store_errors() as exc:
        logger.go_offline(exc, skipped)
        return ""
    number = info.registered_model_version
    return (
        f"Registered model {registered_model} version {number} "
        f"(serve: mlflow models serve -m models:/{registered_model}/{number} -p 5004 --env-manager local)"
    )
