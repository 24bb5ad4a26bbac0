"""Files that must survive a crash: atomic writes, JSON, and the checkpoint format.

A checkpoint is a plain dict of tensors and built-in types, so it loads with
torch.load(..., weights_only=True) and no file can run code when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD
from .model import build_model, count_trainable

CHECKPOINT_FORMAT = 1


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


def write_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


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
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": dict(config),
        "class_names": list(CLASS_NAMES),
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "trainable_parameters": count_trainable(model),
        **extra,
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
