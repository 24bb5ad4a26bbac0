"""One training run and the objects it holds, apart from the trainer's stages.

Training is what the trainer's build_training stage makes (model, optimizer, scheduler, scaler, loss);
Run is what changes as the run goes (its state, checkpoint.RunState, and its MLflow logger), with the
settings and objects that `save()` and `restore()` need and the paths the run writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, RunState, write_json
from .config import (
    CLAHE,
    CLASS_NAMES,
    LAST_CHECKPOINT_NAME,
    MANIFEST_NAME,
    PENDING_RECORDS_NAME,
    SUMMARY_NAME,
    Profile,
    best_checkpoint_path,
    profile_for,
)
from .errors import ConfigurationError, TrainingError
from .figures import save_test_figures
from .metrics import (
    THRESHOLD_NAMES,
    class_counts,
    classification_metrics,
    format_results,
    format_threshold,
    probability_of,
    proportion_counts,
    scalar_metrics,
    too_few_for_operating_points,
    with_intervals,
)
from .model import count_trainable, group_lrs
from .runtime import DistributedContext
from .tracking import RunLogger, SilentLogger, continue_run, resolve_tracking_uri, start_run
from .train_config import TrainConfig


def loss_function(balance: str, train_labels: list[int], device: torch.device) -> nn.Module:
    """Cross-entropy, weighted by inverse class frequency with --balance class-weight."""
    if balance != "class-weight":
        return nn.CrossEntropyLoss()
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(len(CLASS_NAMES)), y=np.asarray(train_labels))
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


def load_resumable(path: str) -> Checkpoint:
    """A checkpoint that keeps its training state (last.pth or a periodic one), for --resume."""
    checkpoint = Checkpoint.load(path)
    if not checkpoint.resumable:
        raise ConfigurationError(
            f"error: {path} holds weights only (a best_*.pth file); resume from last.pth or a periodic "
            "checkpoint beside it, which keep the optimizer state"
        )
    last = Path(path).parent / LAST_CHECKPOINT_NAME
    if last.is_file() and not last.samefile(path):
        latest = Checkpoint.load(last)
        epoch = checkpoint.state.epoch
        if latest.mlflow_run_id == checkpoint.mlflow_run_id and latest.state.epoch > epoch:
            raise ConfigurationError(
                f"error: {path} is epoch {epoch} of a run that {last} has carried on to epoch "
                f"{latest.state.epoch}: going back would log the epochs after {epoch} into its MLflow run "
                "a second time and keep a best checkpoint chosen among epochs the resumed run drops. Resume from "
                f"{last}, or score {path} with --test-only"
            )
    return checkpoint


def file_version(path: Path) -> tuple[int, int] | None:
    """A file's (inode, modification time), which an atomic replacement changes; None when there is none."""
    if not path.is_file():
        return None
    found = path.stat()
    return found.st_ino, found.st_mtime_ns


def lr_multiplier(lr_scale: str, world_size: int) -> float:
    """--lr-scale: the factor on the learning rates under torchrun (none: Adam's rates as set)."""
    return {"none": 1.0, "linear": world_size, "sqrt": world_size**0.5}[lr_scale]


@dataclass
class Training:
    """What build_training makes once: the model and what trains it."""

    model: nn.Module  # the plain model: checkpoints keep its keys
    step_model: nn.Module  # `model` in its DDP and/or torch.compile wrappers: what the training steps call
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None  # None: full precision
    device: torch.device  # where the model and the loss live


