"""Scoring new X-rays with a trained checkpoint: one image, or every file of a folder, into a CSV.

`image_tensor` is the one preprocessing path (decoding.load_xray, then the checkpoint's evaluation
transform) that batch prediction, serving, --test-only and GradCAM share, so all of them give an image
the same P(TB); with `screen` it also applies the one screening rule (`refuse_non_radiograph`,
`refuse_odd_size`) that all four use to leave out colour, multi-frame and strip-shaped files, each with
its reason (`FolderImages` for files on disk, the served model for uploads). `Predictor` holds a
checkpoint's network with its calibration and one of its stored operating points. A folder is streamed
through a DataLoader with workers: memory stays bounded whatever its size, and a file that cannot be used
becomes an `unreadable: <reason>` row, never an error.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import Checkpoint
from .config import CLASS_NAMES
from .data import checkpoint_transform
from .decoding import UNREADABLE_IMAGE_ERRORS, is_dicom_file, is_image_file, load_xray
from .errors import CheckpointError, DataError, OperatingPointError
from .metrics import format_threshold, probability_of, tb_log_odds
from .progress import track
from .runtime import ieee_float32, on_device

OK = "ok"
UNREADABLE = "unreadable"
# The decision is log_odds >= threshold_log_odds, both written in full (repr) digits so that no row contradicts
# its decision; p_tb and threshold_p_tb are the same numbers as P(TB), which can tie where the log-odds differ
# (float64 P(TB) has fewer distinct values near 1; it is 1.0 past log-odds ~37).
PREDICTION_COLUMNS = (
    "path",
    "status",
    "p_tb",
    "log_odds",
    "decision",
    "threshold_p_tb",
    "threshold_log_odds",
    "operating_point",
    "checkpoint",
)
# What a chest radiograph can look like: greyscale (a red marker or label is fine, a photograph is not), at
# least MIN_SIDE pixels a side and not a strip (frontal and lateral views are all well within 1:3).
MIN_SIDE = 32
MAX_ASPECT = 3.0
COLOUR_SPREAD = 32  # a pixel is coloured when its channels differ by more than this (of 255)
MAX_COLOURED_SHARE = 0.05  # JPEG's chroma noise on a greyscale picture stays far below both


class UnusableImage(ValueError):
    """A file that cannot be scored as a chest X-ray; the message is the reason, for the CSV's status."""


def checkpoint_digest(path: str | Path) -> str:
    """The first 12 hex digits of the file's SHA-256: which weights a prediction came from."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:12]


@dataclass
class Predictor:
    """A checkpoint's network ready to score: its evaluation transform, P(TB) calibration and one operating point."""

    checkpoint: Checkpoint
    model: nn.Module
    device: torch.device
    transform: object
    operating_point: str
    threshold: float
    digest: str
    # True in a process that set exact float32 once for good (runtime.set_exact_float32: the model server): no
    # flags saved and restored per batch, which would race between requests scored in threads side by side.
    precision_fixed: bool = False

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str = "cpu", operating_point: str | None = None
    ) -> Predictor:
        """Load the checkpoint file; a file that is not a ResNet50 of this project is an error naming it."""
        checkpoint = Checkpoint.load(path)
        return cls.for_checkpoint(checkpoint, path, device, operating_point, checkpoint_digest(path))

    @classmethod
    def for_checkpoint(
        cls,
        checkpoint: Checkpoint,
        path: str | Path,
        device: torch.device | str = "cpu",
        operating_point: str | None = None,
        digest: str = "",
    ) -> Predictor:
        """A checkpoint already loaded from `path` (named in errors)."""
        thresholds = checkpoint.state.thresholds
        name = operating_point or checkpoint.recommended_operating_point
        if name not in thresholds:
            raise OperatingPointError(path, name, thresholds)
        try:
            network = checkpoint.model()
        except RuntimeError as exc:  # load_state_dict: missing, unexpected or mis-shaped weights
            raise CheckpointError(path, f"its weights are not this project's ResNet50 ({str(exc)[:200]})") from exc
        device = torch.device(device)
        model = on_device(network, device).eval()  # the layout the trainer and --test-only score in
        return cls(checkpoint, model, device, checkpoint_transform(checkpoint), name, float(thresholds[name]), digest)

    def log_odds(self, batch: torch.Tensor) -> np.ndarray:
        """The calibrated log-odds of TB (float64) of a batch of transformed images; logits in exact float32."""
        with torch.no_grad(), nullcontext() if self.precision_fixed else ieee_float32():
            logits = self.model.eval()(batch.to(self.device)).float()
        return tb_log_odds(logits, self.checkpoint.state.calibration)

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """P(TB) of a batch of transformed images, with the checkpoint's calibration (float64)."""
        return probability_of(self.log_odds(batch))

    def decisions(self, log_odds: np.ndarray) -> np.ndarray:
        """True where the operating point calls Tuberculosis (log-odds >= its log-odds threshold)."""
        return np.asarray(log_odds) >= self.threshold

    @property
    def threshold_probability(self) -> float:
        return float(probability_of(self.threshold))


