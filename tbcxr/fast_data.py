"""The fast data path: images decoded once into a uint8 cache, augmented in batches on the device.

Caches are .npy files streamed to disk row by row (memory stays flat however large the data
set) and named by what they were made from; decoding runs in worker processes. The batched
augmentation draws from the same ranges as data.train_transform, so the fast and
the per-image PIL paths train the same model up to sampling noise.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from .config import AUGMENTATION, IMAGENET_MEAN, IMAGENET_STD, INTENSITY_AUGMENTATION
from .decoding import DECODER_VERSION, equalise, load_xray
from .progress import track


def train_cache_size(image_size: int) -> int:
    """Training images are cached a little larger than the crop, so the random crop keeps detail."""
    return int(round(image_size * 1.15))


def side_cache_sizes(image_size: int) -> dict[str, int]:
    """The size each side of the split is cached at."""
    return {"train": train_cache_size(image_size), "val": image_size, "test": image_size}


def resize_pixels(image, size: int) -> np.ndarray:
    """What the CPU path feeds Resize((size, size)): the same PIL resize (bilinear, antialiased)."""
    return np.asarray(transforms.functional.resize(image, [size, size]), dtype=np.uint8)


def decode_resized(path: str, size: int) -> np.ndarray:
    return resize_pixels(load_xray(path), size)


def fingerprint(paths: list[str], *key) -> str:
    """A name for what was computed from these files: the key and the decoder's version, then every file's
    path, size, inode, modification and change times, so a changed data set or decoder gets a fresh cache and a
    stale one is never read."""
    digest = hashlib.sha1("|".join(map(str, (*key, DECODER_VERSION))).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}\n".encode())
    return digest.hexdigest()[:16]


def remove_stale_files(folder: Path, patterns: tuple[str, ...], kept: set[str]) -> None:
    """Delete the files in `folder` matching `patterns` but not named in `kept`: at 50,000 images each cache is
    gigabytes, and every change of the files, the split or the size would otherwise leave another copy."""
    stale = [path for pattern in patterns for path in Path(folder).glob(pattern) if path.name not in kept]
    if stale:
        freed = sum(path.stat().st_size for path in stale)
        for path in stale:
            path.unlink()
        print(f"Removed {len(stale)} cache files of earlier preparations from {folder} ({freed / 1e9:.2f} GB)")


def cache_file(paths: list[str], size: int, folder: Path) -> Path:
    return Path(folder) / f"decoded_{size}px_{len(paths)}_{fingerprint(paths, size)}.npy"


def _apply(fn: Callable, items: list) -> list:
    return [fn(item) for item in items]


def ordered_map(fn: Callable, items: list, workers: int, chunk: int = 32) -> Iterator:
    """fn over items in worker processes, results in order.

    Processes, not threads: on small images most of the time goes to Python code that holds the
    GIL. Measured on 2 cores, scanning 64 px PNGs: 1 process 3,900 images/s, 2 threads 1,700,
    2 processes 5,900; on 512 px PNGs and 1024 px JPEGs, where Pillow releases the GIL, threads
    and processes tie. At most two chunks per worker are in flight: memory stays flat."""
    if workers <= 1 or len(items) <= chunk:  # a pool's start-up would cost more than it saves
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for start in range(0, len(items), chunk):
            pending.append(pool.submit(_apply, fn, items[start : start + chunk]))
            if len(pending) > 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


class RowWriter:
    """Streams uint8 (size, size) rows, in order, into a .npy file. Written under a temporary
    name and renamed when complete, so an interrupted run never leaves a torn file behind."""

    def __init__(self, path: Path, count: int, size: int):
        self.path, self.count, self.written = Path(path), count, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "wb")
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, size, size)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, row: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
        self.written += 1

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, error_type, *_) -> None:
        self.file.close()
        if error_type is None and self.written == self.count:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink()
            if error_type is None:
                raise RuntimeError(f"{self.path}: {self.written} of {self.count} rows written")


def read_rows(path: Path, indices: Iterable[int]) -> Iterator[np.ndarray]:
    """Rows of a uint8 .npy file, one read each: memory stays at one row, however large the file."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
        start, row_bytes = f.tell(), int(np.prod(shape[1:]))
        for index in indices:
            f.seek(start + index * row_bytes)
            yield np.frombuffer(f.read(row_bytes), dtype=np.uint8).reshape(shape[1:])


