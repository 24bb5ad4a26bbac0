"""What the network trains on changes only on purpose.

A from-scratch run here is chaotic: a 1e-6 change in the input pixels (x * (1/255) instead of x / 255) moved one
8-epoch run's test AUC from 0.54 to 0.90 and its external AUC with it, and nothing noticed until an outside check
re-ran the benchmark (docs/evaluation-evidence.md#reproducing-a-run). These tests record, bit for bit, the initial
weights and the first training and validation batches of a seeded run, as the trainer's own main() makes them.
A change to decoding, caching, CLAHE, augmentation, normalisation, the random number streams or the order of the
trainer's stages fails here; if it is meant, re-run benchmarks/bench_generalisation.py, record its table, and
update DIGESTS with the values the failure prints.

Floating-point results are bit-identical only on one platform (PyTorch version, CPU architecture and vector
instruction set): elsewhere these tests skip and say why.
"""

from __future__ import annotations

import hashlib
import platform

import pytest
import torch
from conftest import TINY, make_organized

import resnet50_tb_full

PLATFORM = f"torch {torch.__version__.split('+')[0]}, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"
# {platform: {recipe: {what: sha256 prefix}}}: recorded on the CI machine kind (2-core x86_64, AVX2).
DIGESTS = {
    "torch 2.14.1, x86_64, AVX2": {
        "from-scratch": {
            "initial_weights": "81e15a54e0301781",
            "train_batch_1": "01cebadcf5925b08",
            "train_batch_2": "9fa7df4fba799bb6",
            "val_batch_1": "6b8b2e307e038dbd",
        },
        "original": {
            "initial_weights": "81e15a54e0301781",
            "train_batch_1": "162e6eb58d771a6f",
            "train_batch_2": "9778c730fb560523",
            "val_batch_1": "da3bae0fe01656d0",
        },
    },
}
RECIPE_FLAGS = {
    "from-scratch": ["--weights", "none"],  # random weights choose the recipe: CLAHE, intensity augmentation
    "original": TINY,
}


class Captured(Exception):
    """Stops the trainer at its first training step, carrying what that step would have trained on."""

    def __init__(self, digests: dict[str, str]):
        super().__init__("captured")
        self.digests = digests


def sha(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def capture_first_step(model, loader, *args, **kwargs):
    """Stands in for train_one_epoch: digests of the initial weights and the first two training batches."""
    state = model.state_dict()
    batches = [batch for batch, _ in zip(loader, range(2))]
    raise Captured({
        "initial_weights": sha(*(state[name] for name in sorted(state))),
        "train_batch_1": sha(*batches[0]),
        "train_batch_2": sha(*batches[1]),
    })  # fmt: skip


def first_batch(loader) -> str:
    return sha(*next(iter(loader)))


@pytest.mark.parametrize("recipe", RECIPE_FLAGS)
def test_the_pixels_and_random_draws_a_seeded_run_trains_on_are_recorded_bit_for_bit(recipe, tmp_path, monkeypatch):
    recorded = DIGESTS.get(PLATFORM)
    if recorded is None:
        pytest.skip(f"digests are recorded for {sorted(DIGESTS)}, not for this platform ({PLATFORM})")
    data = make_organized(tmp_path / "data", train=12, test=4, size=48)
    monkeypatch.setattr(resnet50_tb_full, "train_one_epoch", capture_first_step)
    flags = ["--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "run"), "--image-size", "32"]
    flags += ["--batch-size", "8", "--num-workers", "0", "--seed", "3", *RECIPE_FLAGS[recipe]]
    flags += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with pytest.raises(Captured) as captured:
        resnet50_tb_full.main(flags)
    _, loaders = resnet50_tb_full.prepare_data(
        resnet50_tb_full.config_from_args(flags), resnet50_tb_full.runtime.SINGLE_PROCESS, torch.device("cpu"), None
    )
    seen = captured.value.digests | {"val_batch_1": first_batch(loaders[1])}
    assert seen == recorded[recipe], (
        f"what a seeded {recipe} run trains on changed on {PLATFORM}: {seen}. If that is meant, re-run "
        "benchmarks/bench_generalisation.py, record its table in docs/evaluation-evidence.md and update DIGESTS"
    )
