"""The servable MLflow model: the trainer registers a pyfunc that takes X-ray files (base64) and answers
P(TB) and decisions; a real `mlflow models serve` of the registered version gives an image the P(TB) that
prediction gives it, answers an unusable image's row with its reason and every other row, refuses a request
without images or over the size limit with HTTP 400 and the reason, keeps serving, and gives concurrent
clients the prediction CSV's answers. Exact float32 is set once for the serving process."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from conftest import SHARED_DATA, TINY, free_port, make_organized, shared_data, stop_process_group, write_xrays
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from mlflow.tracking import MlflowClient
from PIL import Image
from test_decoding import dicom_dataset, save
from test_runtime import precision_flags

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full
from tbcxr import model_registry, serving, tracking
from tbcxr.checkpoint import Checkpoint
from tbcxr.predict import Predictor, checkpoint_digest, image_tensor
from tbcxr.serving import CHECKPOINT_ARTIFACT, CHUNK, MAX_REQUEST_IMAGES, OUTPUT_COLUMNS, TuberculosisClassifier

REGISTERED = "tb_serving_test"
SERVE_LINE = re.compile(r"^Registered model (\S+) version (\d+) \(serve: (mlflow models serve .+)\)$", re.MULTILINE)


@pytest.fixture(scope="module", autouse=True)
def precision_restored():
    """The served model sets exact float32 for good; the rest of the suite finds the flags as they were."""
    saved = (*precision_flags(), torch.backends.cudnn.benchmark)
    yield
    conv, matmul, torch.backends.cudnn.benchmark = saved
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul


@pytest.fixture(scope="module")
def registered_run(tmp_path_factory):
    """A tiny one-epoch run whose trainer registered its best checkpoint as a servable model; its console."""
    root = tmp_path_factory.mktemp("registered_run")
    data = make_organized(root / "data", train=8, test=4, size=40)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
        # The suite may skip registration for speed elsewhere; here it is what is tested.
        patch.setattr(resnet50_tb_full, "register_servable_model", model_registry.register_servable_model)
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
    assert list(answer["status"]) == ["ok"] * len(files)
    np.testing.assert_allclose(
        answer["p_tb"].astype(float), predictor_probabilities(checkpoint_path, files), rtol=0, atol=1e-5
    )
    assert list(answer["decision"]) == ["Tuberculosis" if p >= threshold else "Normal" for p in answer["p_tb"]]
    assert list(answer["threshold_p_tb"]) == pytest.approx([threshold] * len(files), rel=1e-15)
    assert list(answer["operating_point"]) == [checkpoint.recommended_operating_point] * len(files)
    assert list(answer["model_version"]) == [checkpoint_digest(checkpoint_path)] * len(files)


def test_pyfunc_answers_each_image_with_predictions_probability_and_decision(classifier, registered_run, tmp_path):
    files = [write_xrays(tmp_path / "png", 1, tuberculosis=True)[0], generated_dicom(tmp_path / "scan")]
    answer = classifier.predict(None, pd.DataFrame({"image": [encoded(path) for path in files]}))
    assert_answers(answer, registered_run["best"], files)


def test_base64_with_line_breaks_is_accepted(classifier, registered_run, tmp_path):
    files = write_xrays(tmp_path / "png", 2, tuberculosis=True)
    wrapped = [base64.encodebytes(path.read_bytes()).decode() for path in files]  # 76 characters a line, as base64
    assert all("\n" in value.strip() for value in wrapped)
    wrapped[1] = wrapped[1].replace("\n", "\r\n")  # as from Windows
    assert_answers(classifier.predict(None, pd.DataFrame({"image": wrapped})), registered_run["best"], files)


def odd_uploads(tmp_path: Path) -> dict[str, str]:
    (text := tmp_path / "notes.txt").write_text("patient history, not a picture\n")
    colour = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(colour)
    return {"text": encoded(text), "colour": encoded(colour)}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("not base64 at all!", "`image` is not valid base64"),
        (None, "`image` must hold a base64-encoded image file"),
        ("text", "cannot identify image file"),
        ("colour", "colour image, not a greyscale radiograph"),
    ],
    ids=["not-base64", "missing-value", "not-an-image", "colour-photo"],
)
def test_an_unusable_row_gets_its_reason_and_every_other_row_its_answer(classifier, registered_run, tmp_path, bad,
                                                                        reason):  # fmt: skip
    files = write_xrays(tmp_path / "png", 2, tuberculosis=False)
    bad = odd_uploads(tmp_path).get(bad, bad)
    answer = classifier.predict(None, pd.DataFrame({"image": [encoded(files[0]), bad, encoded(files[1])]}))
    assert_answers(answer.iloc[[0, 2]], registered_run["best"], files)
    row = answer.iloc[1]
    assert row["status"].startswith("unreadable: ") and reason in row["status"]
    assert (row["p_tb"], row["log_odds"], row["decision"]) == (None, None, None)
    threshold = Checkpoint.load(registered_run["best"]).operating_threshold  # log-odds
    assert row["threshold_log_odds"] == threshold
    assert row["threshold_p_tb"] == pytest.approx(1 / (1 + math.exp(-threshold)), rel=1e-15)


def test_a_request_without_an_image_column_or_over_the_limit_is_a_400_naming_it(classifier, tmp_path):
    good = encoded(write_xrays(tmp_path / "png", 1, tuberculosis=False)[0])
    for request, reason in (
        (pd.DataFrame({"picture": [good]}), "needs a column `image`"),
        (pd.DataFrame({"image": [good] * (MAX_REQUEST_IMAGES + 1)}), f"at most {MAX_REQUEST_IMAGES} are scored"),
    ):
        with pytest.raises(MlflowException) as raised:
            classifier.predict(None, request)
        assert raised.value.get_http_status_code() == 400
        assert reason in raised.value.message
    assert len(classifier.predict(None, pd.DataFrame({"image": [good] * MAX_REQUEST_IMAGES}))) == MAX_REQUEST_IMAGES


def test_a_request_is_decoded_and_scored_one_chunk_at_a_time(classifier, tmp_path, monkeypatch):
    """A long request never holds more than one chunk of decoded images."""
    good = encoded(write_xrays(tmp_path / "png", 1, tuberculosis=False)[0])
    decoded, scored, held = [], [], []
    monkeypatch.setattr(serving, "image_tensor", lambda *args, **kw: decoded.append(1) or image_tensor(*args, **kw))
    log_odds = classifier.predictor.log_odds

    def scoring(batch):
        held.append(len(decoded) - len(scored))  # decoded and not yet scored when this batch is scored
        scored.extend([1] * len(batch))
        return log_odds(batch)

    monkeypatch.setattr(classifier.predictor, "log_odds", scoring)
    count = 2 * CHUNK + 3
    assert len(classifier.predict(None, pd.DataFrame({"image": [good] * count}))) == count
    assert held == [CHUNK, CHUNK, 3]


def test_exact_float32_is_set_once_and_no_request_switches_it_off_under_another(registered_run, tmp_path):
    """The scoring server runs requests in threads: request A finishing while B is mid-forward must not
    restore TF32 under B (a P(TB) differing from the CSV's on an Ampere GPU, silently)."""
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"  # as on Ampere
    model = TuberculosisClassifier()
    model.load_context(
        PythonModelContext(artifacts={CHECKPOINT_ARTIFACT: str(registered_run["best"])}, model_config={})
    )
    assert precision_flags() == ("ieee", "ieee") and not torch.backends.cudnn.benchmark
    request = pd.DataFrame({"image": [encoded(write_xrays(tmp_path / "png", 1, tuberculosis=False)[0])]})
    a_in_forward, b_in_forward, a_done = threading.Event(), threading.Event(), threading.Event()
    seen_by_b = []

    def forward_started(module, args):
        if threading.current_thread().name == "A":
            a_in_forward.set()
            b_in_forward.wait(30)  # A stays in its forward pass until B is in its own
        else:
            b_in_forward.set()
            a_done.wait(30)  # B's forward pass goes on after A has answered
            seen_by_b.append(precision_flags())

    def request_a():
        model.predict(None, request)
        a_done.set()

    def request_b():
        a_in_forward.wait(30)
        model.predict(None, request)

    hook = model.predictor.model.register_forward_pre_hook(forward_started)
    threads = [threading.Thread(target=request_a, name="A"), threading.Thread(target=request_b, name="B")]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        hook.remove()
    assert a_done.is_set() and seen_by_b == [("ieee", "ieee")]
    assert precision_flags() == ("ieee", "ieee")


def test_unreachable_store_skips_registration_with_one_warning(registered_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    gone = tracking.RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, tmp_path / "pending.jsonl")
    assert model_registry.register_servable_model(gone, registered_run["best"], REGISTERED) == ""
    warning = capsys.readouterr().err.strip()
    assert gone.offline and len(warning.splitlines()) == 1 and "not registered" in warning
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before  # the store choice of later runs is unchanged
    # The registry holds only the trainer's version.
    versions = MlflowClient(registered_run["uri"]).search_model_versions(f"name='{REGISTERED}'")
    assert [int(version.version) for version in versions] == [1]


def test_resuming_the_finished_run_registers_no_second_version(registered_run, monkeypatch, capsys):
    monkeypatch.setattr(resnet50_tb_full, "register_servable_model", model_registry.register_servable_model)
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
    assert model_registry.installed_pin("numpy") == f"numpy=={np.__version__}"
    assert model_registry.installed_pin("opencv-python-from-elsewhere") == ""


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


@pytest.fixture(scope="module")
def served(registered_run, tmp_path_factory):
    """The registered model served by `mlflow models serve` as the trainer's last line says, on a free port."""
    found = SERVE_LINE.search(registered_run["console"])
    assert found, registered_run["console"][-2000:]
    assert found[1] == REGISTERED
    command = found[3].split()  # the command the trainer printed, on a free port
    port = free_port()
    command[command.index("-p") + 1] = str(port)
    folder = tmp_path_factory.mktemp("served")
    # Started outside the repository and without PYTHONPATH: the model must bring its own code. As from an
    # activated environment: mlflow starts the `uvicorn` on the PATH.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = registered_run["uri"]
    log = folder / "serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_serving(port, process, log)
        yield port
    finally:
        stop_process_group(process)


def test_served_registered_model_answers_real_xrays_and_survives_bad_requests(served, registered_run, tmp_path):
    files = xray_files(tmp_path)
    images = [encoded(path) for path in files]
    answered = post(served, images)
    assert answered.status_code == 200, answered.text
    assert_answers(pd.DataFrame(answered.json()["predictions"]), registered_run["best"], files)

    with_bad_row = post(served, [images[0], "not base64 at all!"])
    assert with_bad_row.status_code == 200
    good, bad = with_bad_row.json()["predictions"]
    alone = answered.json()["predictions"][0]  # scored in another batch: float32 rounding may differ
    rounding = {key: pytest.approx(alone[key], abs=1e-5) for key in ("p_tb", "log_odds")}
    assert good == alone | rounding
    assert bad["status"].startswith("unreadable: `image` is not valid base64") and bad["p_tb"] is None
    no_column = post(served, body={"dataframe_records": [{"picture": images[0]}]})
    assert no_column.status_code == 400 and "image" in no_column.json()["message"]
    too_many = post(served, [images[0]] * (MAX_REQUEST_IMAGES + 1))
    assert too_many.status_code == 400
    assert (
        f"holds {MAX_REQUEST_IMAGES + 1} images; at most {MAX_REQUEST_IMAGES} are scored" in too_many.json()["message"]
    )

    again = post(served, images)
    assert again.status_code == 200
    assert again.json() == answered.json()


def test_concurrent_clients_all_get_the_prediction_csvs_answers(served, registered_run, tmp_path):
    """A bounded load test on 127.0.0.1: 6 clients send 240 requests of 1 to 3 images (among them a colour photo
    that prediction leaves out); every answer is the prediction CSV's for that file, and none fails."""
    folder = tmp_path / "images"
    write_xrays(folder / "Normal", 3, tuberculosis=False, size=40, seed=60)
    write_xrays(folder / "Tuberculosis", 3, tuberculosis=True, size=40, seed=60)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "Normal" / "photo.png")
    predictions = tmp_path / "predictions.csv"
    gradcam.main(["--checkpoint", str(registered_run["best"]), "--images", str(folder), "--predictions",
                  str(predictions), "--num-workers", "0"])  # fmt: skip
    with open(predictions, newline="") as f:
        expected = {row["path"]: row for row in csv.DictReader(f)}
    uploads = {name: encoded(folder / name) for name in expected}
    plans = [list(rng.choice(sorted(uploads), size=rng.integers(1, 4))) for _ in range(240)]
    with ThreadPoolExecutor(max_workers=6) as clients:
        answers = list(clients.map(lambda plan: post(served, [uploads[name] for name in plan]), plans))
    assert [answer.status_code for answer in answers if answer.status_code != 200] == []
    for plan, answer in zip(plans, answers):
        rows = answer.json()["predictions"]
        assert len(rows) == len(plan)
        for name, row in zip(plan, rows):
            assert (row["status"], row["decision"] or "") == (expected[name]["status"], expected[name]["decision"])
            if row["status"] == "ok":  # the CSV prints 6 decimals
                assert abs(row["p_tb"] - float(expected[name]["p_tb"])) <= 1e-6
            else:
                assert row["p_tb"] is None and expected[name]["p_tb"] == ""
    assert sum(row["status"] != "ok" for answer in answers for row in answer.json()["predictions"]) > 0