@dataclass
class Run:
    """One training run as it goes: its state and MLflow logger, with what saving and logging need."""

    config: TrainConfig
    dist: DistributedContext  # rank 0 saves and logs for the whole job
    training: Training  # every checkpoint holds its weights; last.pth also its optimizer, scheduler and scaler
    split_digest: str  # of the split manifest the run trains on, recorded in every checkpoint
    logger: RunLogger | SilentLogger = field(default_factory=SilentLogger)
    state: RunState = field(default_factory=RunState)
    # The file --resume goes on from and the epoch it holds: last.pth once this run has written it, else the
    # checkpoint the run was resumed from; None before either.
    resumable_file: tuple[Path, int] | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.checkpoint_dir)

    @property
    def profile(self) -> Profile:
        return profile_for(self.config.freeze_features)

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
    def summary_path(self) -> Path:
        return self.checkpoint_dir / SUMMARY_NAME

    @property
    def pending_path(self) -> Path:
        return self.checkpoint_dir / PENDING_RECORDS_NAME

    @property
    def resume_command(self) -> str:
        path = self.resumable_file[0] if self.resumable_file else self.last_path
        return f"python resnet50_tb_full.py --resume {path}"

    def interruption_report(self, epoch: int) -> str:
        """What Ctrl-C during `epoch` (training, validation, or saving and logging it) leaves to resume from."""
        if self.resumable_file is None:
            return f"Interrupted during epoch {epoch}, before any checkpoint was saved: start the run again."
        path, held = self.resumable_file
        saved = f"{path} holds it" if held == epoch else f"{path} holds epoch {held}"
        return f"Interrupted during epoch {epoch}; {saved}. Resume with:\n  {self.resume_command}"

    @property
    def stopped_early(self) -> bool:
        """Early stopping belongs to the plateau schedule; a cosine schedule's length is --epochs."""
        return self.config.schedule == "plateau" and self.state.stale_epochs >= self.config.early_stop_patience

    def save(self, path: Path, include_training_state: bool = True) -> None:
        """Write a checkpoint of the current weights and state (rank 0 only)."""
        if not self.dist.is_main:
            return
        training = self.training
        checkpoint = Checkpoint.from_model(
            training.model,
            asdict(self.config),
            self.config.image_size,
            state=self.state,
            clahe=dict(CLAHE) if self.config.clahe else None,
            split_digest=self.split_digest,
            mlflow_run_id=self.logger.run_id,
            tracking_uri=self.logger.tracking_uri,
        )
        if include_training_state:
            checkpoint.optimizer_state = training.optimizer.state_dict()
            checkpoint.scheduler_state = training.scheduler.state_dict()
            checkpoint.scaler_state = training.scaler.state_dict()
        replaced = file_version(path)
        try:
            checkpoint.save(path)
        finally:  # Ctrl-C during the write is raised once the file is whole: a new last.pth is recorded even so
            if path == self.last_path and file_version(path) != replaced:
                self.resumable_file = (path, self.state.epoch)

    def save_epoch(self, improved: bool) -> None:
        """The checkpoints of the epoch just validated: a periodic one every --save-every epochs, last.pth, and
        the best file when the epoch `improved` on the best so far."""
        epoch = self.state.epoch
        if epoch % self.config.save_every == 0:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            self.save(self.checkpoint_dir / f"{stamp}_epoch{epoch}_{self.profile.model_stem}.pth")
        # last.pth before the best file: a kill between the two leaves a best epoch that --resume rewrites from
        # last.pth, never a best file of an epoch the resumed run trains again.
        self.save(self.last_path)
        if improved:
            self.save(self.best_path, include_training_state=False)

    def open_tracking(self, resumed: Checkpoint | None) -> None:
        """Continue a resumed checkpoint's MLflow run, or start one with the config, sizes and split manifest."""
        if resumed:
            self.logger = continue_run(
                resumed.tracking_uri, resumed.mlflow_run_id, resumed.state.history, self.pending_path
            )
            return
        tracking_uri, source = resolve_tracking_uri(self.config.tracking_uri, self.profile.port)
        print(f"MLflow: {tracking_uri} ({source}), experiment {self.config.experiment}")
        run_name = f"{self.profile.model_stem}-{datetime.now():%Y%m%d-%H%M%S}"
        self.logger = start_run(tracking_uri, self.config.experiment, run_name, asdict(self.config), self.pending_path)
        world = self.dist.world_size
        self.logger.log_metrics({"trainable_parameters": count_trainable(self.training.model), "world_size": world,
                                 "global_batch_size": self.config.batch_size * world})  # fmt: skip
        self.logger.log_artifact(self.manifest_path)

    def restore(self, resumed: Checkpoint) -> None:
        """Weights, optimizer, scheduler, scaler and state of a checkpoint that keeps its training state."""
        training = self.training
        training.model.load_state_dict(resumed.model_state)
        training.optimizer.load_state_dict(resumed.optimizer_state)
        training.scheduler.load_state_dict(resumed.scheduler_state)
        if resumed.scaler_state:  # empty when the run was saved without fp16 (a disabled GradScaler)
            training.scaler.load_state_dict(resumed.scaler_state)
        self.state = resumed.state
        self.resumable_file = (Path(self.config.resume), resumed.state.epoch)

    def load_best(self) -> Checkpoint:
        """The best checkpoint, refused when this run did not write it (an earlier run's in the same folder):
        such a file is never scored."""
        best = Checkpoint.load(self.best_path)
        another_run = self.dist.is_main and best.mlflow_run_id != self.logger.run_id  # only rank 0 knows the run
        if best.state.epoch != self.state.best_epoch or another_run:
            raise TrainingError(
                f"error: {self.best_path} is not this run's best checkpoint: it holds epoch {best.state.epoch} of "
                f"MLflow run {best.mlflow_run_id}, this run chose epoch {self.state.best_epoch} of run "
                f"{self.logger.run_id}. Nothing was scored"
            )
        return best

    def record_test(self, best_epoch: int, test_results: dict, at_operating_point: dict) -> dict:
        """Log the test metrics and figures, and write summary.json (logged too); returns what it records.
        `at_operating_point`: the test metrics at the recommended operating point, with its name and threshold."""
        test_metrics = scalar_metrics(test_results, "test")
        # The intervals at the recommended operating point too (finite ones: MLflow refuses NaN bounds).
        name = at_operating_point["name"]
        bounds = {
            f"test_{name}_{metric}_ci_{side}": interval[f"ci_{side}"]
            for metric, interval in at_operating_point["intervals"].items()
            for side in ("low", "high")
        }
        self.logger.log_metrics(test_metrics | {k: v for k, v in bounds.items() if np.isfinite(v)})
        for path in save_test_figures(test_results["labels"], test_results["scores"], self.checkpoint_dir):
            self.logger.log_artifact(path, artifact_path="test")
        summary = {
            "test_metrics": test_metrics, "test_metrics_at_operating_point": at_operating_point,
            "best_epoch": best_epoch, "epochs_trained": self.state.epoch,
            "train_seconds": self.state.train_seconds, "peak_memory_mb": self.state.peak_memory_mb,
            "trainable_parameters": count_trainable(self.training.model), "best_checkpoint": str(self.best_path),
            "last_checkpoint": str(self.last_path), "split_manifest": str(self.manifest_path),
            "mlflow_run_id": self.logger.run_id, "tracking_uri": self.logger.tracking_uri,
            "experiment": self.config.experiment, "config": asdict(self.config),
        }  # fmt: skip
        write_json(summary, self.summary_path)
        self.logger.log_artifact(self.summary_path)
        return summary


