"""Shared fixtures: tiny generated X-ray folders, the real shared data when present, a check that
the repository is left clean, a real `mlflow server` on a free loopback port, quick MLflow stores and
finished training runs that several tests share.

Speed (the suite runs on 2 cores): in this process, a new sqlite MLflow store starts as a copy of one
store migrated once per session (a migration takes seconds), and the trainer does not log the model to
MLflow (torch.export takes about 10 s a run), except in the tests marked `real_log_model`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tbcxr import metrics  # noqa: E402
from tbcxr.config import CLASS_NAMES  # noqa: E402
from tbcxr.demo import synthetic_xray  # noqa: E402
from tbcxr.tracking import server_answers  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
# Tiny, fast CPU runs: 32 px, small batches, no worker processes, random weights.
TINY_VALIDATION_MINIMUM = 2
TINY = "--image-size 32 --batch-size 8 --num-workers 0 --weights none --recipe original".split()


def repository_files() -> dict[str, int]:
    """{path: modification time} of the files in the repository, less git, environments and caches."""
    unwatched = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "venv"}
    files = {}
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [
            name
            for name in subfolders
            if name not in unwatched
            and not name.startswith(".venv")
            and Path(folder, name) != ROOT / "benchmarks" / "data"
        ]
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, ROOT)] = os.stat(path).st_mtime_ns
    return files


@pytest.fixture(scope="session", autouse=True)
def repository_left_clean():
    """Tests write under pytest's temporary folders only: a sqlite store's default artifact folder
    once put 1.8 GB of MLflow artifacts into the repository."""
    before = repository_files()
    yield
    written = sorted(path for path, modified in repository_files().items() if before.get(path) != modified)
    assert not written, f"the tests wrote {len(written)} files into {ROOT}: {written[:5]}"


def pytest_configure(config):
    config.addinivalue_line("markers", "real_log_model: the trainer logs the model to MLflow for real (torch.export)")


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with every migration applied, made once per session."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("migrated_store")
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlruns").as_uri())
    store.engine.dispose()  # everything written to the file before it is copied
    return folder / "mlflow.db"


def copied_store(folder: Path, migrated: Path) -> str:
    """The URI of a new sqlite store in `folder`, a copy of the migrated one: for subprocesses, which the
    in-process copying of quick_mlflow does not reach."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


# The trainer's MLflow model logging, skipped outside real_log_model tests: the pt2 model (torch.export) and
# the servable pyfunc with its copy of the checkpoint; each stand-in returns what the real one returns offline.
MODEL_LOGGING = {
    "log_model": lambda logger, model, image_size: None,
    "register_servable_model": lambda logger, checkpoint_path, registered_model: "",
}


@pytest.fixture(scope="session", autouse=True)
def quick_mlflow(migrated_store):
    """In this process: a sqlite store MLflow opens for the first time starts as a copy of migrated_store
    (what the migration would have written), the trainer skips logging the model, and a validation side of
    TINY_VALIDATION_MINIMUM images of each class is enough (without a warning) for --temperature-scaling."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.engine import make_url

    import resnet50_tb_full

    original = SqlAlchemyStore.__init__

    def from_migrated_copy(self, db_uri, *args, **kwargs):
        name = make_url(db_uri).database if db_uri.startswith("sqlite") else None
        database = Path(name) if name and name != ":memory:" else None
        new = database is not None and not database.exists() and db_uri not in SqlAlchemyStore._engine_map
        if new and database.parent.is_dir():
            shutil.copyfile(migrated_store, database)
        original(self, db_uri, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SqlAlchemyStore, "__init__", from_migrated_copy)
        # Tiny runs validate on a few images of each class; the tests of that check set the real minimum.
        patch.setattr(metrics, "MINIMUM_VALIDATION_PER_CLASS", TINY_VALIDATION_MINIMUM)
        for name, skipped in MODEL_LOGGING.items():
            if hasattr(resnet50_tb_full, name):  # a refactoring that renames one makes runs slower, not wrong
                patch.setattr(resnet50_tb_full, name, skipped)
        yield


@pytest.fixture(autouse=True)
def real_log_model(request, monkeypatch):
    """Tests marked real_log_model get the trainer's real MLflow model logging."""
    if request.node.get_closest_marker("real_log_model"):
        import resnet50_tb_full
        from tbcxr import model_registry

        for name in MODEL_LOGGING:
            if hasattr(resnet50_tb_full, name):
                monkeypatch.setattr(resnet50_tb_full, name, getattr(model_registry, name))


def shared_data(name: str) -> Path:
    """A folder of ../shared/data. A user's clone lacks it and the test skips; under CI its absence fails."""
    path = SHARED_DATA / name
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI runs beside ../shared/data and must test the real X-rays")
        pytest.skip(f"{path} not present (a user's clone has no ../shared/data)")
    return path


