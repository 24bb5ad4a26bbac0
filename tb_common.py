"""Shared pieces of the TB chest X-ray scripts (trainer and GradCAM).

One flat module: configuration, data discovery and splits, image loading and
transforms, the ResNet50 builder, checkpoint I/O, metrics and MLflow set-up.
Nothing here runs at import time; MLflow is imported lazily so the training
core works on machines that lack it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision import models, transforms

CLASS_NAMES = ("Normal", "Tuberculosis")
POSITIVE_CLASS = 1  # Tuberculosis: sensitivity is recall on this class
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MANIFEST_NAME = "split_manifest.json"
SUMMARY_NAME = "summary.json"
LAST_CHECKPOINT_NAME = "last.pth"
PENDING_RECORDS_NAME = "mlflow_pending.jsonl"
CHECKPOINT_FORMAT = 1
DEMO_DATA_DIR = "demo_data"

EXPECTED_LAYOUT = """Expected one of these layouts (class folder names match case-insensitively):
  organized:  DIR/train/Normal/*.png  DIR/train/Tuberculosis/*.png
              DIR/test/Normal/*.png   DIR/test/Tuberculosis/*.png
  raw Kaggle: DIR/Normal/*.png        DIR/Tuberculosis/*.png
              (or one folder deeper, e.g. DIR/TB_Chest_Radiography_Database/Normal)
No data at hand? Run with --demo to generate a small synthetic data set."""


# --------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """What differs between full training and the seed's transfer-learning baseline."""

    title: str
    experiment: str
    port: int
    checkpoint_dir: str
    model_stem: str
    gradcam_label: str
    gradcam_dir: str


FULL_TRAINING = Profile(
    title="FULL NETWORK TRAINING",
    experiment="ResNet50_TB_FullTraining",
    port=5003,
    checkpoint_dir="checkpoints/resnet50_tb_full",
    model_stem="resnet50_tb_full_trained",
    gradcam_label="full_training",
    gradcam_dir="gradcam_results/resnet50_tb_full",
)
TRANSFER_LEARNING = Profile(
    title="TRANSFER LEARNING (final layer only)",
    experiment="ResNet50_TB_FineTuning",
    port=5001,
    checkpoint_dir="checkpoints/resnet50_tb",
    model_stem="resnet50_tb_finetuned",
    gradcam_label="transfer_learning",
    gradcam_dir="gradcam_results/resnet50_tb",
)


def profile_for(freeze_features: bool) -> Profile:
    return TRANSFER_LEARNING if freeze_features else FULL_TRAINING


def best_checkpoint_path(checkpoint_dir: str | Path, freeze_features: bool) -> Path:
    return Path(checkpoint_dir) / f"best_{profile_for(freeze_features).model_stem}.pth"


# --------------------------------------------------------------------------- config -> argparse
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """Add one kebab-case flag per dataclass field.

    Defaults are argparse.SUPPRESS so the namespace holds only what the user typed:
    that lets profile defaults (--freeze-features, --demo) and a resumed checkpoint's
    config sit underneath explicit flags.
    """
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{meta.pop('help')} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
        kwargs = dict(default=argparse.SUPPRESS, help=help_text, **meta)
        if f.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = {"int": int, "float": float}.get(f.type, str)
        parser.add_argument(_flag(f.name), **kwargs)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 pixels (ResNet50 downsamples 32x), got {text}")
    return value


def refuse_inside(output: str | Path, data_dir: str | Path, flag: str) -> None:
    """Outputs never go inside the data folder: a later scan would take them for data."""
    if data_dir and Path(output).resolve().is_relative_to(Path(data_dir).resolve()):
        raise SystemExit(f"error: {flag} {output} lies inside the data folder {data_dir}; choose a folder outside it")


# --------------------------------------------------------------------------- runtime helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The dtype AMP runs in, or None when AMP is off. Default: on for CUDA only."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # needs a GradScaler
    return torch.bfloat16


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak process RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------- torchrun (DistributedDataParallel)
@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a torchrun job; one process without torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return DistributedContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(torch.distributed.get_rank(), world_size), device


def barrier(ctx: DistributedContext) -> None:
    if ctx.active:
        torch.distributed.barrier()


class main_process_first:
    """Rank 0 runs the block first (scans data, builds caches); the others then find its files."""

    def __init__(self, ctx: DistributedContext):
        self.ctx = ctx

    def __enter__(self):
        if not self.ctx.is_main:
            barrier(self.ctx)

    def __exit__(self, *exc):
        if self.ctx.is_main and exc[0] is None:
            barrier(self.ctx)
        return False


def shard(items: list, ctx: DistributedContext) -> list:
    """This rank's share: padded (like DistributedSampler) to a multiple of the world size, strided."""
    if not ctx.active:
        return items
    padded = items + items[: (-len(items)) % ctx.world_size]
    return padded[ctx.rank::ctx.world_size]


def gather_shards(tensor: torch.Tensor, ctx: DistributedContext, total: int) -> torch.Tensor:
    """Undo `shard`: every rank's equally long part, back in the original order, padding dropped."""
    if not ctx.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]


def broadcast_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Give every rank rank 0's BatchNorm running statistics: each rank updated its own copy with
    its last local batch, and evaluation must use the weights the checkpoint holds."""
    if ctx.active:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if ctx.active:
        torch.distributed.all_reduce(tensor)
    return tensor


class ShardOrder(torch.utils.data.Sampler[tuple[int, int]]):
    """Evaluation order: this rank's shard of 0..n-1, as (index, seed) pairs like EpochSampler's."""

    def __init__(self, count: int, ctx: DistributedContext):
        self.order = [(i, 0) for i in shard(list(range(count)), ctx)]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data discovery
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
    """Image files in a folder, sorted; skips hidden files (.DS_Store), Thumbs.db, spreadsheets."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


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
            raise DataLayoutError(f"{root} has a train folder but not train/ and test/ each with Normal and Tuberculosis")
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
    held_out = max(len(CLASS_NAMES), round(fraction * len(samples)))
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


def manifest_samples(manifest: dict, side: str) -> list[tuple[str, int]]:
    root = Path(manifest["data_dir"])
    return [(str(root / rel), int(label)) for rel, label in manifest[side]]


def test_samples(checkpoint_path: Path, data_dir: str = "") -> tuple[list[tuple[str, int]], str]:
    """The labelled images to test a checkpoint on, and where they come from.

    An organized DIR gives its test/ side. A raw DIR that the checkpoint was trained on gives
    the test side of the split manifest beside the checkpoint; any other raw DIR (an external
    hospital's Normal/Tuberculosis folders) is used whole. No DIR: the manifest's test side."""
    manifest_path = Path(checkpoint_path).parent / MANIFEST_NAME
    manifest = read_json(manifest_path) if manifest_path.is_file() else None
    if data_dir:
        data = discover_dataset(data_dir)
        if data.test is not None:
            return data.test, f"test/ side of {data.root}"
        if manifest is None or Path(manifest["data_dir"]) != data.root:
            return data.train, f"all of {data.root} (external test set)"
    if manifest is None:
        raise SystemExit(f"error: no {MANIFEST_NAME} beside {checkpoint_path}; pass --data-dir with a "
                         "train/test layout or a labelled Normal/Tuberculosis folder")
    return manifest_samples(manifest, "test"), f"test side of {manifest_path}"


def write_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- images and transforms
def load_xray(path: str | Path) -> Image.Image:
    """Decode an X-ray as 8-bit greyscale, whatever its stored mode.

    Every image goes through greyscale first: the Kaggle set stores Normal cases as RGB
    and TB cases as greyscale, so the raw mode alone would give the label away.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit radiographs: Pillow's convert("L") would clip everything above 255 to white.
            pixels = np.asarray(img, dtype=np.float64)
            full_scale = 65535.0 if img.mode.startswith("I;16") or pixels.max() > 255 else 255.0
            return Image.fromarray(np.clip(pixels * (255.0 / full_scale) + 0.5, 0, 255).astype(np.uint8), mode="L")
        return img.convert("L")


# The seed's enhanced augmentation, shared by the per-image CPU transforms and the batched
# device augmentation so that both draw from the same ranges.
AUGMENTATION = {"crop_scale": (0.8, 1.0), "crop_ratio": (3 / 4, 4 / 3), "hflip_p": 0.5, "degrees": 15.0,
                "brightness": 0.2, "contrast": 0.2}


def train_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    """The seed's enhanced augmentation (saturation jitter dropped: a no-op on greyscale)."""
    a = AUGMENTATION
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=a["crop_scale"], ratio=a["crop_ratio"]),
        transforms.RandomHorizontalFlip(a["hflip_p"]),
        transforms.RandomRotation(degrees=a["degrees"]),
        transforms.ColorJitter(brightness=a["brightness"], contrast=a["contrast"]),
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


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


# --------------------------------------------------------------------------- fast data path
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
            for i, pixels in enumerate(tqdm(decoded, total=len(paths), desc=f"Caching {size}px", unit="img", leave=False)):
                cache[i] = pixels
        cache.flush()
        del cache
        os.replace(tmp, cache_path)
    return np.load(cache_path, mmap_mode="r")


class CachedBatches:
    """Batches of (uint8 images, labels) from a decoded cache, in a sampler's order.

    With an EpochSampler the batch order and each batch's augmentation seed depend only on
    (seed, epoch), like the per-image path. Batches are pinned for asynchronous copies."""

    def __init__(self, cache: np.ndarray, labels: list[int], batch_size: int, sampler=None,
                 drop_last: bool = False, pin_memory: bool = False):
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
            chunk = order[start:start + self.batch_size]
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
        "width": width, "height": height,
        "centre_x": uniform(-1, 1) * (1 - width), "centre_y": uniform(-1, 1) * (1 - height),
        "flip": torch.where(torch.rand(batch, generator=generator, device=device) < a["hflip_p"], -1.0, 1.0),
        "angle": uniform(-a["degrees"], a["degrees"]),
        "brightness": uniform(1 - a["brightness"], 1 + a["brightness"]),
        "contrast": uniform(1 - a["contrast"], 1 + a["contrast"]),
    }


def identity_augmentation(batch: int, device) -> dict[str, torch.Tensor]:
    ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
    return {"width": ones, "height": ones, "centre_x": zeros, "centre_y": zeros, "flip": ones, "angle": zeros,
            "brightness": ones, "contrast": ones}


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
    grid = torch.stack([per_image("width") * per_image("flip") * qx + per_image("centre_x"),
                        per_image("height") * qy + per_image("centre_y")], dim=-1)
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

    def __init__(self, batches: CachedBatches, device: torch.device, size: int, augment: bool,
                 channels_last: bool = False):
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


# Errors that mean "this file is not a usable image" (Pillow raises all of these).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class ImageScan:
    """One decode of every image: what could not be read, and hashes for the leak check."""

    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason
    pixel_hash: dict[str, str] = field(default_factory=dict)  # path -> sha1 of the decoded greyscale pixels
    perceptual_hash: dict[str, object] = field(default_factory=dict)  # path -> imagehash.ImageHash


def _scan_one(path: str):
    import hashlib

    import imagehash

    try:
        img = load_xray(path)
    except UNREADABLE_IMAGE_ERRORS as exc:
        return path, f"{type(exc).__name__}: {exc}", None, None
    return path, None, hashlib.sha1(img.tobytes() + str(img.size).encode()).hexdigest(), imagehash.phash(img, hash_size=16)


def scan_images(paths: list[str], workers: int = 4) -> ImageScan:
    """Decode every file once, in threads (Pillow releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    scan = ImageScan()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_scan_one, paths, chunksize=16)
        for path, error, pixel_hash, perceptual in tqdm(results, total=len(paths), desc="Checking images",
                                                         unit="img", leave=False):
            if error:
                scan.unreadable[path] = error
            else:
                scan.pixel_hash[path], scan.perceptual_hash[path] = pixel_hash, perceptual
    return scan


def find_leaks(manifest: dict, scan: ImageScan, max_distance: int = 10) -> list[dict]:
    """Exact (same decoded pixels) and near (256-bit perceptual hash within max_distance bits)
    duplicates between train and the held-out sides (val, test) and between val and test.

    On tb-cxr-mini, distinct real X-rays are at least 42 bits apart; a re-saved or
    slightly brightened copy is within a few bits."""
    root = Path(manifest["data_dir"])
    side_paths = {side: [str(root / rel) for rel, _ in manifest[side]] for side in ("train", "val", "test")}
    leaks = []
    for kept, held_out in (("train", "val"), ("train", "test"), ("val", "test")):
        a, b = side_paths[kept], side_paths[held_out]
        if not a or not b:
            continue
        bits_a = np.stack([scan.perceptual_hash[p].hash.ravel() for p in a])
        bits_b = np.stack([scan.perceptual_hash[p].hash.ravel() for p in b])
        distances = (bits_a[:, None, :] != bits_b[None, :, :]).sum(axis=2)
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            exact = scan.pixel_hash[a[i]] == scan.pixel_hash[b[j]]
            leaks.append({"kind": "exact" if exact else "near", "distance": int(distances[i, j]),
                          kept: os.path.relpath(a[i], root), held_out: os.path.relpath(b[j], root),
                          "held_out_side": held_out})
    return leaks


def drop_leaks(manifest: dict, leaks: list[dict]) -> dict:
    """Remove each leaking image from its held-out side (val or test); train keeps its copy."""
    dropped = {(leak["held_out_side"], leak[leak["held_out_side"]]) for leak in leaks}
    return manifest | {side: [[rel, label] for rel, label in manifest[side] if (side, rel) not in dropped]
                       for side in ("val", "test")}


# --------------------------------------------------------------------------- model
IMAGENET_WEIGHTS = models.ResNet50_Weights.IMAGENET1K_V2


class WeightsUnavailableError(SystemExit):
    def __init__(self, problem: str):
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
        super().__init__(
            f"error: ImageNet weights are not available ({problem}).\n"
            f"  - place the file at {cache} (download {IMAGENET_WEIGHTS.url} on a machine with internet), or\n"
            f"  - pass --weights PATH to a ResNet50 state dict or checkpoint, or\n"
            f"  - pass --weights none to train from scratch (random initialisation)."
        )


def load_backbone_state(weights: str) -> dict | None:
    """The ResNet50 state dict to start from: ImageNet, a local file, or None (random)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        try:  # torchvision reads the torch hub cache first and downloads only when it is missing
            return IMAGENET_WEIGHTS.get_state_dict(progress=True)
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            raise WeightsUnavailableError(str(exc)) from exc
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsUnavailableError(f"--weights file {path} is not a safe, readable state dict "
                                      f"({type(exc).__name__})") from exc
    return state.get("model", state) if isinstance(state, dict) else {}


def build_model(weights: str = "none", freeze_features: bool = False, num_classes: int = len(CLASS_NAMES)) -> nn.Module:
    """torchvision ResNet50 with a `num_classes` head; every layer trainable unless frozen."""
    model = models.resnet50(weights=None)
    state = load_backbone_state(weights)
    if state is not None:
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise WeightsUnavailableError(f"{weights} is not a ResNet50 state dict")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    for name, param in model.named_parameters():
        param.requires_grad = not (freeze_features and not name.startswith("fc."))
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(model: nn.Module, lr: float, backbone_lr_mult: float) -> torch.optim.Adam:
    """Adam with named groups: the backbone at lr * backbone_lr_mult, the classifier at lr."""
    classifier = [p for n, p in model.named_parameters() if n.startswith("fc.") and p.requires_grad]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.requires_grad]
    groups = [{"params": classifier, "lr": lr, "name": "classifier"}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return torch.optim.Adam(groups)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


# --------------------------------------------------------------------------- checkpoints
def atomic_write(path: Path, write) -> None:
    """Write via a temp file, fsync and rename, so a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the previous file at `path` stays as it was
        raise


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(checkpoint, f))


class CheckpointError(SystemExit):
    def __init__(self, path, problem: str):
        super().__init__(
            f"error: cannot use checkpoint {path}: {problem}.\n"
            "Train one first, e.g.: python resnet50_tb_full.py --data-dir DIR  (or --demo)"
        )


def checkpoint_dict(model: nn.Module, config: dict, image_size: int, **extra) -> dict:
    """The plain-dict checkpoint format both scripts read (weights_only-loadable)."""
    return {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": dict(config),
        "class_names": list(CLASS_NAMES), "image_size": image_size,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "trainable_parameters": count_trainable(model), **extra,
    }


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights_only=True: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(path, f"not a safe, readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT or "model" not in checkpoint:
        raise CheckpointError(path, "not a checkpoint written by resnet50_tb_full.py")
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    model = build_model("none", num_classes=len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"])
    return model


# --------------------------------------------------------------------------- metrics
THRESHOLD_FREE_METRICS = ("auc", "average_precision")
WHO_TRIAGE_SENSITIVITY = 0.90  # WHO target product profile for a TB triage test
WHO_TRIAGE_MIN_SPECIFICITY = 0.70


def threshold_metrics(labels, preds) -> dict[str, float]:
    """Metrics of hard predictions; TB is positive: sensitivity is TB recall, specificity Normal recall."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=0)
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)) if both_classes else float("nan"),
        "f1": float(f1[POSITIVE_CLASS]),
        "sensitivity": float(recall[POSITIVE_CLASS]),
        "specificity": float(recall[1 - POSITIVE_CLASS]),
        "precision": float(precision[POSITIVE_CLASS]),
    }


def ranking_metrics(labels, probs) -> dict[str, float]:
    """Threshold-free metrics: ROC AUC and average precision (NaN when one class is missing)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "average_precision": float("nan")}
    return {"auc": float(roc_auc_score(labels, probs)), "average_precision": float(average_precision_score(labels, probs))}


def classification_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    labels, probs = np.asarray(labels), np.asarray(probs)
    return threshold_metrics(labels, (probs >= threshold).astype(int)) | ranking_metrics(labels, probs)


def bootstrap_indices(labels, resamples: int, seed: int):
    """Seeded, class-stratified bootstrap resamples of range(len(labels)); the same seed gives the
    same resamples, so two models scored on the same images are paired."""
    from sklearn.utils import resample

    rng = np.random.RandomState(seed)
    index = np.arange(len(labels))
    for _ in range(resamples):
        yield resample(index, stratify=labels, random_state=rng)


def bootstrap_metrics(labels, probs, thresholds: dict[str, float], resamples: int = 1000,
                      seed: int = 0) -> dict[str, list[dict]]:
    """classification_metrics at each threshold on the same seeded, class-stratified resamples."""
    import sklearn

    labels, probs = np.asarray(labels), np.asarray(probs)
    draws = {name: [] for name in thresholds}
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):  # inputs checked once above
        for i in bootstrap_indices(labels, resamples, seed):
            ranking = ranking_metrics(labels[i], probs[i])
            for name, threshold in thresholds.items():
                draws[name].append(threshold_metrics(labels[i], (probs[i] >= threshold).astype(int)) | ranking)
    return draws


def with_intervals(point: dict[str, float], draws: list[dict], confidence: float = 0.95) -> dict[str, dict]:
    """{metric: {"value", "ci_low", "ci_high"}}: percentile intervals of the bootstrap draws."""
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, value in point.items():
        low, high = np.nanpercentile([d[name] for d in draws], [tail, 100 - tail])
        out[name] = {"value": value, "ci_low": float(low), "ci_high": float(high)}
    return out


def select_thresholds(labels, probs) -> dict[str, float]:
    """Operating points chosen on validation data: 0.5, Youden's J, and the WHO triage point
    (the highest threshold whose sensitivity reaches 0.90, i.e. the best specificity there)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, probs)
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve's first threshold is +inf
    who = int(np.nonzero(tpr >= WHO_TRIAGE_SENSITIVITY)[0][0])
    return {"default": 0.5, "youden": float(thresholds[np.argmax(tpr - fpr)]), "who_triage": float(thresholds[who])}


def operating_threshold(checkpoint: dict) -> float:
    """The threshold predictions use: Youden's J from validation when stored, else 0.5."""
    return float(checkpoint.get("thresholds", {}).get("youden", 0.5))


def tb_probability(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.float() / temperature).softmax(dim=1)[:, POSITIVE_CLASS]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising validation NLL of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    logits_t, labels_t = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)

    def nll(temperature: float) -> float:
        return float(nn.functional.cross_entropy(logits_t / temperature, labels_t))

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def expected_calibration_error(labels, probs, bins: int = 10) -> float:
    """ECE over equal-width bins of the TB probability (no library function exists for it)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    return float(sum(abs(labels[which == b].mean() - probs[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def format_results(prefix: str, metrics: dict[str, float]) -> str:
    return (f"{prefix} Results - Accuracy: {metrics['accuracy']:.4f}, F1: {metrics['f1']:.4f}, "
            f"Sensitivity: {metrics['sensitivity']:.4f}, Specificity: {metrics['specificity']:.4f}, "
            f"AUC: {metrics['auc']:.4f}")


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp_dtype=None):
    """Labels, float32 logits and mean cross-entropy over a loader."""
    model.eval()
    labels, logits, loss_sum = [], [], torch.zeros((), device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            batch_logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(batch_logits, targets, reduction="sum")
        logits.append(batch_logits)
        labels.append(targets)
    labels = torch.cat(labels).cpu().numpy()
    return labels, torch.cat(logits).cpu(), float(loss_sum) / max(1, len(labels))


# --------------------------------------------------------------------------- MLflow
def server_answers(uri: str, timeout: float = 1.0) -> bool:
    """True when an MLflow server answers its /health endpoint at `uri`."""
    host = urllib.parse.urlparse(uri).hostname or ""
    # A loopback probe never goes through a proxy; a fresh opener reads the proxy settings now.
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    try:
        with urllib.request.build_opener(*handlers).open(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def store_reachable(uri: str) -> bool:
    """Whether an MLflow store can be used from here: a server that answers, or an existing sqlite file."""
    if uri.startswith(("http://", "https://")):
        return server_answers(uri)
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return bool(uri)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def resolve_tracking_uri(explicit: str, port: int) -> tuple[str, str]:
    """Pick the MLflow store: an explicit URI, the local server on `port`, else sqlite."""
    explicit = explicit or os.environ.get("MLFLOW_TRACKING_URI", "")
    if explicit:
        if explicit.startswith(("http://", "https://")) and not server_answers(explicit, timeout=5.0):
            raise SystemExit(
                f"error: the MLflow tracking server {explicit} does not answer.\n"
                f"Start it with: mlflow server --host 127.0.0.1 --port {port}  (or drop --tracking-uri)"
            )
        return explicit, "given"
    local = f"http://127.0.0.1:{port}"
    if server_answers(local):
        return local, f"MLflow server on port {port}"
    return "sqlite:///mlflow.db", (
        f"no MLflow server on port {port}; logging to sqlite:///mlflow.db in this folder. "
        f"Browse it with: mlflow ui --host 127.0.0.1 --port {port}"
    )


# --------------------------------------------------------------------------- synthetic demo data
def synthetic_xray(rng: np.random.Generator, size: int, tuberculosis: bool) -> np.ndarray:
    """A crude, clearly synthetic chest radiograph: body, two lungs, ribs, noise;
    TB cases add bright opacities in the upper lobes. uint8, size x size."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.15 + 0.45 * (((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1)
    lung_centres = [(0.32 + rng.normal(0, 0.01), 0.5), (0.68 + rng.normal(0, 0.01), 0.5)]
    lungs = np.zeros_like(img, dtype=bool)
    for cx, cy in lung_centres:
        lungs |= ((xx - cx) / 0.14) ** 2 + ((yy - cy) / 0.3) ** 2 < 1
    img = np.where(lungs, 0.22, img)
    for rib_y in np.linspace(0.25, 0.75, 7) + rng.normal(0, 0.01):
        rib = np.abs(yy - rib_y - 0.05 * np.cos(np.pi * (xx - 0.5) * 2.2)) < 0.012
        img = img + 0.12 * (rib & lungs)
    if tuberculosis:
        for _ in range(rng.integers(1, 4)):
            cx, cy = lung_centres[rng.integers(0, 2)]
            bx, by = cx + rng.uniform(-0.08, 0.08), cy - rng.uniform(0.1, 0.25)
            sigma = rng.uniform(0.025, 0.05)
            img = img + rng.uniform(0.25, 0.4) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sigma ** 2))
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_demo_dataset(root: str | Path, train_per_class: int = 100, test_per_class: int = 25,
                      size: int = 128, seed: int = 0) -> Path:
    """Write the synthetic demo set in the organized layout, once (kept if complete)."""
    root = Path(root)
    marker = root / "SYNTHETIC_DATA.txt"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = synthetic_xray(rng, size, tuberculosis=label == POSITIVE_CLASS)
                Image.fromarray(pixels, mode="L").save(folder / f"synthetic_{name.lower()}_{i:03d}.png")
    marker.write_text("SYNTHETIC images generated by tb_common.make_demo_dataset for --demo runs. "
                      "Not real radiographs; never use them to judge a model.\n")
    return root


class RunLogger:
    """Logs to one MLflow run and survives the store going away.

    The first failed call prints one warning; from then on nothing is sent, and every
    record (metrics, artifacts) goes to a JSON-lines file beside the checkpoints.
    `replay_pending()` sends that file on the next `--resume` that reaches the store.
    """

    def __init__(self, tracking_uri: str, run_id: str, pending_path: Path):
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id, self.pending_path = tracking_uri, run_id, Path(pending_path)
        self.client = MlflowClient(tracking_uri)
        self.offline = False

    @staticmethod
    def store_errors() -> tuple:
        import requests
        from mlflow.exceptions import MlflowException

        return (MlflowException, requests.RequestException, OSError)

    def _send(self, record: dict) -> None:
        from mlflow.entities import Metric

        if record["kind"] == "metrics":
            metrics = [Metric(key, value, record["timestamp"], record["step"]) for key, value in record["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        else:
            self.client.log_artifact(self.run_id, record["path"], artifact_path=record["artifact_path"])

    def _record(self, record: dict) -> None:
        if not self.offline:
            try:
                self._send(record)
                return
            except self.store_errors() as exc:
                self.offline = True
                print(f"WARNING: MLflow store {self.tracking_uri} stopped answering ({type(exc).__name__}); "
                      f"training goes on and unsent records are kept in {self.pending_path} "
                      "(replayed by --resume)", file=sys.stderr)
        with open(self.pending_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._record({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._record({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def replay_pending(self) -> int:
        """Send what an earlier, disconnected run queued; the file goes once all is sent."""
        if not self.pending_path.is_file():
            return 0
        records = [json.loads(line) for line in self.pending_path.read_text().splitlines() if line.strip()]
        for record in records:
            self._send(record)
        self.pending_path.unlink()
        return len(records)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def set_status(self, status: str) -> None:
        if not self.offline:
            try:
                self.client.update_run(self.run_id, status=status)
            except self.store_errors():
                self.offline = True