def decoded_cache(
    paths: list[str], size: int, folder: Path, workers: int = 4, rows_from: tuple[Path, dict[str, int]] | None = None
) -> np.ndarray:
    """uint8 greyscale images (N, size, size) in a memory-mapped .npy file named by cache_file.

    Built once: from `rows_from` (a .npy of pixels the scan already resized at this size, and
    each path's row in it) without decoding, else by decoding in worker processes."""
    path = cache_file(paths, size, folder)
    if not path.is_file():
        if rows_from is not None:
            source, row_of = rows_from
            rows = read_rows(source, (row_of[p] for p in paths))
        else:
            rows = ordered_map(partial(decode_resized, size=size), paths, workers)
        with RowWriter(path, len(paths), size) as writer:
            for row in track(rows, f"Caching {size}px", total=len(paths)):
                writer.write(row)
    return np.load(path, mmap_mode="r")


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
        clahe: bool = False,
    ):
        self.cache, self.labels, self.clahe = cache, torch.as_tensor(labels), clahe
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
            pixels = self.cache[index]  # fancy indexing copies out of the memmap
            images = torch.from_numpy(equalise(pixels) if self.clahe else pixels)
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


def sample_intensity(batch: int, generator: torch.Generator | None, device) -> dict[str, torch.Tensor]:
    """Per-image gamma, blur and noise drawn from INTENSITY_AUGMENTATION's ranges (log-uniform gamma)."""
    a = INTENSITY_AUGMENTATION

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator, device=device)

    gamma = torch.exp(uniform(np.log(a["gamma"][0]), np.log(a["gamma"][1])))
    return {"gamma": gamma, "blur_sigma": uniform(*a["blur_sigma"]), "noise_std": uniform(*a["noise_std"])}


def augment_intensity(
    images: torch.Tensor, params: dict[str, torch.Tensor], generator: torch.Generator | None
) -> torch.Tensor:
    """Gamma, then a Gaussian blur (5-tap, per-image sigma), then Gaussian noise on a (B, 1, H, W) batch in [0, 1]."""
    batch = len(images)
    out = images.clamp(min=1e-6) ** params["gamma"].view(-1, 1, 1, 1)
    taps = torch.arange(-2, 3, device=images.device, dtype=images.dtype)
    sigma = params["blur_sigma"].clamp(min=1e-3).view(-1, 1)  # ~0 gives the identity kernel
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)
    rows = nn.functional.conv2d(
        nn.functional.pad(out.transpose(0, 1), (2, 2, 0, 0), mode="replicate"),
        kernel.view(batch, 1, 1, 5),
        groups=batch,
    )
    out = nn.functional.conv2d(
        nn.functional.pad(rows, (0, 0, 2, 2), mode="replicate"), kernel.view(batch, 1, 5, 1), groups=batch
    ).transpose(0, 1)
    noise = torch.randn(out.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (out + noise * params["noise_std"].view(-1, 1, 1, 1)).clamp(0, 1)


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
        self,
        batches: CachedBatches,
        device: torch.device,
        size: int,
        augment: bool,
        channels_last: bool = False,
        intensity: bool = False,
    ):
        self.batches, self.device, self.size, self.augment = batches, device, size, augment
        self.channels_last, self.intensity = channels_last, intensity
        self.sampler, self.batch_size = batches.sampler, batches.batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for images, labels, seed in self.batches:
            images = images.to(self.device, non_blocking=True).unsqueeze(1).float().div_(255)
            if self.augment:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                images = augment_batch(images, sample_augmentation(len(images), generator, self.device), self.size)
                if self.intensity:
                    params = sample_intensity(len(images), generator, self.device)
                    images = augment_intensity(images, params, generator)
            images = normalise_grey(images)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
