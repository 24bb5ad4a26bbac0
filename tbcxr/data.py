"""Data sets: data preparation, transforms, datasets, samplers and loaders.

A data folder is discovered once (layout.py), checked, split (split.py) into train/val/test and written
to a split manifest that every later step, --resume, --test-only and GradCAM reuse.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .cache import decoded_cache, fingerprint, remove_stale_files, side_cache_sizes, train_cache_size
from .checkpoint import Checkpoint, read_json, write_json
from .config import AUGMENTATION, CLAHE, CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD
from .data_quality import NEAR_DUPLICATE_BITS, SCAN_VERSION, data_report, drop_leaks, find_leaks, scan_images
from .decoding import equalise, load_xray
from .errors import DataError, DataLayoutError
from .fast_data import CachedBatches, DeviceBatches, augment_intensity, sample_intensity
from .layout import DataSplit, discover_dataset
from .runtime import SINGLE_PROCESS, DistributedContext, ShardOrder, shard, use_channels_last
from .split import make_split_manifest, manifest_samples

PREPARATION_VERSION = "split+leaks+caches 1"  # in the preparation key: a new way of preparing starts afresh


class Clahe:
    """decoding.equalise as a transform of a greyscale PIL image (--clahe), with the settings a checkpoint records."""

    def __init__(self, clip_limit: float = CLAHE["clip_limit"], tile_grid=CLAHE["tile_grid"]):
        self.clip_limit, self.tile_grid = clip_limit, tile_grid

    def __call__(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(equalise(np.asarray(image.convert("L")), self.clip_limit, self.tile_grid), mode="L")


class ToUnitFloat:
    """A uint8 image tensor as float32 in [0, 1], computed as x / 255: the batched path's conversion and the one
    the recorded evidence was trained with (torchvision's ToTensor). v2.ToDtype(scale=True) multiplies by 1 / 255
    instead, which rounds some pixels one bit apart, enough to send a from-scratch run elsewhere
    (docs/evaluation-evidence.md#reproducing-a-run) and to make --test-only differ from training's scores."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().div(255)


class IntensityJitter:
    """--intensity-augment on one greyscale (C, H, W) tensor in [0, 1] with equal channels: the batched device
    version, drawn from torch's global generator (which XrayDataset seeds per sample)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        grey = augment_intensity(image[None, :1], sample_intensity(1, None, image.device), None)[0]
        return grey.expand_as(image).contiguous()


def train_transform(
    size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe: bool = False, intensity: bool = False
) -> v2.Compose:
    """Random resized crop, horizontal flip, rotation, brightness and contrast jitter (config.AUGMENTATION;
    no saturation jitter: a no-op on greyscale), optionally with CLAHE before the crop and intensity
    augmentation after the colour jitter."""
    a = AUGMENTATION
    # CLAHE at the size the fast path equalises its cached training images, before the crop, as it does.
    equalised = [v2.Resize((train_cache_size(size),) * 2), Clahe()] if clahe else []
    return v2.Compose([
        *equalised,
        v2.RandomResizedCrop(size, scale=a["crop_scale"], ratio=a["crop_ratio"]),
        v2.RandomHorizontalFlip(a["hflip_p"]),
        v2.RandomRotation(degrees=a["degrees"]),
        v2.ColorJitter(brightness=a["brightness"], contrast=a["contrast"]),
        v2.Grayscale(num_output_channels=3),
        v2.ToImage(),
        ToUnitFloat(),
        *([IntensityJitter()] if intensity else []),
        v2.Normalize(mean, std),
    ])  # fmt: skip


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe: dict | None = None) -> v2.Compose:
    """Resize, then CLAHE with the given settings (see config.CLAHE) when asked for, then normalise."""
    return v2.Compose([
        v2.Resize((size, size)),
        *([Clahe(**clahe)] if clahe else []),
        v2.Grayscale(num_output_channels=3),
        v2.ToImage(),
        ToUnitFloat(),
        v2.Normalize(mean, std),
    ])  # fmt: skip


def checkpoint_transform(checkpoint: Checkpoint) -> v2.Compose:
    """The evaluation transform a checkpoint was trained with: its size, normalisation and preprocessing."""
    return eval_transform(checkpoint.image_size, checkpoint.mean, checkpoint.std, checkpoint.clahe)


class XrayDataset(torch.utils.data.Dataset):
    """(path, label) pairs decoded through load_xray and a transform."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = load_xray(path)
        if seed is not None:  # the sample's augmentation depends only on the sampler's seed
            torch.manual_seed(seed)
        return self.transform(image), label


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Seeded per-epoch shuffle, optionally over a RandomOverSampler-balanced index set.

    Yields (index, augmentation seed) pairs that depend only on (seed, epoch), so a
    resumed run sees the same batches and the same augmentations, with any worker count.
    """

    def __init__(self, labels: list[int], seed: int, oversample: bool, dist: DistributedContext = SINGLE_PROCESS):
        self.labels, self.seed, self.oversample, self.dist = np.asarray(labels), seed, oversample, dist
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> np.ndarray:
        indices = np.arange(len(self.labels))
        if self.oversample:
            from imblearn.over_sampling import RandomOverSampler

            sampler = RandomOverSampler(random_state=self.seed + self.epoch)
            resampled, _ = sampler.fit_resample(indices.reshape(-1, 1), self.labels)
            indices = resampled.ravel()
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return indices[order.numpy()]

    def __iter__(self):
        indices = self.epoch_indices()
        generator = torch.Generator().manual_seed(10_000 * self.seed + self.epoch + 1)
        seeds = torch.randint(2**31 - 1, (len(indices),), generator=generator)
        # Every rank draws the same epoch order and takes its own disjoint share of it.
        return iter(shard(list(zip(indices.tolist(), seeds.tolist())), self.dist))

    def __len__(self) -> int:
        total = (
            int(np.bincount(self.labels).max()) * len(np.unique(self.labels)) if self.oversample else len(self.labels)
        )
        return -(-total // self.dist.world_size)


@dataclass(frozen=True)
class LoaderSettings:
    """How make_loaders reads, batches and augments the images."""

    image_size: int
    batch_size: int
    seed: int
    oversample: bool  # RandomOverSampler-balanced training epochs
    fast_data: bool  # decoded caches and augmentation on the device, else per-image PIL transforms
    cache_dir: Path
    num_workers: int
    clahe: bool = False  # on every side
    intensity: bool = False  # intensity augmentation, on the training side

    @property
    def eval_batch_size(self) -> int:
        return max(self.batch_size * 4, 64)  # no gradients: larger batches are free


def make_loaders(
    manifest: dict, device: torch.device, settings: LoaderSettings, dist: DistributedContext = SINGLE_PROCESS
) -> tuple:
    """Train, validation and test loaders (this rank's shards): the fast cached/device path,
    or per-image PIL transforms."""
    loaders = []
    for side in ("train", "val", "test"):
        samples = manifest_samples(manifest, side)
        if side == "train":
            order = EpochSampler([label for _, label in samples], settings.seed, settings.oversample, dist)
        else:
            order = ShardOrder(len(samples), dist)
        loaders.append(side_loader(side, samples, order, device, settings))
    return tuple(loaders)


def side_loader(side: str, samples: list[tuple[str, int]], order, device: torch.device, settings: LoaderSettings):
    """One side's loader, its batches in the sampler's `order`: training batches are augmented and a short
    last one is dropped."""
    train = side == "train"
    batch_size = settings.batch_size if train else settings.eval_batch_size
    drop_last = train and len(order) > batch_size
    pin_memory = device.type == "cuda"
    if settings.fast_data:
        paths, labels = [path for path, _ in samples], [label for _, label in samples]
        cache = decoded_cache(
            paths, side_cache_sizes(settings.image_size)[side], settings.cache_dir, max(2, settings.num_workers)
        )
        batches = CachedBatches(cache, labels, batch_size, order, drop_last, pin_memory, settings.clahe)
        intensity = train and settings.intensity
        return DeviceBatches(batches, device, settings.image_size, train, use_channels_last(device), intensity)
    if train:
        transform = train_transform(settings.image_size, clahe=settings.clahe, intensity=settings.intensity)
    else:
        transform = eval_transform(settings.image_size, clahe=CLAHE if settings.clahe else None)
    return torch.utils.data.DataLoader(
        XrayDataset(samples, transform),
        batch_size=batch_size,
        sampler=order,
        drop_last=drop_last,
        num_workers=settings.num_workers,
        pin_memory=pin_memory,
        persistent_workers=settings.num_workers > 0,
    )


@dataclass(frozen=True)
class PreparationSettings:
    """How prepare_manifest splits the data, and what it does with unreadable files and copies across sides."""

    val_fraction: float
    test_fraction: float
    seed: int
    strict: bool = False  # refuse unreadable files rather than skip them
    dedup: bool = False  # remove near copies from the held-out sides too, not only exact ones


def prepare_manifest(
    data_dir: str,
    manifest_path: Path,
    settings: PreparationSettings,
    *,
    workers: int,
    cache_dir: Path | None = None,
    image_size: int = 0,
) -> dict:
    """Discover, decode-check, split and leak-check the data; write the split manifest; print a data report.

    With a cache_dir, each image is decoded once (scan_images) and the scan is kept there; with an
    image_size too, the decoded caches make_loaders reads are filled from that same decode."""
    data = discover_dataset(data_dir)
    paths = [path for path, _ in data.train + (data.test or [])]
    cache_sizes = side_cache_sizes(image_size) if cache_dir and image_size else {}
    preparation = preparation_key(paths, settings, cache_sizes)
    if cache_dir is not None and (manifest := prepared_manifest(manifest_path, preparation, cache_dir)):
        print(f"Preparing data: {len(paths)} images and settings unchanged, split read from {manifest_path}")
        print(data_report(manifest, manifest_path, [cache_dir / name for name in manifest["preparation"]["caches"]]))
        return manifest
    scan = scan_images(paths, workers, cache_dir, tuple(sorted(set(cache_sizes.values()))))
    data = skip_unreadable(data, scan.unreadable, settings.strict)
    manifest = make_split_manifest(data, settings.val_fraction, settings.test_fraction, settings.seed)
    manifest |= scan.recorded(data.root)
    manifest = drop_leaks(manifest, find_leaks(manifest, scan), settings.dedup, manifest_path.name)
    for side in ("val", "test"):  # AUC, thresholds and early stopping need both classes
        refuse_one_class(manifest[side], side, "once copies of training or validation images were removed from it: "
                         "add images of that class that are not copies")  # fmt: skip
    caches = []
    for side, size in cache_sizes.items():  # filled from the pixels the scan resized, not decoded again
        side_paths = [path for path, _ in manifest_samples(manifest, side)]
        resized = (scan.pixels[size], scan.row) if size in scan.pixels else None
        caches.append(decoded_cache(side_paths, size, cache_dir, workers, resized))
    scan.remove_pixels()
    if cache_dir is not None:  # what lets the next run on the same files and settings skip all of the above
        manifest["preparation"] = {"key": preparation, "caches": [Path(cache.filename).name for cache in caches]}
        kept = {*manifest["preparation"]["caches"], scan.record.name}
        # The caches and scans of earlier preparations, and partial files of killed ones
        remove_stale_files(cache_dir, ("decoded_*.npy", "scan_*.npz", ".*.tmp"), kept)
    write_json(manifest, manifest_path)
    print(data_report(manifest, manifest_path, [Path(cache.filename) for cache in caches]))
    return manifest


def preparation_key(paths: list[str], settings: PreparationSettings, cache_sizes: dict[str, int]) -> str:
    """A name for everything the split, the leak report and the caches depend on: the files, the settings,
    the cache sizes and the methods."""
    methods = (PREPARATION_VERSION, SCAN_VERSION, NEAR_DUPLICATE_BITS, *map(version, ("scikit-learn", "ImageHash")))
    return fingerprint(paths, *methods, sorted(asdict(settings).items()), sorted(cache_sizes.items()))


def skip_unreadable(data: DataSplit, unreadable: dict[str, str], strict: bool) -> DataSplit:
    """The data without the files that cannot be read, each listed in a warning; with strict, an error instead."""
    if not unreadable:
        return data
    listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(unreadable.items()))
    if strict:
        raise DataError(f"error: {len(unreadable)} image files cannot be read (--strict):\n{listing}")
    print(f"WARNING: skipping {len(unreadable)} image files that cannot be read:\n{listing}", file=sys.stderr)
    train = [sample for sample in data.train if sample[0] not in unreadable]
    test = None if data.test is None else [sample for sample in data.test if sample[0] not in unreadable]
    for side, samples in (("train", train), ("test", test or train)):
        refuse_one_class(samples, side, "once unreadable files were skipped")
    return replace(data, train=train, test=test)


def refuse_one_class(samples, side: str, cause: str) -> None:
    """Stop when a side of the split holds images of one class only (no AUC, thresholds or stratified split)."""
    missing = set(range(len(CLASS_NAMES))) - {label for _, label in samples}
    if missing:
        raise DataLayoutError(f"no {CLASS_NAMES[min(missing)]} images left on the {side} side {cause}")


def prepared_manifest(manifest_path: Path, preparation: str, cache_dir: Path) -> dict | None:
    """The manifest a previous preparation of the same files with the same settings wrote, if its caches are
    still there; else None."""
    if not manifest_path.is_file():
        return None
    manifest = read_json(manifest_path)
    recorded = manifest.get("preparation", {})
    if recorded.get("key") != preparation or not all((cache_dir / name).is_file() for name in recorded["caches"]):
        return None
    return manifest
