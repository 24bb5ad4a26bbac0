"""One training run's state and the objects it holds, apart from the trainer's stages.

RunState is what the epoch loop changes and every checkpoint stores; Run bundles the settings,
data, model, optimizer and MLflow logger of one run with the paths it writes and `save()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from .config import (
    CLAHE,
    CLASS_NAMES,
    LAST_CHECKPOINT_NAME,
    MANIFEST_NAME,
    PENDING_RECORDS_NAME,
    Profile,
    best_checkpoint_path,
)
from .data import split_digest
from .model import count_trainable, group_lrs
from .runtime import DistributedContext
from .tracking import RunLogger, SilentLogger, continue_run, resolve_tracking_uri, start_run


def loss_function(balance: str, train_labels: list[int], device: torch.device) -> nn.Module:
    """Cross-entropy, weighted by inverse class frequency with --balance class-weight."""
    if balance != "class-weight":
        return nn.CrossEntropyLoss()
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(len(CLASS_NAMES)), y=np.asarray(train_labels))
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


class NonFiniteLossError(SystemExit):
    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(
            f"error: the training loss became {value} at epoch {epoch}, batch {batch}. The best checkpoint is "
            "untouched. Start a new run with a lower learning rate (--lr; a resumed run keeps its rates), or "
            "resume with full precision (--no-amp)."
        )


def load_resumable(path: str) -> dict:
    """A checkpoint that keeps its training state (last.pth or a periodic one), for --resume."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint:
        raise SystemExit(
            f"error: {path} holds weights only (a best_*.pth file); resume from last.pth or a periodic "
            "checkpoint beside it, which keep the optimizer state"
        )
    last = Path(path).parent / LAST_CHECKPOINT_NAME
    if last.is_file() and not last.samefile(path):
        latest = load_checkpoint(last)
        if latest.get("mlflow_run_id") == checkpoint.get("mlflow_run_id") and latest["epoch"] > checkpoint["epoch"]:
            raise SystemExit(
                f"error: {path} is epoch {checkpoint['epoch']} of a run that {last} has carried on to epoch "
                f"{latest['epoch']}: going back would log the epochs after {checkpoint['epoch']} into its MLflow run "
                "a second time and keep a best checkpoint chosen among epochs the resumed run drops. Resume from "
                f"{last}, or score {path} with --test-only"
            )
    return checkpoint


def fixed_on_resume(saved: dict) -> dict[str, str]:
    """The settings a resumed run keeps as they were saved, each with the reason."""
    fixed = {"selection": "the best checkpoint so far was chosen by its rule"}
    fixed |= dict.fromkeys(("lr", "backbone_lr_mult", "lr_scale"), "the optimizer's saved state holds the rates")
    fixed["freeze_features"] = "the optimizer's saved state holds the trained layers"
    fixed["recipe"] = "the run goes on with its saved settings"
    fixed["schedule"] = "the scheduler's saved state holds it"
    if saved["schedule"] == "plateau":
        fixed["scheduler_patience"] = "the scheduler's saved state holds it"
    else:
        fixed |= dict.fromkeys(("epochs", "warmup_epochs"), "they laid out the cosine schedule at the start")
    return fixed


@dataclass
class RunState:
    """What the epoch loop changes; saved in every checkpoint, restored by --resume."""

    epoch: int = 0
    best_score: list = field(default_factory=lambda: [-1.0, -float("inf")])  # [val AUC, -val loss]
    best_epoch: int = 0
    stale_epochs: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    completed: bool = False
    thresholds: dict = field(default_factory=lambda: {"default": 0.5})
    temperature: float = 1.0
    operating_points_epoch: int = 0  # the epoch whose weights and validation the thresholds come from
    peak_memory_mb: float = 0.0


