"""Shared fixtures: tiny generated X-ray folders, the real shared data when present, a check that
the repository is left clean, and a real `mlflow server` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tbcxr.config import CLASS_NAMES  # noqa: E402
from tbcxr.demo import synthetic_xray  # noqa: E402
from tbcxr.tracking import server_answers  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
# Tiny, fast CPU runs: 32 px, small batches, no worker processes, random weights.
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


def rescored_test_accuracy(checkpoint_dir: Path) -> float:
    """The best checkpoint's accuracy at 0.5 on its split manifest's test side, scored again from the files."""
    import torch

    from tbcxr.checkpoint import load_checkpoint, read_json
    from tbcxr.data import manifest_samples
    from tbcxr.evaluation import predict_checkpoint

    samples = manifest_samples(read_json(checkpoint_dir / "split_manifest.json"), "test")
    best = load_checkpoint(checkpoint_dir / "best_resnet50_tb_full_trained.pth")
    labels, probs = predict_checkpoint(best, samples, torch.device("cpu"), 16, 0)
    return float(np.mean((probs >= 0.5) == labels))


def learning_metrics(history: list[dict]) -> list[dict]:
    """Per-epoch history without the timing entries, which differ from run to run by nature."""
    timing = ("train_images_per_second", "train_data_wait_fraction")
    return [{k: v for k, v in epoch.items() if k not in timing} for epoch in history]


def coloured_share(png: Path) -> float:
    """Share of a PNG's pixels that are clearly coloured: plotted data (curves, matrix cells, heatmaps),
    never the white background, black text and grey axes of an empty titled figure (share 0)."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return float((pixels.max(axis=-1) - pixels.min(axis=-1) > 60).mean())
