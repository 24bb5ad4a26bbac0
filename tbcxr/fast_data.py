"""The fast data path: images decoded once into a uint8 cache, augmented in batches on the device.

The batched augmentation draws from the same ranges as data.train_transform, so the fast and
the per-image PIL paths train the same model up to sampling noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from .config import AUGMENTATION, IMAGENET_MEAN, IMAGENET_STD
from .decoding import load_xray


def train_cache_size(image_size: int) -> int:
    """Training images are cached a little larger than the crop, so the random crop keeps detail."""
    return int(round(image_size * 1.15))


def decode_resized(path: str, size: int) -> np.ndarray:
    """What the CPU path feeds Resize((size, size)): same decoder, same PIL resize (bilinear, antialiased)."""
    return np.asarray(transforms.functional.resize(load_xray(path), [size, size]), dtype=np.uint8)


def decoded_cache(paths: list[str], size: int, folder: Path, workers: int = 4) -> np.ndarray:
    """uint8 greyscale images (N, size, size), decoded once into a memory-mapped .npy file.

    The file name carries a hash of the file list, sizes and modification times, so a
    changed data set gets a fresh cache and a stale one is never read."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    fingerprint = hashlib.sha1(str(size).encode())
    for path in paths:
        stat = os.stat(path)
        fingerprint.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache_path = Path(folder) / f"decoded_{size}px_{len(paths)}_{fingerprint.hexdigest()[:16]}.npy"
    if not cache_path.is_file():
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp")
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # Pillow releases the GIL
            decoded = pool.map(lambda p: decode_resized(p, size), paths, chunksize=16)
            for i, pixels in enumerate(
                tqdm(decoded, total=len(paths), desc=f"Caching {size}px", unit="img", leave=False)
            ):
                cache[i] = pixels
        cache.flush()
        del cache
        os.replace(tmp, cache_path)
    return np.load(cache_path, mmap_mode="r")


class CachedBatches:
    """Batches of (uint8 images, labels) from a decoded cache, in a sampler's order.

    With an EpochSampler the batch order and each batch's augmentation seed depend only on
    (seed, epoch), like the per-image path. Batches are pinned for asynchronous copies."""

    def __init__(
        self,
        cache: np.ndarray,
        labels: list[int],
        batch_size: int,
        sampler=None,
        drop_last: bool = False,
        pin_memory: bool = False,
    ):
        self.cache, self.labels = cache, torch.as_tensor(labels)
        self.batch_size, self.sampler, self.drop_last, self.pin_memory = batch_size, sampler, drop_last, pin_memory

    def _order(self) -> list[tuple[int, int]]:
        if self.sampler is None:
            return [(i, 0) for i in range(len(self.labels))]
        return list(iter(self.sampler))

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.labels)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self):
        order = self._order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            chunk = order[start : start + self.batch_size]
            index = np.asarray([i for i, _ in chunk])
            images = torch.from_numpy(self.cache[index])  # fancy indexing copies out of the memmap
            if self.pin_memory:
                images = images.pin_memory()
            yield images, self.labels[index], chunk[0][1]


def sample_augmentation(batch: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-image parameters drawn from AUGMENTATION's ranges (see train_transform)."""
    a = AUGMENTATION

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator, device=device)

    log_ratio = uniform(np.log(a["crop_ratio"][0]), np.log(a["crop_ratio"][1]))
    area = uniform(*a["crop_scale"])
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # crop side / image side
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    return {
        "width": width,
        "height": height,
        "centre_x": uniform(-1, 1) * (1 - width),
        "centre_y": uniform(-1, 1) * (1 - height),
        "flip": torch.where(torch.rand(batch, generator=generator, device=device) < a["hflip_p"], -1.0, 1.0),
        "angle": uniform(-a["degrees"], a["degrees"]),
        "brightness": uniform(1 - a["brightness"], 1 + a["brightness"]),
        "contrast": uniform(1 - a["contrast"], 1 + a["contrast"]),
    }


def identity_augmentation(batch: int, device) -> dict[str, torch.Tensor]:
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


def augment_batch(images: torch.Tensor, params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The train transform on a (B, 1, H, W) float batch in [0, 1], in one affine warp per image:
    resized crop, horizontal flip, rotation (corners filled black, as RandomRotation does),
    then brightness and contrast jitter. Returns (B, 1, size, size) in [0, 1]."""

    def per_image(name):
        return params[name].view(-1, 1, 1)

    # Pixel centres of the output in grid_sample's [-1, 1] coordinates (align_corners=False).
    coords = (torch.arange(size, device=images.device, dtype=images.dtype) * 2 + 1) / size - 1
    px, py = coords.view(1, 1, size), coords.view(1, size, 1)
    angle = torch.deg2rad(per_image("angle"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output point p -> un-rotated point q = R(-angle) p -> un-flipped -> inside the crop box of the source.
    qx, qy = cos * px + sin * py, cos * py - sin * px
    grid = torch.stack(
        [
            per_image("width") * per_image("flip") * qx + per_image("centre_x"),
            per_image("height") * qy + per_image("centre_y"),
        ],
        dim=-1,
    )
    out = nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((qx.abs() <= 1) & (qy.abs() <= 1)).unsqueeze(1)  # points the rotation brought in from outside
    out = out * inside
    out = (out * params["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = params["contrast"].view(-1, 1, 1, 1)
    return (contrast * out + (1 - contrast) * mean).clamp(0, 1)


def normalise_grey(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> the 3-channel normalised tensor the CPU path makes."""
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


class DeviceBatches:
    """Wraps CachedBatches: copies each uint8 batch to the device, augments it there (train) or
    only normalises it (eval), and yields (images, labels) like a DataLoader."""

    def __init__(
        self, batches: CachedBatches, device: torch.device, size: int, augment: bool, channels_last: bool = False
    ):
        self.batches, self.device, self.size, self.augment = batches, device, size, augment
        self.channels_last = channels_last
        self.sampler, self.batch_size = batches.sampler, batches.batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for images, labels, seed in self.batches:
            images = images.to(self.device, non_blocking=True).unsqueeze(1).float().div_(255)
            if self.augment:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                images = augment_batch(images, sample_augmentation(len(images), generator, self.device), self.size)
            images = normalise_grey(images)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