def print_header(
    config: TrainConfig, recipe_reason: str, manifest: dict, training: Training, device, dist: DistributedContext
) -> None:
    """The original design's opening lines, then where the data and the processes are."""
    print(f"Training ResNet50 for TB classification - {profile_for(config.freeze_features).title}")
    print(f"Device: {device}")
    if config.freeze_features:
        print("FEATURES FROZEN - only the final layer trains (transfer-learning baseline)")
    else:
        print("ALL LAYERS TRAINABLE - Full network training enabled")
    print(f"Model has {count_trainable(training.model):,} trainable parameters")
    # The rates as set: a warm-up schedule has already lowered the current ones.
    lrs = group_lrs(training.optimizer, as_set=True)
    if "backbone" in lrs:
        print(f"Using different learning rates: Backbone {lrs['backbone']:.2e}, Classifier {lrs['classifier']:.2e}")
    else:
        print(f"Using a single learning rate: Classifier {lrs['classifier']:.2e}")
    print(f"Recipe: {config.recipe} ({recipe_reason})")
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
    if dist.active:
        world, lr_mult = dist.world_size, lr_multiplier(config.lr_scale, dist.world_size)
        print(
            f"Distributed: {world} processes ({torch.distributed.get_backend()}); global batch "
            f"{config.batch_size} x {world} = {config.batch_size * world}; learning rates "
            + (f"x {lr_mult:g} (--lr-scale {config.lr_scale})" if lr_mult != 1 else "unscaled (--lr-scale none)")
        )


def check_validation_size(temperature_scaling: bool, val_labels: list[int]) -> None:
    """Before training: refuse --temperature-scaling, and warn that the operating points are unreliable, when
    validation holds fewer than metrics.MINIMUM_VALIDATION_PER_CLASS images of a class."""
    why = too_few_for_operating_points(class_counts(val_labels))
    if why and temperature_scaling:
        raise ConfigurationError(
            f"error: --temperature-scaling refused: {why}. Fit it on a larger validation side (--val-fraction, "
            "more data), or train without it"
        )
    if why:
        print(f"WARNING: {why}; predictions, GradCAM and the served model all use them. Use a larger validation "
              "side (--val-fraction, more data), or refit the points on a site sample (--site-thresholds)")  # fmt: skip


def test_at_operating_point(best: Checkpoint, labels, scores) -> dict:
    """Print and return the test metrics at the best checkpoint's recommended operating point: the threshold
    (log-odds and P(TB)), the validation images it was chosen on, and Wilson / Newcombe 95% intervals."""
    name, threshold = best.recommended_operating_point, best.operating_threshold
    metrics = classification_metrics(labels, scores, threshold)
    where = f"{THRESHOLD_NAMES[name]} ({format_threshold(threshold)}, chosen on {best.operating_points_chosen_on_text})"
    print(format_results("Test", metrics, where))
    intervals = with_intervals(metrics, [], proportion_counts(labels, np.asarray(scores) >= threshold))
    return {
        "name": name,
        "threshold_log_odds": threshold,
        "threshold_p_tb": float(probability_of(threshold)),
        "validation_counts": best.state.validation_counts,
        **scalar_metrics(metrics, "test"),
        "intervals": {k: v for k, v in intervals.items() if v["method"] != "bootstrap"},
    }
