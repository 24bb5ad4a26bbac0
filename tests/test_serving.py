"""The servable MLflow model: the trainer registers a pyfunc that takes X-ray files (base64) and answers
P(TB) and decisions; a real `mlflow models serve` of the registered version gives an image the P(TB) that
prediction gives it, answers a malformed request with HTTP 400 and a reason, and keeps serving."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import SHARED_DATA, TINY, free_port, make_organized, shared_data, stop_process_group, write_xrays
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from mlflow.tracking import MlflowClient
from PIL import Image
from test_decoding import dicom_dataset, save

import resnet50_tb_full
from tbcxr import tracking
from tbcxr.checkpoint import Checkpoint
from tbcxr.predict import Predictor, checkpoint_digest, image_tensor
from tbcxr.serving import CHECKPOINT_ARTIFACT, OUTPUT_COLUMNS, TuberculosisClassifier

REGISTERED = "tb_serving_test"
SERVE_LINE = re.compile(r"^Registered model (\S+) version (\d+) \(serve: (mlflow models serve .+)\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def registered_run(tmp_path_factory):
    """A tiny one-epoch run whose trainer registered its best checkpoint as a servable model; its console."""
    root = tmp_path_factory.mktemp("registered_run")
    data = make_organized(root / "data", train=8, test=4, size=40)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
        # The suite may skip registration for speed elsewhere; here it is what is tested.
        patch.setattr(resnet50_tb_full, "register_servable_model", tracking.register_servable_model)
        resnet50_tb_full.main(
            ["--data-dir", str(data), "--checkpoint-dir", str(root / "ckpt"), "--tracking-uri", uri, *TINY,
             *"--epochs 1 --val-fraction 0.3 --temperature-scaling --registered-model".split(), REGISTERED]
        )  # fmt: skip
    return {"root": root, "uri": uri, "best": root / "ckpt" / "best_resnet50_tb_full_trained.pth",
            "console": console.getvalue()}  # fmt: skip


@pytest.fixture(scope="module")
def classifier(registered_run) -> TuberculosisClassifier:
    model = TuberculosisClassifier()
    model.load_context(
        PythonModelContext(artifacts={CHECKPOINT_ARTIFACT: str(registered_run["best"])}, model_config={})
    )
    return model


def encoded(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def generated_dicom(path: Path) -> Path:
    """A 12-bit DICOM radiograph with a window, saved without an extension (DICOM is told by its content)."""
    rng = np.random.default_rng(3)
    return save(dicom_dataset(rng.integers(0, 4096, (64, 56)), window=(2048, 4096)), path)


def xray_files(tmp_path: Path) -> list[Path]:
    """A real chest X-ray JPEG and a real chest DICOM without extension (ACR-NEMA, 10 bits, MONOCHROME1) from
    ../shared/data; generated ones in a clone without it (under CI its absence fails)."""
    if not SHARED_DATA.is_dir() and not os.environ.get("CI"):
        return [write_xrays(tmp_path / "png", 1, tuberculosis=True)[0], generated_dicom(tmp_path / "scan")]
    jpeg = sorted((shared_data("tb-cxr-mini") / "test" / "Tuberculosis").glob("*.jpg"))[0]
    return [jpeg, shared_data("dicom-chest") / "cr_mono1_10bit_acrnema_noext"]


def predictor_probabilities(checkpoint_path: Path, files: list[Path]) -> list[float]:
    """P(TB) of each file as batch prediction computes it (Predictor on the CPU, one image at a time)."""
    predictor = Predictor.from_checkpoint(checkpoint_path, "cpu")
    return [float(predictor.probabilities(image_tensor(path, predictor.transform)[None])[0]) for path in files]


def assert_answers(answer: pd.DataFrame, checkpoint_path: Path, files: list[Path]) -> None:
    """The checkpoint's P(TB) for each file in request order, decided at its recommended operating point."""
    checkpoint = Checkpoint.load(checkpoint_path)
    threshold = 1 / (1 + math.exp(-checkpoint.operating_threshold))  # stored as log-odds, answered as P(TB)
    assert list(answer.columns) == list(OUTPUT_COLUMNS)
    np.testing.assert_allclose(answer["p_tb"], predictor_probabilities(checkpoint_path, files), rtol=0, atol=1e-5)
    assert list(answer["decision"]) == ["Tuberculosis" if p >= threshold else "Normal" for p in answer["p_tb"]]
    assert list(answer["threshold"]) == pytest.approx([threshold] * len(files), rel=1e-15)
    assert list(answer["operating_point"]) == [checkpoint.recommended_operating_point] * len(files)
    assert list(answer["model_version"]) == [checkpoint_digest(checkpoint_path)] * len(files)


def test_pyfunc_answers_each_image_with_predictions_probability_and_decision(classifier, registered_run, tmp_path):
    files = [write_xrays(tmp_path / "png", 1, tuberculosis=True)[0], generated_dicom(tmp_path / "scan")]
    answer = classifier.predict(None, pd.DataFrame({"image": [encoded(path) for path in files]}))
    assert_answers(answer, registered_run["best"], files)