# --------------------------------------------------------------------------- one image
def image_tensor(source: str | Path | BinaryIO, transform, screen: bool = False) -> torch.Tensor:
    """An image file (path or open binary file) decoded by load_xray and transformed. With `screen`,
    files that do not look like a chest radiograph (colour, multi-frame, too small, a strip) are refused
    too. Every failure is an UnusableImage whose message is the reason."""
    if not isinstance(source, (str, Path)):
        return _from_file_object(source, transform, screen)
    try:
        if screen:
            refuse_non_radiograph(source)
        picture = load_xray(source)
    except UNREADABLE_IMAGE_ERRORS as exc:
        raise UnusableImage(reason_of(exc, source)) from exc
    if screen:
        refuse_odd_size(picture.size)
    return transform(picture)


def _from_file_object(source: BinaryIO, transform, screen: bool) -> torch.Tensor:
    """Bytes (an upload) go through a temporary file, so that they meet the very decoder a path does."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload"  # no extension: DICOM is recognised by content, others by Pillow
        with open(path, "wb") as f:
            shutil.copyfileobj(source, f)
        if not is_dicom_file(path):
            path = path.rename(path.with_suffix(".img"))
        return image_tensor(path, transform, screen)


def reason_of(exc: Exception, source: str | Path) -> str:
    """The decoder's message without the path it starts with (the CSV row names the file already)."""
    text = str(exc) or type(exc).__name__
    return text.removeprefix(f"{source}: ").replace(str(source), "the file")


def refuse_non_radiograph(path: str | Path) -> None:
    """Colour pictures and multi-frame files are no single chest radiograph (DICOM: load_xray checks)."""
    if os.path.getsize(path) == 0:
        raise UnusableImage("empty file")
    if is_dicom_file(path):
        return
    with Image.open(path) as img:
        if getattr(img, "n_frames", 1) > 1:
            raise UnusableImage(f"multi-frame image ({img.n_frames} frames); only single radiographs are scored")
        if img.mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
            spread = pixels.max(axis=-1) - pixels.min(axis=-1)
            if (spread > COLOUR_SPREAD).mean() > MAX_COLOURED_SHARE:
                raise UnusableImage("colour image, not a greyscale radiograph")


