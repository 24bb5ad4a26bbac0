"""Batch prediction throughput against the bare model's forward pass, measured side by side in one process.

    python benchmarks/bench_predict.py                              # 600 PNGs at 224 px, on the CPU
    python benchmarks/bench_predict.py --images 10000 --workers 2   # peak memory on a large folder
    python benchmarks/bench_predict.py --device cuda --batch-size 64 --workers 8

(a) prediction: the path `resnet50_gradcam_tb_full.py --predictions FILE --maps none` takes
    (tbcxr.predict.predict_to_csv): files decoded and transformed in --workers DataLoader processes,
    the forward pass with the checkpoint's calibration, one CSV row per file;
(b) forward only: the bare network on the same batches, decoded beforehand (in this process, untimed):
    the ceiling (a) would reach if decoding cost nothing.
The ratio (a)/(b) says how much of the forward pass's speed the data path keeps: decoding in the
workers should overlap the forward pass. The files are measured in --rounds consecutive parts, (a) and
(b) taking turns to go first, so that a change in a shared machine's load falls on both alike; each
round of (a) starts its own workers, as each prediction run does. The model is a random-weight
checkpoint written with tbcxr.checkpoint.Checkpoint (no download); the images are the demo's synthetic
X-rays, generated once under --data-root (greyscale PNG of --source-size pixels, 5 Normal to 1
Tuberculosis). Peak memory is the resident set of this process and of the largest DataLoader worker
(getrusage): prediction streams, so neither should grow with --images.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tbcxr.checkpoint import Checkpoint  # noqa: E402
from tbcxr.config import image_size, non_negative_int, positive_int  # noqa: E402
from tbcxr.demo import synthetic_xray  # noqa: E402
from tbcxr.model import build_model  # noqa: E402
from tbcxr.predict import FolderImages, Predictor, collate_scored, find_files, predict_to_csv  # noqa: E402
from tbcxr.runtime import resolve_device  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=600, help="number of generated images to predict")
    parser.add_argument("--image-size", type=image_size, default=224, help="model input size (the checkpoint's)")
    parser.add_argument(
        "--source-size", type=image_size, default=None, help="side of the generated PNGs (default: --image-size)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (the GradCAM default)")
    parser.add_argument(
        "--workers", type=non_negative_int, default=2, help="DataLoader processes decoding images for prediction"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=4, help="parts of the files measured in turn, (a) then (b), (b) then (a)"
    )
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu", "mps"], help="device to measure on")
    parser.add_argument(
        "--data-root", default=str(Path(__file__).parent / "data"), help="where the generated images are kept"
    )
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    return parser


def make_images(root: Path, count: int, size: int) -> Path:
    """count synthetic greyscale PNG X-rays, one TB for every five Normal, in one folder (kept once made)."""
    folder = root / f"predict_{count}_{size}px"
    if (folder / "COMPLETE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        tuberculosis = i % 6 == 5
        pixels = synthetic_xray(np.random.default_rng(i), size, tuberculosis)
        Image.fromarray(pixels, mode="L").save(folder / f"xray_{i:05d}.png")

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(write, range(count)))
    (folder / "COMPLETE").write_text("synthetic benchmark data\n")
    return folder


def random_checkpoint(path: Path, size: int) -> Path:
    """A checkpoint of an untrained ResNet50: the speed of prediction does not depend on the weights."""
    torch.manual_seed(0)
    Checkpoint.from_model(build_model("none"), {"weights": "none"}, size).save(path)
    return path


def warm_up(predictor: Predictor, batch_size: int, size: int) -> None:
    """One untimed batch: the first forward pass allocates and selects kernels."""
    predictor.probabilities(torch.zeros(batch_size, 3, size, size))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward_only(predictor: Predictor, files: list[Path], batch_size: int) -> tuple[int, float]:
    """Images and seconds of the bare network on the prediction's batches: each batch is decoded in this
    process first (untimed), one at a time, so that memory stays bounded and nothing runs beside the forward
    pass."""
    batches = torch.utils.data.DataLoader(
        FolderImages(files, predictor.transform), batch_size=batch_size, num_workers=0, collate_fn=collate_scored
    )
    seen, seconds = 0, 0.0
    model, device = predictor.model, predictor.device
    for _, _, images in batches:
        images = images.to(device)
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            model(images)
        synchronize(device)
        seconds += time.perf_counter() - started
        seen += len(images)
    return seen, seconds


def time_prediction(
    predictor: Predictor, files: list[Path], base: Path, csv_path: Path, batch_size: int, workers: int
) -> tuple[int, float]:
    """Images scored ok (and written to the CSV) and seconds of predict_to_csv, worker start-up included."""
    started = time.perf_counter()
    rows = predict_to_csv(predictor, files, base, csv_path, batch_size, workers)
    seconds = time.perf_counter() - started
    written = sum(1 for _ in open(csv_path)) - 1
    scored = sum(row.status == "ok" for row in rows)
    if scored != len(files) or written != len(files):
        raise SystemExit(f"error: {scored} of {len(files)} images scored, {written} CSV rows")
    return scored, seconds


def rounds_of(files: list[Path], rounds: int, batch_size: int) -> list[list[Path]]:
    """Consecutive parts of whole batches, so that (a) and (b) see the same batches."""
    batches = -(-len(files) // batch_size)
    per_round = -(-batches // rounds) * batch_size
    return [files[start : start + per_round] for start in range(0, len(files), per_round)]


def measure(predictor: Predictor, files: list[Path], base: Path, scratch: Path, args) -> dict[str, float]:
    """Images/s of (a) and (b) over every file, measured round by round, taking turns to go first."""
    totals = {"prediction": [0, 0.0], "forward_only": [0, 0.0]}
    for number, part in enumerate(rounds_of(files, args.rounds, args.batch_size)):
        for name in sorted(totals, reverse=number % 2 == 1):
            if name == "prediction":
                csv_path = scratch / f"predictions_{number}.csv"
                images, seconds = time_prediction(predictor, part, base, csv_path, args.batch_size, args.workers)
            else:
                images, seconds = time_forward_only(predictor, part, args.batch_size)
            totals[name][0] += images
            totals[name][1] += seconds
    return {name: images / seconds for name, (images, seconds) in totals.items()}


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set of this process and of its largest finished child (a DataLoader worker); KiB on Linux."""
    return {
        "main_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    source_size = args.source_size or args.image_size
    folder = make_images(Path(args.data_root), args.images, source_size)
    files, base = find_files([folder])
    files = [path for path in files if path.suffix == ".png"]
    print(
        f"Device {device}, {torch.get_num_threads()} threads; {len(files)} PNGs of {source_size}px -> "
        f"{args.image_size}px, batch {args.batch_size}, {args.workers} workers, {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = random_checkpoint(Path(scratch) / "random.pth", args.image_size)
        predictor = Predictor.from_checkpoint(checkpoint, device)
        warm_up(predictor, args.batch_size, args.image_size)
        rates = measure(predictor, files, base, Path(scratch), args)
    prediction, forward_only = rates["prediction"], rates["forward_only"]

    results = {
        "config": vars(args) | {"source_size": source_size},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "images": len(files),
        "images_per_second": {"prediction": prediction, "forward_only": forward_only},
        "prediction_over_forward_only": prediction / forward_only,
        "peak_rss_mb": peak_rss_mb(),
    }
    rss = results["peak_rss_mb"]
    print(f"\n{'prediction (decode in workers + forward + CSV)':48}{prediction:10.2f} images/s")
    print(f"{'forward only (same batches, already decoded)':48}{forward_only:10.2f} images/s")
    print(f"{'prediction / forward only':48}{prediction / forward_only:10.3f}")
    print(f"peak RSS: main process {rss['main_process']:.0f} MB, largest worker {rss['largest_worker']:.0f} MB")
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