def write_xrays(folder: Path, count: int, tuberculosis: bool, size: int = 48, seed: int = 0) -> list[Path]:
    """Synthetic greyscale PNGs (the demo generator's pictures) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1000 * tuberculosis)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(synthetic_xray(rng, size, tuberculosis), mode="L").save(path)
        paths.append(path)
    return paths


def make_organized(root: Path, train: int = 12, test: int = 4, size: int = 48) -> Path:
    for seed, (split, count) in enumerate((("train", train), ("test", test))):
        for name in CLASS_NAMES:
            write_xrays(root / split / name, count, name == "Tuberculosis", size, seed=seed)
    return root


@pytest.fixture
def organized_data(tmp_path: Path) -> Path:
    return make_organized(tmp_path / "data")


@contextmanager
def exits_with(capsys, pattern: str):
    """The block ends a script as a user sees it: exit status 1 and `pattern` (a regular expression) on stderr."""
    with pytest.raises(SystemExit) as exited:
        yield
    err = capsys.readouterr().err
    assert exited.value.code == 1 and re.search(pattern, err), err[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    """A real MLflow tracking server bound to 127.0.0.1, in its own process group; waits until it answers."""
    log = open(store / "server.log", "a")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not server_answers(f"http://127.0.0.1:{port}"):
        if process.poll() is not None or time.time() > deadline:
            stop_process_group(process)
            pytest.fail("mlflow server did not start:\n" + (store / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    return process


def stop_process_group(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on a free loopback port; yields its URI."""
    store = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    process = start_mlflow_server(store, port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(process)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny 2-epoch training run (temperature scaling on), shared by the evaluation tests."""
    import resnet50_tb_full

    root = tmp_path_factory.mktemp("trained_run")
    data = make_organized(root / "data", train=16, test=6, size=40)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    resnet50_tb_full.main(
        ["--data-dir", str(data), "--checkpoint-dir", str(root / "ckpt"), "--tracking-uri", uri, *TINY,
         *"--epochs 2 --temperature-scaling --val-fraction 0.3".split()]
    )  # fmt: skip
    return {"root": root, "data": data, "uri": uri, "best": root / "ckpt" / "best_resnet50_tb_full_trained.pth"}


@pytest.fixture(scope="session")
def stopped_early_run(tmp_path_factory):
    """A 40 px final-layer run (layer4 maps of 2 x 2) stopped early (patience 1) one epoch after its best: its
    best and last checkpoints hold different weights. Shared by the scoring, --compare and GradCAM tests."""
    import resnet50_tb_full

    root = tmp_path_factory.mktemp("stopped_early_run")
    data = make_organized(root / "data", train=12, test=4, size=48)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summary = resnet50_tb_full.main(
        ["--data-dir", str(data), "--checkpoint-dir", str(root / "ckpt"), "--tracking-uri", uri, *TINY,
         *"--image-size 40 --freeze-features --lr 1e-2 --epochs 6 --early-stop-patience 1 --deterministic".split()]
    )  # fmt: skip
    ckpt = root / "ckpt"
    return {"root": root, "data": data, "uri": uri, "summary": summary, "ckpt": ckpt,
            "best": ckpt / "best_resnet50_tb_finetuned.pth", "last": ckpt / "last.pth"}  # fmt: skip


def rescored_test_accuracy(checkpoint_dir: Path) -> float:
    """The best checkpoint's accuracy at P(TB) 0.5 (log-odds 0) on its split manifest's test side, scored again
    from the files."""
    import torch

    from tbcxr.checkpoint import Checkpoint, read_json
    from tbcxr.evaluation import predict_checkpoint
    from tbcxr.split import manifest_samples

    samples = manifest_samples(read_json(checkpoint_dir / "split_manifest.json"), "test")
    best = Checkpoint.load(checkpoint_dir / "best_resnet50_tb_full_trained.pth")
    labels, log_odds = predict_checkpoint(best, samples, torch.device("cpu"), 16, 0)
    return float(np.mean((log_odds >= 0.0) == labels))


def logits_by_hand(checkpoint_path: Path, images: list):
    """A checkpoint file's logits for 8-bit greyscale image files, computed without the project's code:
    torchvision's ResNet50 with a two-class head, resized, greyscale to 3 channels, normalised as stored."""
    import torch
    from torchvision import models, transforms

    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert not saved["preprocessing"], "CLAHE is not redone here"
    model = models.resnet50(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, len(saved["class_names"]))
    model.load_state_dict(saved["model"])
    size = saved["image_size"]
    transform = transforms.Compose([
        transforms.Resize((size, size)), transforms.Grayscale(num_output_channels=3), transforms.ToTensor(),
        transforms.Normalize(saved["mean"], saved["std"]),
    ])  # fmt: skip
    batch = torch.stack([transform(Image.open(path).convert("L")) for path in images])
    with torch.no_grad():
        return model.eval()(batch)


def learning_metrics(history: list[dict]) -> list[dict]:
    """Per-epoch history without the timing entries, which differ from run to run by nature."""
    timing = ("train_images_per_second", "train_data_wait_fraction")
    return [{k: v for k, v in epoch.items() if k not in timing} for epoch in history]


def coloured_share(png: Path) -> float:
    """Share of a PNG's pixels that are clearly coloured: plotted data (curves, matrix cells, heatmaps),
    never the white background, black text and grey axes of an empty titled figure (share 0)."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return float((pixels.max(axis=-1) - pixels.min(axis=-1) > 60).mean())