def refuse_odd_size(size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise UnusableImage(f"{width}x{height} pixels is not the size of a chest radiograph")


# --------------------------------------------------------------------------- a folder
def find_files(inputs: list[str | Path]) -> tuple[list[Path], Path]:
    """Every file under the given folders (recursively, sorted; hidden files and folders left out) and the
    given files, and the folder their CSV paths are relative to (the inputs' common folder)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            for folder, subfolders, names in os.walk(item):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                files += [Path(folder, name) for name in sorted(names) if not name.startswith(".")]
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"error: cannot read image {item}: no such file or folder")
    folders = [p if p.is_dir() else p.parent for p in map(Path, inputs)]
    return files, Path(os.path.commonpath([os.path.abspath(p) for p in folders])) if folders else Path()


class FolderImages(torch.utils.data.Dataset):
    """(index, tensor or None, status) for each file: status "ok", or "unreadable: <reason>" where the file is
    not an image or the screening rule (image_tensor with `screen`) leaves it out."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.files[index]
        try:
            if not is_image_file(path):
                return index, None, f"{UNREADABLE}: not an image file (PNG, JPEG, TIFF, BMP or DICOM)"
            return index, image_tensor(path, self.transform, screen=True), OK
        except UnusableImage as exc:
            return index, None, f"{UNREADABLE}: {exc}"
        except OSError as exc:  # is_image_file opens a file without extension (DICOM?): e.g. no read permission
            return index, None, f"{UNREADABLE}: {reason_of(exc, path)}"


def collate_scored(items: list[tuple[int, torch.Tensor | None, str]]):
    """Indices and statuses of the whole batch, and the readable images stacked (None when there are none)."""
    indices = [index for index, _, _ in items]
    statuses = [status for _, _, status in items]
    good = [tensor for _, tensor, _ in items if tensor is not None]
    return indices, statuses, torch.stack(good) if good else None


def left_out_reason(status: str) -> str:
    """The reason in an "unreadable: <reason>" status."""
    return status.removeprefix(f"{UNREADABLE}: ")


@dataclass
class Scored:
    """One file's prediction: its calibrated log-odds of TB, NaN for an unreadable file."""

    path: Path
    status: str
    log_odds: float

    @property
    def p_tb(self) -> float:
        return float(probability_of(self.log_odds))


def scored_batches(
    predictor: Predictor, files: list[Path], batch_size: int, num_workers: int
) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
    """(file indices, statuses, calibrated log-odds of TB of the batch's "ok" files) per batch, in file order,
    streamed: at most a few batches of images in memory."""
    loader = torch.utils.data.DataLoader(
        FolderImages(files, predictor.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_scored,
        pin_memory=predictor.device.type == "cuda",
    )
    for indices, statuses, images in track(loader, "predict", total=len(files), size=lambda b: len(b[0])):
        yield indices, statuses, predictor.log_odds(images) if images is not None else np.zeros(0)


def score_files(predictor: Predictor, files: list[Path], batch_size: int, num_workers: int) -> Iterator[list[Scored]]:
    """Batches of predictions in file order, streamed."""
    for indices, statuses, batch_scores in scored_batches(predictor, files, batch_size, num_workers):
        scores = iter(batch_scores)
        yield [Scored(files[i], s, float(next(scores)) if s == OK else float("nan")) for i, s in zip(indices, statuses)]


def score_labelled(
    predictor: Predictor, samples: list[tuple[str, int]], batch_size: int, num_workers: int
) -> tuple[list[tuple[str, int]], np.ndarray, dict[str, str]]:
    """Labelled (path, label) samples scored as a folder is: the samples the screening rule lets through, their
    calibrated log-odds of TB (as Predictor.log_odds gives them), and each left-out path with its reason."""
    kept, scores, left_out, files = [], [], {}, [Path(path) for path, _ in samples]
    for indices, statuses, batch_scores in scored_batches(predictor, files, batch_size, num_workers):
        scores.append(batch_scores)
        for i, status in zip(indices, statuses):
            if status == OK:
                kept.append(samples[i])
            else:
                left_out[samples[i][0]] = left_out_reason(status)
    return kept, np.concatenate(scores) if scores else np.zeros(0), left_out


def screened_scores(checkpoint: Checkpoint, samples, device, batch_size: int, num_workers: int, path=""):
    """A checkpoint (read from `path`, named in errors) on labelled samples, as batch prediction scores them (its
    predictor, transform and screening rule): the samples scored, their labels and calibrated log-odds of TB,
    and {path: reason} of those the screening rule left out."""
    predictor = Predictor.for_checkpoint(checkpoint, path or "in memory", device)
    kept, scores, left_out = score_labelled(predictor, samples, batch_size, num_workers)
    return kept, np.array([label for _, label in kept], dtype=np.int64), scores, left_out


def screen_samples(samples: list[tuple[str, int]], transform) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The samples the screening rule (FolderImages) lets through, and {path: reason} of the others: for a step
    that decodes its images itself (GradCAM)."""
    screened = FolderImages([Path(path) for path, _ in samples], transform)
    statuses = [screened[i][2] for i in range(len(samples))]
    kept = [sample for sample, status in zip(samples, statuses) if status == OK]
    return kept, {path: left_out_reason(status) for (path, _), status in zip(samples, statuses) if status != OK}


def left_out_listing(left_out: dict[str, str]) -> str:
    """How many files were left out per reason, and which (the first five)."""
    counts = ", ".join(f"{count} {reason}" for reason, count in Counter(left_out.values()).items())
    return f"{counts} ({', '.join(list(left_out)[:5])}{', ...' if len(left_out) > 5 else ''})"


class PredictionWriter:
    """The prediction CSV, written row by row (flushed per batch, so a long run can be watched)."""

    def __init__(self, path: Path, predictor: Predictor, base: Path):
        self.path, self.predictor, self.base = Path(path), predictor, base
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(PREDICTION_COLUMNS)

    def write(self, batch: list[Scored]) -> None:
        p = self.predictor
        for row in batch:
            ok = row.status == OK
            decision = CLASS_NAMES[int(p.decisions(row.log_odds))] if ok else ""
            relative = os.path.relpath(os.path.abspath(row.path), self.base)  # symlinks kept, as listed
            scores = [repr(row.p_tb), repr(row.log_odds)] if ok else ["", ""]
            threshold = [repr(p.threshold_probability), repr(p.threshold)]
            self._writer.writerow(
                [relative, row.status, *scores, decision, threshold[0], threshold[1], p.operating_point, p.digest]
            )
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def predict_to_csv(
    predictor: Predictor, files: list[Path], base: Path, csv_path: Path, batch_size: int, num_workers: int
) -> list[Scored]:
    """Score every file into the CSV; returns the rows (a path and two small values each) for a summary."""
    rows = []
    with PredictionWriter(csv_path, predictor, base) as writer:
        for batch in score_files(predictor, files, batch_size, num_workers):
            writer.write(batch)
            rows += batch
    return rows


def summary_line(rows: list[Scored], predictor: Predictor, csv_path: Path) -> str:
    ok = [row.log_odds for row in rows if row.status == OK]
    called = int(predictor.decisions(np.asarray(ok)).sum()) if ok else 0
    return (
        f"Predicted {len(rows)} files: {len(ok)} ok, {len(rows) - len(ok)} unreadable, {called} called Tuberculosis "
        f"at {format_threshold(predictor.threshold)} ({predictor.operating_point}); wrote {csv_path}"
    )


def write_labelled_predictions(path: Path, samples, scores: np.ndarray, thresholds: dict[str, float]) -> Path:
    """--test-only's per-image scores: path, true label, P(TB), log-odds (full digits: what decides) and the
    decision at each stored operating point (log-odds >= its threshold)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true_label", "p_tb", "log_odds", *(f"decision_{name}" for name in thresholds)])
        for (image, label), score in zip(samples, scores):
            decisions = [CLASS_NAMES[int(score >= threshold)] for threshold in thresholds.values()]
            p_tb = repr(float(probability_of(score)))
            writer.writerow([image, CLASS_NAMES[label], p_tb, repr(float(score)), *decisions])
    return Path(path)
