"""Faults injected for real: kills, interrupts, failed writes, a dying MLflow server,
diverging losses, bad and unusual images, leaks, bad flags and hostile checkpoints."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    exits_with,
    free_port,
    learning_metrics,
    make_organized,
    start_mlflow_server,
    stop_process_group,
)
from mlflow.tracking import MlflowClient
from PIL import Image

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint, RunState, write_json
from tbcxr.config import MANIFEST_NAME, PENDING_RECORDS_NAME
from tbcxr.data import PreparationSettings, prepare_manifest
from tbcxr.data_quality import scan_images
from tbcxr.decoding import load_xray
from tbcxr.demo import synthetic_xray
from tbcxr.errors import DataError, DataLayoutError, WeightsUnavailableError
from tbcxr.layout import discover_dataset
from tbcxr.model import build_model
from tbcxr.split import make_split_manifest, split_digest
from tbcxr.tracking import start_run

TINY = [*"--image-size 32 --batch-size 8 --num-workers 0 --weights none --recipe original --seed 3".split()]


def cli(*args) -> list[str]:
    return [sys.executable, str(ROOT / "resnet50_tb_full.py"), *args]


def spawn(args, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        cli(*args),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=log.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )


def wait_for_epoch_checkpoint(last: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    """Block until last.pth has been replaced after its epoch-0 version, i.e. epoch 1 is saved."""
    inodes, deadline = set(), time.time() + timeout
    while len(inodes) < 2:
        assert process.poll() is None, "training ended before its first epoch was saved"
        assert time.time() < deadline, "no epoch checkpoint in time"
        if last.exists():
            inodes.add(last.stat().st_ino)
        time.sleep(0.02)


def history(checkpoint_path: Path) -> list[dict]:
    return torch.load(checkpoint_path, map_location="cpu", weights_only=True)["history"]


def steps(client: MlflowClient, run_id: str, key: str = "val_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture
def data(tmp_path):
    return make_organized(tmp_path / "data", train=24, test=4, size=40)


# --------------------------------------------------------------------------- 1. SIGKILL, resume
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--data-dir", str(data), "--epochs", "3", "--deterministic", "--tracking-uri", uri, *TINY]
    reference = subprocess.run(
        cli(*common, "--checkpoint-dir", str(tmp_path / "reference")), capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    last = tmp_path / "killed" / "last.pth"
    process = spawn([*common, "--checkpoint-dir", str(tmp_path / "killed")], tmp_path / "killed.log")
    wait_for_epoch_checkpoint(last, process)
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert 1 <= saved["epoch"] < 3 and not saved["completed"]

    resumed = subprocess.run(cli("--resume", str(last)), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from {last} after epoch {saved['epoch']}" in resumed.stdout

    expected = learning_metrics(history(tmp_path / "reference" / "last.pth"))
    got = learning_metrics(history(last))
    assert [h["epoch"] for h in got] == [1, 2, 3]
    for want, have in zip(expected, got):
        assert have == pytest.approx(want, rel=1e-6, abs=1e-9)
    client = MlflowClient(uri)
    assert steps(client, saved["mlflow_run_id"]) == [1, 2, 3]  # same run, no duplicate or missing epoch
    assert steps(client, saved["mlflow_run_id"], "train_loss") == [1, 2, 3]
    assert client.get_run(saved["mlflow_run_id"]).info.status == "FINISHED"


# --------------------------------------------------------------------------- 2. Ctrl-C
def test_ctrl_c_saves_marks_run_killed_and_prints_resume_command(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    last = tmp_path / "ckpt" / "last.pth"
    log = tmp_path / "train.log"
    process = spawn(
        [
            "--data-dir",
            str(data),
            "--epochs",
            "50",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--tracking-uri",
            uri,
            *TINY,
        ],
        log,
    )
    wait_for_epoch_checkpoint(last, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130

    output = log.read_text()
    assert f"python resnet50_tb_full.py --resume {last}" in output
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] >= 1
    assert MlflowClient(uri).get_run(saved["mlflow_run_id"]).info.status == "KILLED"
    assert "Traceback" not in output


def test_ctrl_c_during_a_sqlite_write_waits_for_it_and_the_run_is_still_marked_killed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = start_run(uri, "interrupts", "run", {"epochs": 2}, tmp_path / PENDING_RECORDS_NAME)
    log_batch = logger.client.log_batch

    def interrupted_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands while the metrics are being written
        return log_batch(*args, **kwargs)

    monkeypatch.setattr(logger.client, "log_batch", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        logger.log_metrics({"val_loss": 0.5}, step=1)
    logger.set_status("KILLED")  # what the trainer's Ctrl-C handler does next

    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(logger.run_id, "val_loss")] == [0.5]
    assert client.get_run(logger.run_id).info.status == "KILLED" and not logger.offline


def test_ctrl_c_inside_a_checkpoint_write_finishes_the_file_then_interrupts(tmp_path, monkeypatch):
    """Cut inside torch.save, the interrupt would surface as a RuntimeError from its C++ writer: the trainer
    then exited 1 with a traceback and never marked the run KILLED (seen once in CI)."""
    real_save, writes = torch.save, []

    class InterruptedFile:  # what torch.save writes through; Ctrl-C lands after a few blocks
        def __init__(self, file):
            self.file = file

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, InterruptedFile(f)))
    checkpoint = Checkpoint.from_model(build_model("none"), {}, 32, state=RunState(epoch=4))
    path = tmp_path / "last.pth"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path)
    assert len(writes) > 3  # the write went on after the interrupt
    monkeypatch.undo()
    assert Checkpoint.load(path).state.epoch == 4  # and the file is whole


def test_resuming_a_run_killed_after_it_stopped_early_trains_no_more_epochs(tmp_path, data, capsys):
    ckpt = tmp_path / "ckpt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer.main(
        ["--data-dir", str(data), "--epochs", "2", "--checkpoint-dir", str(ckpt), "--tracking-uri", uri, *TINY]
    )
    # As if killed while finishing after early stopping: the patience used up, the run not yet completed.
    saved = Checkpoint.load(ckpt / "last.pth")
    saved.state.stale_epochs, saved.state.completed = 7, False
    saved.save(ckpt / "last.pth")
    capsys.readouterr()

    summary = trainer.main(["--resume", str(ckpt / "last.pth"), "--epochs", "10"])

    out = capsys.readouterr().out
    assert "Epoch 3:" not in out and "Early stopping: no better validation AUC for 7 epochs" in out
    assert summary["epochs_trained"] == 2 and history(ckpt / "last.pth") == saved.state.history


# --------------------------------------------------------------------------- 3. atomic writes
def test_failed_checkpoint_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "last.pth"
    Checkpoint({"w": torch.ones(1000)}, {}, 32, 0, RunState(epoch=1)).save(path)

    # A lambda cannot be pickled: torch.save fails half-way through the write.
    with pytest.raises((pickle.PicklingError, AttributeError)):
        Checkpoint({"w": torch.zeros(10**6)}, {"broken": lambda: None}, 32, 0, RunState(epoch=2)).save(path)

    kept = Checkpoint.load(path)
    assert kept.state.epoch == 1 and torch.equal(kept.model_state["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_kill_during_checkpoint_writes_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "last.pth"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import torch\nfrom tbcxr.checkpoint import Checkpoint, RunState\n"
                "for i in range(10**6):\n"
                f"    Checkpoint({{'w': torch.full((4_000_000,), float(i))}}, {{}}, 32, 0, RunState(epoch=i))"
                f".save({str(path)!r})\n"
            ),
        ],
        cwd=ROOT,
    )
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)

    kept = Checkpoint.load(path)
    assert kept.state.epoch >= 0 and torch.all(kept.model_state["w"] == kept.state.epoch)


# --------------------------------------------------------------------------- 4. MLflow server dies
def test_mlflow_server_dying_mid_run_loses_nothing(tmp_path, data):
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "train.log"
    try:
        process = spawn(
            [
                "--data-dir",
                str(data),
                "--epochs",
                "3",
                "--checkpoint-dir",
                str(ckpt),
                "--tracking-uri",
                uri,
                "--experiment",
                "dies",
                *TINY,
            ],
            log,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        )  # fail over at once: the test need not wait
        wait_for_epoch_checkpoint(ckpt / "last.pth", process)
        stop_process_group(server, signal.SIGKILL)
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(server, signal.SIGKILL)

    output = log.read_text()
    assert output.count("stopped answering") == 1
    assert (ckpt / "summary.json").is_file() and (ckpt / "best_resnet50_tb_full_trained.pth").is_file()
    pending = ckpt / PENDING_RECORDS_NAME
    assert pending.is_file() and "test_auc" in pending.read_text()

    server = start_mlflow_server(store, port)  # the server comes back with the same store
    try:
        resumed = subprocess.run(cli("--resume", str(ckpt / "last.pth")), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "queued records replayed" in resumed.stdout
        run_id = torch.load(ckpt / "last.pth", weights_only=True)["mlflow_run_id"]
        client = MlflowClient(uri)
        assert steps(client, run_id) == [1, 2, 3]
        run = client.get_run(run_id)
        assert "test_auc" in run.data.metrics and run.info.status == "FINISHED"
        assert {"summary.json", "test"} <= {a.path for a in client.list_artifacts(run_id)}
        assert not pending.exists()
    finally:
        stop_process_group(server)


# --------------------------------------------------------------------------- 5, 6. NaN loss, OOM
def test_non_finite_loss_stops_with_epoch_and_batch_and_keeps_best(tmp_path, data, capsys):
    args = [
        "--data-dir",
        str(data),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *TINY,
    ]
    trainer.main([*args, "--epochs", "1"])
    best = tmp_path / "ckpt" / "best_resnet50_tb_full_trained.pth"
    before = best.read_bytes()

    # A corrupted initial-weights file: one NaN in layer4 makes every loss NaN.
    state = build_model("none").state_dict()
    state["layer4.2.conv3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "corrupt.pth")
    with exits_with(capsys, r"became nan at epoch 1, batch 1\. .*--lr.*--no-amp"):
        trainer.main([*args, "--epochs", "2", "--weights", str(tmp_path / "corrupt.pth")])
    assert best.read_bytes() == before


def test_out_of_memory_gives_the_seeds_memory_advice(tmp_path, data, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_one_epoch", out_of_memory)
    with exits_with(capsys, r"out of GPU memory(.|\n)*--batch-size 8 and --amp"):
        trainer.main(
            [
                "--data-dir",
                str(data),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--epochs",
                "1",
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                *TINY,
            ]
        )


# --------------------------------------------------------------------------- bad input
def corrupt_files(folder: Path) -> dict[str, Path]:
    source = Image.fromarray(synthetic_xray(np.random.default_rng(9), 40, True), mode="L")
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG")
    files = {
        "truncated": folder / "truncated.jpg",
        "empty": folder / "empty.png",
        "text": folder / "text.png",
        "jpeg_as_png": folder / "jpeg_named.png",
    }
    files["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image")
    files["jpeg_as_png"].write_bytes(buffer.getvalue())  # valid JPEG content: decoded by content, kept
    return files


def prepare(data, tmp_path, strict: bool = False, dedup: bool = False) -> dict:
    """The trainer's data preparation with its default fractions and seed."""
    defaults = trainer.TrainConfig()
    settings = PreparationSettings(defaults.val_fraction, defaults.test_fraction, defaults.seed, strict, dedup)
    return prepare_manifest(str(data), tmp_path / "manifest.json", settings, workers=2)