@dataclass
class Run:
    """Everything one training run holds: settings, where it writes, data, model, optimizer and tracking."""

    config: Any  # the trainer's TrainConfig
    dist: DistributedContext
    device: torch.device
    amp_dtype: torch.dtype | None
    profile: Profile
    checkpoint_dir: Path
    manifest: dict = field(default_factory=dict)
    loaders: tuple = ()
    model: nn.Module | None = None
    step_model: nn.Module | None = None  # DDP and/or torch.compile wrappers around `model`
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
    scaler: torch.amp.GradScaler | None = None
    criterion: nn.Module | None = None
    logger: RunLogger | SilentLogger = field(default_factory=SilentLogger)
    state: RunState = field(default_factory=RunState)

    @cached_property
    def manifest_digest(self) -> str:
        """Of the manifest, which is set before the first save and never changes: not recomputed per save."""
        return split_digest(self.manifest)

    @property
    def manifest_path(self) -> Path:
        return self.checkpoint_dir / MANIFEST_NAME

    @property
    def last_path(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT_NAME

    @property
    def best_path(self) -> Path:
        return best_checkpoint_path(self.checkpoint_dir, self.config.freeze_features)

    @property
    def pending_path(self) -> Path:
        return self.checkpoint_dir / PENDING_RECORDS_NAME

    @property
    def resume_command(self) -> str:
        return f"python resnet50_tb_full.py --resume {self.last_path}"

    @property
    def stopped_early(self) -> bool:
        """Early stopping belongs to the plateau schedule; a cosine schedule's length is --epochs."""
        return self.config.schedule == "plateau" and self.state.stale_epochs >= self.config.early_stop_patience

    def save(self, path: Path, include_training_state: bool = True) -> None:
        """Write a checkpoint of the current weights and state (rank 0 only)."""
        if not self.dist.is_main:
            return
        checkpoint = checkpoint_dict(
            self.model,
            asdict(self.config),
            self.config.image_size,
            mlflow_run_id=self.logger.run_id,
            tracking_uri=self.logger.tracking_uri,
            # what evaluation and GradCAM must redo to see the images as training did
            preprocessing={"clahe": dict(CLAHE)} if self.config.clahe else {},
            split_digest=self.manifest_digest,
            **asdict(self.state),
        )
        if include_training_state:
            checkpoint |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
        save_checkpoint(checkpoint, path)

    def open_tracking(self, resumed: dict | None) -> None:
        """Continue a resumed checkpoint's MLflow run, or start one with the config, sizes and split manifest."""
        if resumed:
            self.logger = continue_run(resumed, self.pending_path)
            return
        tracking_uri, source = resolve_tracking_uri(self.config.tracking_uri, self.profile.port)
        print(f"MLflow: {tracking_uri} ({source}), experiment {self.config.experiment}")
        run_name = f"{self.profile.model_stem}-{datetime.now():%Y%m%d-%H%M%S}"
        self.logger = start_run(tracking_uri, self.config.experiment, run_name, asdict(self.config), self.pending_path)
        world = self.dist.world_size
        self.logger.log_metrics({"trainable_parameters": count_trainable(self.model), "world_size": world,
                                 "global_batch_size": self.config.batch_size * world})  # fmt: skip
        self.logger.log_artifact(self.manifest_path)

    def restore(self, resumed: dict) -> None:
        """Weights, optimizer, scheduler, scaler and state of a checkpoint that keeps its training state."""
        self.model.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(resumed["scheduler"])
        if resumed["scaler"]:  # empty when the run was saved without fp16 (a disabled GradScaler)
            self.scaler.load_state_dict(resumed["scaler"])
        self.state = RunState(**{key: resumed[key] for key in asdict(RunState()) if key in resumed})

    def summary(self, best_epoch: int, test_metrics: dict) -> dict:
        """What summary.json records about the finished run."""
        return {
            "test_metrics": test_metrics, "best_epoch": best_epoch, "epochs_trained": self.state.epoch,
            "train_seconds": self.state.train_seconds, "peak_memory_mb": self.state.peak_memory_mb,
            "trainable_parameters": count_trainable(self.model), "best_checkpoint": str(self.best_path),
            "last_checkpoint": str(self.last_path), "split_manifest": str(self.manifest_path),
            "mlflow_run_id": self.logger.run_id, "tracking_uri": self.logger.tracking_uri,
            "experiment": self.config.experiment, "config": asdict(self.config),
        }  # fmt: skip

    def print_header(self, lr_mult: float) -> None:
        """The original design's opening lines, then where the data and the processes are."""
        config, manifest, run = self.config, self.manifest, self
        print(f"Training ResNet50 for TB classification - {run.profile.title}")
        print(f"Device: {run.device}")
        if config.freeze_features:
            print("FEATURES FROZEN - only the final layer trains (transfer-learning baseline)")
        else:
            print("ALL LAYERS TRAINABLE - Full network training enabled")
        print(f"Model has {count_trainable(run.model):,} trainable parameters")
        # The rates as set: a warm-up schedule has already lowered the current ones.
        lrs = group_lrs(run.optimizer, as_set=True)
        if "backbone" in lrs:
            print(f"Using different learning rates: Backbone {lrs['backbone']:.2e}, Classifier {lrs['classifier']:.2e}")
        else:
            print(f"Using a single learning rate: Classifier {lrs['classifier']:.2e}")
        if config.recipe == "from-scratch":
            options = (("CLAHE", config.clahe), ("intensity augmentation", config.intensity_augment))
            extras = [name for name, on in options if on]
            warmup = f", {config.warmup_epochs}-epoch warm-up" if config.schedule == "cosine" else ""
            print(f"From-scratch recipe for random initial weights ({config.schedule} schedule{warmup}"
                  f"{''.join(', ' + e for e in extras)}); --recipe original: the original design's")  # fmt: skip
        print(
            f"Data: {manifest['layout']} layout in {manifest['data_dir']}; "
            + ", ".join(f"{side} {len(manifest[side])}" for side in ("train", "val", "test"))
            + " images; "
            + (
                "decoded once into a cache, augmented in batches on the device"
                if config.fast_data
                else "per-image PIL transforms"
            )
        )
        if run.dist.active:
            world = run.dist.world_size
            print(
                f"Distributed: {world} processes ({torch.distributed.get_backend()}); global batch "
                f"{config.batch_size} x {world} = {config.batch_size * world}; learning rates "
                + (f"x {lr_mult:g} (--lr-scale {config.lr_scale})" if lr_mult != 1 else "unscaled (--lr-scale none)")
            )
