"""The fast data path: decoded cache and batched device augmentation, checked against the
per-image torchvision transforms it replaces."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY, rescored_test_accuracy, write_xrays
from torchvision.transforms import v2

import resnet50_tb_full as trainer
from tbcxr.cache import decoded_cache
from tbcxr.data import EpochSampler, eval_transform, train_transform
from tbcxr.decoding import load_xray
from tbcxr.fast_data import CachedBatches, DeviceBatches, augment_batch, sample_augmentation


def identity_augmentation(batch: int, device) -> dict[str, torch.Tensor]:
    """Parameters under which augment_batch leaves an image as it is."""
    ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
    return {
        "width": ones,
        "height": ones,
        "centre_x": zeros,
        "centre_y": zeros,
        "flip": ones,
        "angle": zeros,
        "brightness": ones,
        "contrast": ones,
    }


def cpu_transform_ranges(size: int) -> dict:
    """The parameter ranges the CPU training transform really uses."""
    steps = {type(t): t for t in train_transform(size).transforms}
    crop, flip = steps[v2.RandomResizedCrop], steps[v2.RandomHorizontalFlip]
    rotation, jitter = steps[v2.RandomRotation], steps[v2.ColorJitter]
    return {
        "crop_scale": tuple(crop.scale),
        "crop_ratio": tuple(crop.ratio),
        "hflip_p": flip.p,
        "degrees": tuple(rotation.degrees),
        "brightness": tuple(jitter.brightness),
        "contrast": tuple(jitter.contrast),
    }


def test_device_augmentation_draws_from_the_cpu_transforms_ranges():
    ranges = cpu_transform_ranges(64)
    params = sample_augmentation(20_000, torch.Generator().manual_seed(0), "cpu")

    area = params["width"] * params["height"]
    unclamped = (params["width"] < 1) & (params["height"] < 1)
    assert area.max() <= ranges["crop_scale"][1] + 1e-6
    assert area[unclamped].min() >= ranges["crop_scale"][0] - 1e-6 and area[unclamped].min() < 0.81
    ratio = (params["width"] / params["height"])[unclamped]
    assert ratio.min() >= ranges["crop_ratio"][0] - 1e-6 and ratio.max() <= ranges["crop_ratio"][1] + 1e-6
    assert (params["centre_x"].abs() <= 1 - params["width"] + 1e-6).all()  # the crop stays inside the image
    assert (params["flip"] == -1).float().mean() == pytest.approx(ranges["hflip_p"], abs=0.02)
    for name, key in (("angle", "degrees"), ("brightness", "brightness"), ("contrast", "contrast")):
        low, high = ranges[key]
        assert low <= params[name].min() < low + 0.01 * (high - low)
        assert high - 0.01 * (high - low) < params[name].max() <= high


def test_identity_parameters_return_the_input():
    images = torch.rand(3, 1, 48, 48)
    out = augment_batch(images, identity_augmentation(3, "cpu"), 48)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_rotation_fills_corners_black_and_flip_mirrors():
    images = torch.ones(2, 1, 32, 32)
    params = identity_augmentation(2, "cpu")
    params["angle"] = torch.tensor([15.0, 0.0])
    rotated = augment_batch(images, params, 32)
    assert rotated[0, 0, 0, 0] == 0 and rotated[0, 0, 16, 16] == 1  # like RandomRotation's fill=0
    ramp = torch.linspace(0, 1, 32).repeat(32, 1).view(1, 1, 32, 32)
    flip = identity_augmentation(1, "cpu") | {"flip": torch.tensor([-1.0])}
    torch.testing.assert_close(augment_batch(ramp, flip, 32), ramp.flip(-1), atol=1e-5, rtol=0)


def test_cached_evaluation_tensors_equal_the_cpu_path_bit_for_bit(tmp_path):
    """Training scores validation on the fast path, --test-only and prediction on the per-image path: one
    rounding apart, the two would give an image different scores and a threshold-edge image another decision."""
    paths = [str(p) for p in write_xrays(tmp_path / "imgs", 4, True, size=80)]
    cache = decoded_cache(paths, 48, tmp_path / "cache")
    batches = DeviceBatches(CachedBatches(cache, [1] * 4, batch_size=4), torch.device("cpu"), 48, augment=False)
    fast, _ = next(iter(batches))
    slow = torch.stack([eval_transform(48)(load_xray(p)) for p in paths])
    assert torch.equal(fast, slow)


def test_stale_cache_is_rebuilt_when_a_file_changes(tmp_path):
    paths = [str(p) for p in write_xrays(tmp_path / "imgs", 3, False, size=40)]
    first = decoded_cache(paths, 32, tmp_path / "cache")
    os.utime(paths[1], ns=(0, 10**9))  # a different modification time: the cached pixels may be stale
    second = decoded_cache(paths, 32, tmp_path / "cache")
    assert first.filename != second.filename
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert decoded_cache(paths, 32, tmp_path / "cache").filename == second.filename  # reused


def test_cached_batches_follow_the_epoch_sampler(tmp_path):
    paths = [str(p) for p in write_xrays(tmp_path / "imgs", 10, False, size=32)]
    cache = decoded_cache(paths, 32, tmp_path / "cache")
    labels = [0] * 7 + [1] * 3
    sampler = EpochSampler(labels, seed=5, oversample=True)
    sampler.set_epoch(2)
    order = [index for index, _ in sampler]
    batches = list(CachedBatches(cache, labels, batch_size=4, sampler=sampler, drop_last=False))
    assert torch.equal(torch.cat([images for images, _, _ in batches]), torch.from_numpy(cache[order]))
    assert torch.cat([y for _, y, _ in batches]).tolist() == [labels[i] for i in order]
    assert sorted(np.bincount([labels[i] for i in order]).tolist()) == [7, 7]  # oversampled


def test_per_image_path_still_trains_end_to_end(tmp_path, organized_data):
    summary = trainer.main(
        ["--data-dir", str(organized_data), "--checkpoint-dir", str(tmp_path / "ckpt"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs", "1", "--no-fast-data", *TINY]
    )  # fmt: skip
    kept = sorted(path.name.split("_")[0] for path in (tmp_path / "ckpt" / "cache").iterdir())
    assert kept == ["leaks", "scan"]  # the scan and leak check, kept for the next run; no decoded cache
    assert (tmp_path / "ckpt" / "best_resnet50_tb_full_trained.pth").is_file()
    history = torch.load(tmp_path / "ckpt" / "last.pth", weights_only=True)["history"]
    assert history[0]["train_images_per_second"] > 0 and 0 <= history[0]["train_data_wait_fraction"] <= 1
    assert summary["test_metrics"]["test_accuracy"] == pytest.approx(rescored_test_accuracy(tmp_path / "ckpt"))
