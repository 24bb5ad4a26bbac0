"""Side-by-side training throughput: the original design's input pipeline, this project's pipeline,
and compute only, measured in one process on one device.

    python benchmarks/bench_train.py --device cpu --images 600
    python benchmarks/bench_train.py --device cuda --images 4200 --batch-size 256 --compile

(a) original design: torchvision ImageFolder, PIL decode and per-image transforms every epoch,
    DataLoader with --workers processes;
(b) this project: images decoded once into a uint8 cache, augmented in batches on the device;
(c) compute only: the training step on a batch already on the device.
For (a) and (b) it measures the data path alone and the full training loop. It generates a
synthetic data set shaped like the Kaggle TB set once (512x512 PNG, 5:1 Normal:TB).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet50_tb_full import train_one_epoch  # noqa: E402
from tbcxr.cache import decoded_cache, train_cache_size  # noqa: E402
from tbcxr.config import IMAGENET_MEAN, IMAGENET_STD, image_size, non_negative_int, positive_int  # noqa: E402
from tbcxr.data import EpochSampler  # noqa: E402
from tbcxr.demo import synthetic_xray  # noqa: E402
from tbcxr.fast_data import CachedBatches, DeviceBatches  # noqa: E402
from tbcxr.model import build_model, build_optimizer  # noqa: E402
from tbcxr.runtime import autocast_dtype, resolve_device  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="device to measure on")
    parser.add_argument("--images", type=positive_int, default=4200, help="synthetic data set size")
    parser.add_argument("--source-size", type=positive_int, default=512, help="side of the generated PNGs")
    parser.add_argument("--image-size", type=image_size, default=224, help="model input size")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="training batch size")
    parser.add_argument(
        "--workers", type=non_negative_int, default=2, help="DataLoader workers for (a), decode threads for (b)"
    )
    parser.add_argument(
        "--loop-batches", type=positive_int, default=10, help="batches timed in each full loop and in compute only"
    )
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on for CUDA)"
    )
    parser.add_argument("--compile", action="store_true", help="also measure compute only with torch.compile")
    parser.add_argument(
        "--data-root", default=str(Path(__file__).parent / "data"), help="where the synthetic set is kept"
    )
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    return parser


def make_dataset(root: Path, count: int, size: int, workers: int) -> Path:
    """count synthetic PNG X-rays, one TB for every five Normal, in ImageFolder layout (kept once made)."""
    folder = root / f"synthetic_{count}_{size}px"
    if (folder / "COMPLETE").is_file():
        return folder
    tb_count = count // 6
    jobs = [(folder / "Tuberculosis" / f"tb_{i:05d}.png", True, i) for i in range(tb_count)]
    jobs += [(folder / "Normal" / f"normal_{i:05d}.png", False, i) for i in range(count - tb_count)]
    for name in ("Normal", "Tuberculosis"):
        (folder / name).mkdir(parents=True, exist_ok=True)

    def write(job):
        path, tuberculosis, i = job
        pixels = synthetic_xray(np.random.default_rng(i + 100_000 * tuberculosis), size, tuberculosis)
        Image.fromarray(pixels, mode="L").save(path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(write, jobs))
    (folder / "COMPLETE").write_text("synthetic benchmark data\n")
    return folder


def original_design_loader(root: Path, size: int, batch_size: int, workers: int, pin: bool):
    """The original design's pipeline: ImageFolder (PIL, RGB), per-image enhanced augmentation every epoch."""
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.8, 1.0)),
            transforms.RandomRotation(degrees=15),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), transform=transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def project_loader(root: Path, size: int, batch_size: int, workers: int, device: torch.device, cache_dir: Path):
    paths = sorted(str(p) for p in root.glob("*/*.png"))
    labels = [int(Path(p).parent.name == "Tuberculosis") for p in paths]
    started = time.perf_counter()
    cache = decoded_cache(paths, train_cache_size(size), cache_dir, workers)
    build_seconds = time.perf_counter() - started
    batches = CachedBatches(
        cache,
        labels,
        batch_size,
        EpochSampler(labels, 0, oversample=False),
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    return DeviceBatches(batches, device, size, augment=True, channels_last=device.type == "cuda"), build_seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_data(loader, device: torch.device, warmup: int = 2) -> float:
    """Images/s of one pass over the data alone (batches moved to the device, nothing computed)."""
    seen, started = 0, None
    for i, (images, _) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        if i == warmup - 1:
            synchronize(device)
            started = time.perf_counter()
        elif i >= warmup:
            seen += len(images)
    synchronize(device)
    return seen / (time.perf_counter() - started)


class Batches:
    """The first `count` batches of an endless or long batch source, as train_one_epoch expects: iterable,
    with a length and a batch size (its progress bar's total)."""

    def __init__(self, source, count: int, batch_size: int):
        self.source, self.count, self.batch_size = source, count, batch_size

    def __iter__(self):
        return itertools.islice(self.source, self.count)

    def __len__(self) -> int:
        return self.count


class Step:
    """The trainer's own model, optimizer and train_one_epoch, so the benchmark times what training runs."""

    def __init__(self, device: torch.device, amp_dtype, batch_size: int, compile_model: bool = False):
        self.device, self.amp_dtype, self.batch_size = device, amp_dtype, batch_size
        self.model = build_model("none").to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.optimizer = build_optimizer(self.model, 1e-4, 0.1)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def time_loop(step: Step, batches, count: int, warmup: int = 2) -> float:
    """Images/s of train_one_epoch over `count` batches from `batches`, after `warmup` untimed ones
    (worker start-up, cuDNN autotuning, compilation)."""
    source = iter(batches)

    def run(n: int) -> dict:
        return train_one_epoch(
            step.step_model,
            Batches(source, n, step.batch_size),
            torch.nn.CrossEntropyLoss(),
            step.optimizer,
            step.scaler,
            step.device,
            step.amp_dtype,
        )

    run(warmup)
    return run(count)["images_per_second"]


def repeat_batch(device, batch_size: int, size: int):
    images = torch.randn(batch_size, 3, size, size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 2, (batch_size,), device=device)
    while True:
        yield images, targets


def peak_memory(device: torch.device) -> dict[str, float]:
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {
        "gpu_max_allocated_mb": gpu,
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    amp_dtype = autocast_dtype(device, args.amp)
    torch.manual_seed(0)
    root = make_dataset(Path(args.data_root), args.images, args.source_size, max(2, args.workers))
    print(
        f"Device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{args.images} PNGs of {args.source_size}px -> {args.image_size}px, batch {args.batch_size}, "
        f"{args.workers} workers, autocast {amp_dtype}"
    )

    results: dict = {"config": vars(args), "device": str(device), "memory": {}}
    original_loader = original_design_loader(
        root, args.image_size, args.batch_size, args.workers, device.type == "cuda"
    )
    fast_loader, build_seconds = project_loader(
        root, args.image_size, args.batch_size, args.workers, device, Path(args.data_root) / "cache"
    )
    results["cache_build_seconds"] = build_seconds
    results["data_only"] = {"original": time_data(original_loader, device), "project": time_data(fast_loader, device)}

    step = Step(device, amp_dtype, args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results["full_loop"] = {
        "original": time_loop(step, original_loader, args.loop_batches),
        "project": time_loop(step, fast_loader, args.loop_batches),
    }
    results["compute_only"] = {
        "eager": time_loop(step, repeat_batch(device, args.batch_size, args.image_size), args.loop_batches)
    }
    results["memory"] = peak_memory(device)
    if args.compile:
        compiled = Step(device, amp_dtype, args.batch_size, compile_model=True)
        results["compute_only"]["compiled"] = time_loop(
            compiled, repeat_batch(device, args.batch_size, args.image_size), args.loop_batches, warmup=3
        )

    epochs, n = 30, args.images
    results["projected_30_epochs_seconds"] = {
        "original": epochs * n / results["full_loop"]["original"],
        "project": build_seconds + epochs * n / results["full_loop"]["project"],
    }
    compute = results["compute_only"]["eager"]
    rows = [
        ("data only (images/s)", results["data_only"]["original"], results["data_only"]["project"]),
        ("full training loop (images/s)", results["full_loop"]["original"], results["full_loop"]["project"]),
        ("full loop / compute only", *(results["full_loop"][k] / compute for k in ("original", "project"))),
        ("30 epochs, projected (s, no validation)", *results["projected_30_epochs_seconds"].values()),
    ]
    print(f"\n{'':42}{'original':>14}{'project':>14}{'project/orig.':>14}")
    for name, original, project in rows:
        print(f"{name:42}{original:14.2f}{project:14.2f}{project / original:14.2f}")
    print(
        f"{'compute only (images/s)':42}{compute:14.2f}"
        + "".join(f"   compiled: {v:.2f}" for k, v in results["compute_only"].items() if k == "compiled")
    )
    print(
        f"cache build (once): {build_seconds:.1f} s; "
        f"peak memory: GPU {results['memory']['gpu_max_allocated_mb']:.0f} MB, "
        f"process RSS {results['memory']['process_max_rss_mb']:.0f} MB"
    )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
