"""Data sets: folder layouts, the split manifest, transforms, datasets, samplers and loaders.

A data folder is discovered once, split (seeded, stratified) into train/val/test and written
to a split manifest that every later step, --resume, --test-only and GradCAM reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from .checkpoint import read_json, write_json
from .config import AUGMENTATION, CLAHE, CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD
from .data_quality import NEAR_DUPLICATE_BITS, SCAN_VERSION, data_report, drop_leaks, find_leaks, scan_images
from .decoding import equalise, is_image_file, load_xray
from .fast_data import (
    CachedBatches,
    DeviceBatches,
    augment_intensity,
    decoded_cache,
    fingerprint,
    remove_stale_files,
    sample_intensity,
    side_cache_sizes,
    train_cache_size,
)
from .runtime import SINGLE_PROCESS, DistributedContext, ShardOrder, shard, use_channels_last

EXPECTED_LAYOUT = """Expected one of these layouts (class folder names match case-insensitively):
  organized:  DIR/train/Normal/*.png  DIR/train/Tuberculosis/*.png
              DIR/test/Normal/*.png   DIR/test/Tuberculosis/*.png
  raw Kaggle: DIR/Normal/*.png        DIR/Tuberculosis/*.png
              (or one folder deeper, e.g. DIR/TB_Chest_Radiography_Database/Normal)
No data at hand? Run with --demo to generate a small synthetic data set."""
PREPARATION_VERSION = "split+leaks+caches 1"  # in the preparation key: a new way of preparing starts afresh


@dataclass
class DataSplit:
    """Image paths and labels of one data set; `test` is None for the raw layout."""

    root: Path
    layout: str  # "organized" or "raw"
    train: list[tuple[str, int]]
    test: list[tuple[str, int]] | None


class DataLayoutError(SystemExit):
    """Raised for a missing or malformed data folder; exits with a readable message."""

    def __init__(self, problem: str):
        super().__init__(f"error: {problem}\n{EXPECTED_LAYOUT}")


def _child_dirs_by_lower_name(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder (DICOM too), sorted; skips hidden files (.DS_Store), Thumbs.db, spreadsheets."""
    with os.scandir(folder) as entries:  # scandir knows each entry's type without a stat call per file
        names = [entry.name for entry in entries if entry.is_file() and is_image_file(entry.path)]
    return [Path(folder) / name for name in sorted(names)]


def find_class_dirs(folder: Path) -> dict[int, Path] | None:
    """Map label -> class folder when `folder` holds every class folder, else None."""
    children = _child_dirs_by_lower_name(folder)
    found = {label: children.get(name.lower()) for label, name in enumerate(CLASS_NAMES)}
    return found if all(found.values()) else None


def labelled_images(class_dirs: dict[int, Path]) -> list[tuple[str, int]]:
    samples = []
    for label, folder in sorted(class_dirs.items()):
        images = list_images(folder)
        if not images:
            raise DataLayoutError(f"class folder {folder} holds no images")
        samples += [(str(p), label) for p in images]
    return samples


def discover_dataset(data_dir: str | Path) -> DataSplit:
    """Find the organized (train/test) or the raw Kaggle (class folders only) layout."""
    root = Path(data_dir).expanduser().resolve()
    if not str(data_dir) or not root.is_dir():
        raise DataLayoutError(f"data folder '{data_dir}' does not exist (set --data-dir or TB_DATA_DIR)")
    children = _child_dirs_by_lower_name(root)
    if "train" in children:
        train_dirs = find_class_dirs(children["train"])
        test_dirs = find_class_dirs(children["test"]) if "test" in children else None
        if train_dirs is None or test_dirs is None:
            raise DataLayoutError(
                f"{root} has a train folder but not train/ and test/ each with Normal and Tuberculosis"
            )
        return DataSplit(root, "organized", labelled_images(train_dirs), labelled_images(test_dirs))
    class_dirs = find_class_dirs(root)
    if class_dirs is None:  # the Kaggle zip unpacks to one extra folder level
        nested = [d for d in children.values() if find_class_dirs(d)]
        if len(nested) == 1:
            class_dirs = find_class_dirs(nested[0])
    if class_dirs is None:
        raise DataLayoutError(f"no Normal and Tuberculosis folders found in {root}")
    return DataSplit(root, "raw", labelled_images(class_dirs), None)


def stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int):
    """Seeded stratified split; the held-out side gets at least one image per class."""
    from sklearn.model_selection import train_test_split

    labels = [label for _, label in samples]
    # Stratification allocates held-out images in proportion to the class counts: a side of at least
    # len / rarest-class-count images is what makes that at least one image of the rarest class.
    held_out = max(len(CLASS_NAMES), round(fraction * len(samples)), -(-len(samples) // min(Counter(labels).values())))
    kept, taken = train_test_split(samples, test_size=held_out, stratify=labels, random_state=seed)
    return sorted(kept), sorted(taken)


def make_split_manifest(data: DataSplit, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Train/val/test lists (paths relative to the data root) that every later step reuses."""
    train, test = data.train, data.test
    if test is None:
        train, test = stratified_split(train, test_fraction, seed)
    train, val = stratified_split(train, val_fraction, seed)

    def rel(samples):
        return [[os.path.relpath(path, data.root), label] for path, label in samples]

    return {
        "data_dir": str(data.root.resolve()),
        "layout": data.layout,
        "seed": seed,
        "class_names": list(CLASS_NAMES),
        "train": rel(train),
        "val": rel(val),
        "test": rel(test),
    }


def split_digest(manifest: dict) -> str:
    """A short name for which images a manifest puts on each side: checkpoints record it, so a manifest
    that a later run replaced is noticed."""
    return hashlib.sha1(json.dumps([manifest[side] for side in ("train", "val", "test")]).encode()).hexdigest()[:16]


def manifest_samples(manifest: dict, side: str) -> list[tuple[str, int]]:
    root = Path(manifest["data_dir"])
    return [(str(root / rel), int(label)) for rel, label in manifest[side]]


class Clahe:
    """decoding.equalise as a transform of a greyscale PIL image (--clahe), with the settings a checkpoint records."""

    def __init__(self, clip_limit: float = CLAHE["clip_limit"], tile_grid=CLAHE["tile_grid"]):
        self.clip_limit, self.tile_grid = clip_limit, tile_grid

    def __call__(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(equalise(np.asarray(image.convert("L")), self.clip_limit, self.tile_grid), mode="L")


class IntensityJitter:
    """--intensity-augment on one greyscale (C, H, W) tensor in [0, 1] with equal channels: the batched device
    version, drawn from torch's global generator (which XrayDataset seeds per sample)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        grey = augment_intensity(image[None, :1], sample_intensity(1, None, image.device), None)[0]
        return grey.expand_as(image).contiguous()


def train_transform(
    size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe: bool = False, intensity: bool = False
) -> transforms.Compose:
    """The original design's enhanced augmentation (saturation jitter dropped: a no-op on greyscale),
    optionally with CLAHE after the crop and intensity augmentation after the colour jitter."""
    a = AUGMENTATION
    # CLAHE at the size the fast path equalises its cached training images, before the crop, as it does.
    equalised = [transforms.Resize((train_cache_size(size),) * 2), Clahe()] if clahe else []
    return transforms.Compose([
        *equalised,
        transforms.RandomResizedCrop(size, scale=a["crop_scale"], ratio=a["crop_ratio"]),
        transforms.RandomHorizontalFlip(a["hflip_p"]),
        transforms.RandomRotation(degrees=a["degrees"]),
        transforms.ColorJitter(brightness=a["brightness"], contrast=a["contrast"]),
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        *([IntensityJitter()] if intensity else []),
        transforms.Normalize(mean, std),
    ])  # fmt: skip


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, clahe: dict | None = None) -> transforms.Compose:
    """Resize, then CLAHE with the given settings (see config.CLAHE) when asked for, then normalise."""
    return transforms.Compose([
        transforms.Resize((size, size)),
        *([Clahe(**clahe)] if clahe else []),
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip


def checkpoint_transform(checkpoint: dict) -> transforms.Compose:
    """The evaluation transform a checkpoint was trained with: its size, normalisation and preprocessing."""
    # Checkpoints written before the settings were recorded name only the flag: today's settings then.
    legacy = CLAHE if checkpoint.get("config", {}).get("clahe") else None
    clahe = checkpoint["preprocessing"].get("clahe") if "preprocessing" in checkpoint else legacy
    return eval_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"], clahe)


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


def make_loaders(
    manifest: dict,
    device: torch.device,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    oversample: bool,
    fast_data: bool,
    cache_dir: Path,
    num_workers: int,
    dist: DistributedContext = SINGLE_PROCESS,
    clahe: bool = False,
    intensity: bool = False,
):
    """Train, validation and test loaders (this rank's shards): the fast cached/device path,
    or per-image PIL transforms. CLAHE applies to every side, intensity augmentation to train."""
    train = manifest_samples(manifest, "train")
    size = image_size
    sampler = EpochSampler([label for _, label in train], seed, oversample, dist)
    drop_last = len(sampler) > batch_size
    sides = {side: manifest_samples(manifest, side) for side in ("val", "test")}
    eval_batch = max(batch_size * 4, 64)  # no gradients: larger batches are free
    if fast_data:
        workers = max(2, num_workers)
        pin = device.type == "cuda"

        def cached(samples, cache_size, batch_size, sampler=None, drop=False):
            cache = decoded_cache([p for p, _ in samples], cache_size, cache_dir, workers)
            return CachedBatches(cache, [label for _, label in samples], batch_size, sampler, drop, pin, clahe)

        channels_last = use_channels_last(device)
        train_loader = DeviceBatches(
            cached(train, side_cache_sizes(size)["train"], batch_size, sampler, drop_last),
            device,
            size,
            augment=True,
            channels_last=channels_last,
            intensity=intensity,
        )
        val_loader, test_loader = (
            DeviceBatches(
                cached(sides[side], side_cache_sizes(size)[side], eval_batch, ShardOrder(len(sides[side]), dist)),
                device,
                size,
                augment=False,
                channels_last=channels_last,
            )
            for side in ("val", "test")
        )
        return train_loader, val_loader, test_loader
    loader_args = dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    train_loader = torch.utils.data.DataLoader(
        XrayDataset(train, train_transform(size, clahe=clahe, intensity=intensity)),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        **loader_args,
    )
    val_loader, test_loader = (
        torch.utils.data.DataLoader(
            XrayDataset(sides[side], eval_transform(size, clahe=CLAHE if clahe else None)),
            batch_size=eval_batch,
            sampler=ShardOrder(len(sides[side]), dist),
            **loader_args,
        )
        for side in ("val", "test")
    )
    return train_loader, val_loader, test_loader


def prepare_manifest(
    data_dir: str,
    manifest_path: Path,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    strict: bool,
    dedup: bool,
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
    settings = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, strict=strict, dedup=dedup)
    # Everything the split, the leak report and the caches depend on besides the files themselves
    methods = (PREPARATION_VERSION, SCAN_VERSION, NEAR_DUPLICATE_BITS, *map(version, ("scikit-learn", "ImageHash")))
    preparation = fingerprint(paths, *methods, sorted(settings.items()), sorted(cache_sizes.items()))
    if cache_dir is not None and (manifest := prepared_manifest(manifest_path, preparation, cache_dir)):
        print(f"Preparing data: {len(paths)} images and settings unchanged, split read from {manifest_path}")
        print(data_report(manifest, manifest_path, [cache_dir / name for name in manifest["preparation"]["caches"]]))
        return manifest
    scan = scan_images(paths, workers, cache_dir, tuple(sorted(set(cache_sizes.values()))))
    if scan.unreadable:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(scan.unreadable.items()))
        if strict:
            raise SystemExit(f"error: {len(scan.unreadable)} image files cannot be read (--strict):\n{listing}")
        print(f"WARNING: skipping {len(scan.unreadable)} image files that cannot be read:\n{listing}", file=sys.stderr)
        data.train = [s for s in data.train if s[0] not in scan.unreadable]
        data.test = None if data.test is None else [s for s in data.test if s[0] not in scan.unreadable]
        for side, samples in (("train", data.train), ("test", data.test or data.train)):
            refuse_one_class(samples, side, "once unreadable files were skipped")
    manifest = make_split_manifest(data, val_fraction, test_fraction, seed)
    manifest["unreadable"] = [[os.path.relpath(p, data.root), reason] for p, reason in sorted(scan.unreadable.items())]
    # What --test-only needs to recognise training images by content (exact and near copies), wherever the
    # folder is later moved or copied.
    manifest["content_sha1"] = {os.path.relpath(p, data.root): sha1 for p, sha1 in sorted(scan.pixel_hash.items())}
    manifest["content_phash"] = {
        os.path.relpath(p, data.root): scan.perceptual_hash[scan.row[p]].tobytes().hex()
        for p in sorted(scan.pixel_hash)
    }
    leaks = find_leaks(manifest, scan)
    if leaks:
        exact = sum(leak["kind"] == "exact" for leak in leaks)
        action = (
            "all removed from the held-out side (--dedup)"
            if dedup
            else "exact copies removed from the held-out side; --dedup removes the near ones too"
        )
        print(
            f"WARNING: {exact} exact and {len(leaks) - exact} near-duplicate pairs between train, val and test "
            f"({action}); list in {manifest_path.name}",
            file=sys.stderr,
        )
        # An exact copy of a training image is never a test image; near copies are the user's call.
        manifest = drop_leaks(manifest, [leak for leak in leaks if dedup or leak["kind"] == "exact"])
        for side in ("val", "test"):  # AUC, thresholds and early stopping need both classes
            refuse_one_class(manifest[side], side, "once copies of training or validation images were removed "
                             "from it: add images of that class that are not copies")  # fmt: skip
    manifest["leaks"] = leaks
    caches = [
        decoded_cache(
            [path for path, _ in manifest_samples(manifest, side)],
            size,
            cache_dir,
            workers,
            (scan.pixels[size], scan.row) if size in scan.pixels else None,
        )
        for side, size in cache_sizes.items()
    ]
    scan.remove_pixels()
    if cache_dir is not None:  # what lets the next run on the same files and settings skip all of the above
        manifest["preparation"] = {"key": preparation, "caches": [Path(cache.filename).name for cache in caches]}
        kept = {*manifest["preparation"]["caches"], scan.record.name}
        # The caches and scans of earlier preparations, and partial files of killed ones
        remove_stale_files(cache_dir, ("decoded_*.npy", "scan_*.npz", ".*.tmp"), kept)
    write_json(manifest, manifest_path)
    print(data_report(manifest, manifest_path, [Path(cache.filename) for cache in caches]))
    return manifest


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