def test_unreadable_files_are_listed_once_and_skipped_or_refused(tmp_path, data, capsys):
    files = corrupt_files(data / "train" / "Tuberculosis")
    manifest = prepare(data, tmp_path)

    unreadable = {Path(rel).name for rel, _ in manifest["unreadable"]}
    assert unreadable == {"truncated.jpg", "empty.png", "text.png"}
    used = {Path(rel).name for side in ("train", "val", "test") for rel, _ in manifest[side]}
    assert "jpeg_named.png" in used and not unreadable & used
    stderr = capsys.readouterr().err
    assert stderr.count("WARNING: skipping 3 image files") == 1
    assert all(str(files[k]) in stderr for k in ("truncated", "empty", "text"))

    with pytest.raises(DataError, match="3 image files cannot be read"):
        prepare(data, tmp_path, strict=True)


def test_class_left_empty_after_skipping_is_an_error(tmp_path, data):
    for path in (data / "test" / "Tuberculosis").iterdir():
        path.write_bytes(b"")
    with pytest.raises(
        DataLayoutError, match="no Tuberculosis images left on the test side once unreadable files were skipped"
    ):
        prepare(data, tmp_path)


def exif_rotated_png(pixels: np.ndarray, path: Path) -> None:
    """Store the picture rotated, with an EXIF orientation tag that rotates it back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(np.rot90(pixels, k=1).copy(), mode="L").save(path, exif=exif)


@pytest.mark.parametrize("variant", ["16bit", "rgba", "palette", "cmyk_jpeg", "exif_rotated", "large"])
def test_unusual_images_decode_to_the_same_greyscale(tmp_path, variant):
    size = 2400 if variant == "large" else 64
    pixels = synthetic_xray(np.random.default_rng(11), size, tuberculosis=True)
    path = tmp_path / f"{variant}.png"
    tolerance = 0
    if variant == "16bit":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(path)
        assert Image.open(path).mode.startswith("I")
    elif variant == "rgba":
        Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), mode="RGBA").save(path)
    elif variant == "palette":
        Image.fromarray(pixels, mode="L").convert("P").save(path)
    elif variant == "cmyk_jpeg":
        path = tmp_path / "cmyk.jpg"
        Image.fromarray(pixels, mode="L").convert("CMYK").save(path, quality=100)
        tolerance = 6  # lossy JPEG
    elif variant == "exif_rotated":
        exif_rotated_png(pixels, path)
    else:
        Image.fromarray(pixels, mode="L").save(path)

    loaded = load_xray(path)

    expected = pixels
    if variant == "16bit":  # every 16-bit image gets the same 0.5-99.5 percentile window, whatever its maximum
        black, white = np.percentile(pixels.astype(float) * 257, [0.5, 99.5])
        expected = np.clip((pixels * 257.0 - black) * (255.0 / (white - black)) + 0.5, 0, 255).astype(np.uint8)
    assert loaded.mode == "L" and loaded.size == (size, size)
    assert np.abs(np.asarray(loaded, dtype=int) - expected).max() <= tolerance


def test_decompression_bomb_limit_is_kept(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((200, 200), np.uint8), mode="L").save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels is over twice the limit
    scan = scan_images([str(tmp_path / "bomb.png")])
    assert "DecompressionBombError" in scan.unreadable[str(tmp_path / "bomb.png")]


def test_duplicates_across_splits_are_reported_and_dedup_removes_them(tmp_path, data, capsys):
    train_image = sorted((data / "train" / "Normal").iterdir())[0]
    exact = data / "test" / "Normal" / "copy_of_train.png"
    exact.write_bytes(train_image.read_bytes())
    near = data / "test" / "Normal" / "brighter_train.png"
    brighter = np.asarray(Image.open(train_image), dtype=int) + 6
    Image.fromarray(np.clip(brighter, 0, 255).astype(np.uint8), mode="L").save(near)

    manifest = prepare(data, tmp_path)
    test_leaks = {(leak["kind"], Path(leak["test"]).name) for leak in manifest["leaks"] if "test" in leak}
    assert ("exact", "copy_of_train.png") in test_leaks and ("near", "brighter_train.png") in test_leaks
    assert "near-duplicate pairs" in capsys.readouterr().err

    deduped = prepare(data, tmp_path, dedup=True)
    test_names = {Path(rel).name for rel, _ in deduped["test"]}
    assert not {"copy_of_train.png", "brighter_train.png"} & test_names
    assert len(deduped["train"]) == len(manifest["train"])  # train keeps its copy


def test_a_test_side_left_without_tuberculosis_once_copies_go_is_an_error(tmp_path, data):
    tb_train = sorted((data / "train" / "Tuberculosis").iterdir())
    for i, image in enumerate(sorted((data / "test" / "Tuberculosis").iterdir())):  # each a copy of a training image
        image.write_bytes(tb_train[i].read_bytes())
    with pytest.raises(
        DataLayoutError,
        match="no Tuberculosis images left on the test side once copies of training or validation images",
    ):
        prepare(data, tmp_path)


@pytest.mark.parametrize(
    "flag, value, complaint",
    [
        ("--epochs", "-1", "must be a positive integer"),
        ("--val-fraction", "1.5", "must lie strictly between 0 and 1"),
        ("--device", "tpu", "invalid choice"),
        ("--image-size", "16", "must be at least 32"),
    ],
)
def test_wrong_cli_values_fail_in_argparse(flag, value, complaint, capsys):
    with pytest.raises(SystemExit) as error:
        trainer.config_from_args([flag, value])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and complaint in err


def test_outputs_inside_the_data_folder_are_refused(tmp_path, data, capsys):
    with exits_with(capsys, "inside the data folder"):
        trainer.main(["--data-dir", str(data), "--checkpoint-dir", str(data / "ckpt"), *TINY])
    manifest = make_split_manifest(discover_dataset(data), 0.2, 0.2, seed=0)
    write_json(manifest, tmp_path / "ckpt" / MANIFEST_NAME)
    model = build_model("none")
    Checkpoint.from_model(model, {}, 32, split_digest=split_digest(manifest)).save(tmp_path / "ckpt" / "best.pth")
    with exits_with(capsys, "inside the data folder"):
        gradcam.main(["--checkpoint", str(tmp_path / "ckpt" / "best.pth"), "--output-dir", str(data / "cams")])
    assert not (data / "ckpt").exists() and not (data / "cams").exists()


# --------------------------------------------------------------------------- security
class RunsCodeOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_that_would_run_code_are_refused_by_both_scripts(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"format": 1, "model": RunsCodeOnLoad(marker)}, evil)

    for run in (lambda: trainer.main(["--resume", str(evil)]), lambda: gradcam.main(["--checkpoint", str(evil)])):
        with exits_with(capsys, "safe, readable"):
            run()
    with pytest.raises(WeightsUnavailableError, match="safe, readable"):
        build_model(str(evil))
    assert not marker.exists()