@pytest.mark.parametrize(
    "request_frame, reason",
    [
        (lambda good, files: pd.DataFrame({"picture": [good]}), "needs a column `image`"),
        (
            lambda good, files: pd.DataFrame({"image": [good, "not base64 at all!"]}),
            "row 1: `image` is not valid base64",
        ),
        (lambda good, files: pd.DataFrame({"image": [good, None]}), "row 1: `image` must hold a base64-encoded"),
        (lambda good, files: pd.DataFrame({"image": [encoded(files["text"])]}), "row 0: not a usable chest X-ray"),
        (lambda good, files: pd.DataFrame({"image": [encoded(files["colour"])]}), "colour image"),
    ],
    ids=["no-image-column", "not-base64", "missing-value", "not-an-image", "colour-photo"],
)
def test_malformed_request_is_a_400_error_naming_the_reason(classifier, tmp_path, request_frame, reason):
    good = encoded(write_xrays(tmp_path / "png", 1, tuberculosis=False)[0])
    (text := tmp_path / "notes.txt").write_text("patient history, not a picture\n")
    colour = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(colour)
    with pytest.raises(MlflowException) as raised:
        classifier.predict(None, request_frame(good, {"text": text, "colour": colour}))
    assert raised.value.get_http_status_code() == 400
    assert reason in raised.value.message


def test_unreachable_store_skips_registration_with_one_warning(registered_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    gone = tracking.RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, tmp_path / "pending.jsonl")
    assert tracking.register_servable_model(gone, registered_run["best"], REGISTERED) == ""
    warning = capsys.readouterr().err.strip()
    assert gone.offline and len(warning.splitlines()) == 1 and "not registered" in warning
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before  # the store choice of later runs is unchanged
    # The registry holds only the trainer's version.
    versions = MlflowClient(registered_run["uri"]).search_model_versions(f"name='{REGISTERED}'")
    assert [int(version.version) for version in versions] == [1]


def test_resuming_the_finished_run_registers_no_second_version(registered_run, monkeypatch, capsys):
    monkeypatch.setattr(resnet50_tb_full, "register_servable_model", tracking.register_servable_model)
    last = registered_run["root"] / "ckpt" / "last.pth"
    resnet50_tb_full.main(["--resume", str(last)])
    console = capsys.readouterr()
    assert "That run had already finished; nothing left to train." in console.out
    assert "stopped answering" not in console.err  # the store was asked, not given up on
    client = MlflowClient(registered_run["uri"])
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert [int(version.version) for version in versions] == [1]
    assert client.get_run(Checkpoint.load(last).mlflow_run_id).info.status == "FINISHED"


def test_requirements_pin_what_is_installed_and_leave_out_what_is_not():
    # A distribution installed under another name (conda's opencv) once crashed the end of a finished run.
    assert tracking.installed_pin("numpy") == f"numpy=={np.__version__}"
    assert tracking.installed_pin("opencv-python-from-elsewhere") == ""


def post(port: int, images: list[str] | None = None, body: dict | None = None) -> requests.Response:
    session = requests.Session()
    session.trust_env = False  # loopback: never through a proxy
    body = body if body is not None else {"dataframe_records": [{"image": image} for image in images]}
    return session.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)


def wait_until_serving(port: int, process: subprocess.Popen, log: Path) -> None:
    session = requests.Session()
    session.trust_env = False
    deadline = time.time() + 240
    while time.time() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(requests.ConnectionError):
            if session.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                return
        time.sleep(1)
    pytest.fail("mlflow models serve did not start:\n" + log.read_text()[-3000:])


def test_served_registered_model_answers_real_xrays_and_survives_bad_requests(registered_run, tmp_path):
    found = SERVE_LINE.search(registered_run["console"])
    assert found, registered_run["console"][-2000:]
    assert found[1] == REGISTERED
    command = found[3].split()  # the command the trainer printed, on a free port
    port = free_port()
    command[command.index("-p") + 1] = str(port)
    files = xray_files(tmp_path)
    # Started outside the repository and without PYTHONPATH: the model must bring its own code. As from an
    # activated environment: mlflow starts the `uvicorn` on the PATH.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = registered_run["uri"]
    log = tmp_path / "serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_serving(port, process, log)
        images = [encoded(path) for path in files]
        answered = post(port, images)
        assert answered.status_code == 200, answered.text
        assert_answers(pd.DataFrame(answered.json()["predictions"]), registered_run["best"], files)

        not_base64 = post(port, ["not base64 at all!"])
        assert not_base64.status_code == 400
        assert "`image` is not valid base64" in not_base64.json()["message"]
        no_column = post(port, body={"dataframe_records": [{"picture": images[0]}]})
        assert no_column.status_code == 400 and "image" in no_column.json()["message"]

        again = post(port, images)
        assert again.status_code == 200
        assert again.json() == answered.json()
    finally:
        stop_process_group(process)
