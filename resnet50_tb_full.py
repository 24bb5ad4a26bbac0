"""Train ALL layers of an ImageNet-initialised ResNet50 to tell Normal from Tuberculosis
chest X-rays, tracked in MLflow (port 5003), with checkpoints for resnet50_gradcam_tb_full.py.

    python resnet50_tb_full.py --data-dir DIR          # organized train/test or raw Kaggle layout
    python resnet50_tb_full.py --demo                  # synthetic data, CPU, about a minute
    python resnet50_tb_full.py --freeze-features ...   # the seed's transfer-learning baseline
    python resnet50_tb_full.py --resume checkpoints/resnet50_tb_full/last.pth

Model selection, LR scheduling and early stopping use a validation split carved out of
train; the test set is scored once, at the end, on the best checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import tb_common as common


@dataclass
class TrainConfig:
    """Every setting of a training run; each field is a command-line flag."""

    data_dir: str = field(default="", metadata={"help": "data folder, organized train/test or raw Kaggle layout; also read from TB_DATA_DIR"})
    epochs: int = field(default=30, metadata={"help": "maximum number of epochs", "type": common.positive_int})
    batch_size: int = field(default=16, metadata={"help": "batch size (32 with --freeze-features)", "type": common.positive_int})
    lr: float = field(default=1e-4, metadata={"help": "classifier learning rate (1e-3 with --freeze-features)", "type": common.positive_float})
    backbone_lr_mult: float = field(default=0.1, metadata={"help": "backbone LR = lr x this", "type": common.positive_float})
    image_size: int = field(default=224, metadata={"help": "square input size in pixels", "type": common.image_size})
    weights: str = field(default="imagenet", metadata={"help": "initial weights: imagenet, none (random), or PATH to a state dict (--demo: none)"})
    freeze_features: bool = field(default=False, metadata={"help": "train only the final layer: the seed's transfer-learning baseline"})
    amp: bool | None = field(default=None, metadata={"help": "mixed precision (bf16, or fp16 with a GradScaler); default on for CUDA only"})
    device: str = field(default="auto", metadata={"help": "compute device", "choices": ["auto", "cuda", "cpu", "mps"]})
    num_workers: int = field(default=min(4, os.cpu_count() or 1), metadata={"help": "DataLoader worker processes", "type": common.non_negative_int})
    val_fraction: float = field(default=0.15, metadata={"help": "share of train held out for validation (stratified)", "type": common.open_fraction})
    test_fraction: float = field(default=0.2, metadata={"help": "share held out for test when the data has no train/test split", "type": common.open_fraction})
    scheduler_patience: int = field(default=3, metadata={"help": "ReduceLROnPlateau patience in epochs (on validation loss)", "type": common.non_negative_int})
    early_stop_patience: int = field(default=7, metadata={"help": "stop after this many epochs without a better validation AUC", "type": common.positive_int})
    balance: str = field(default="oversample", metadata={"help": "class imbalance handling", "choices": ["oversample", "class-weight", "none"]})
    seed: int = field(default=42, metadata={"help": "random seed for splits, sampling and initialisation"})
    save_every: int = field(default=5, metadata={"help": "also keep a timestamped checkpoint every N epochs", "type": common.positive_int})
    checkpoint_dir: str = field(default=common.FULL_TRAINING.checkpoint_dir, metadata={"help": "checkpoint folder (checkpoints/resnet50_tb with --freeze-features)"})
    tracking_uri: str = field(default="", metadata={"help": "MLflow tracking URI; default MLFLOW_TRACKING_URI, else http://127.0.0.1:5003 if it answers, else sqlite:///mlflow.db"})
    experiment: str = field(default=common.FULL_TRAINING.experiment, metadata={"help": "MLflow experiment name (ResNet50_TB_FineTuning with --freeze-features)"})
    resume: str = field(default="", metadata={"help": "continue from this checkpoint (e.g. checkpoints/resnet50_tb_full/last.pth)"})
    demo: bool = field(default=False, metadata={"help": "generate a small synthetic data set and run the whole pipeline on it"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic kernels, so a resumed run repeats an uninterrupted one exactly"})
    strict: bool = field(default=False, metadata={"help": "stop on unreadable image files instead of skipping them"})
    dedup: bool = field(default=False, metadata={"help": "drop exact and near duplicates of training images from validation and test"})


# Defaults that change with the mode; explicit flags still win over them.
TRANSFER_DEFAULTS = dict(lr=1e-3, batch_size=32, checkpoint_dir=common.TRANSFER_LEARNING.checkpoint_dir,
                         experiment=common.TRANSFER_LEARNING.experiment)
DEMO_DEFAULTS = dict(data_dir=common.DEMO_DATA_DIR, epochs=6, image_size=64, weights="none", lr=1e-3,
                     backbone_lr_mult=1.0, num_workers=0)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_dataclass_arguments(parser, TrainConfig)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Layer the config: dataclass defaults < mode defaults < resumed config < typed flags."""
    given = vars(get_args_parser().parse_args(argv))
    layered: dict = {}
    if os.environ.get("TB_DATA_DIR"):
        layered["data_dir"] = os.environ["TB_DATA_DIR"]
    if given.get("resume"):
        saved = dict(common.load_checkpoint(given["resume"])["config"])
        saved.pop("resume", None)
        layered |= saved
    else:
        if given.get("freeze_features"):
            layered |= TRANSFER_DEFAULTS
        if given.get("demo"):
            layered |= DEMO_DEFAULTS
    return TrainConfig(**(layered | given))


# --------------------------------------------------------------------------- data
class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Seeded per-epoch shuffle, optionally over a RandomOverSampler-balanced index set.

    Yields (index, augmentation seed) pairs that depend only on (seed, epoch), so a
    resumed run sees the same batches and the same augmentations, with any worker count.
    """

    def __init__(self, labels: list[int], seed: int, oversample: bool):
        self.labels, self.seed, self.oversample = np.asarray(labels), seed, oversample
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
        return iter(zip(indices.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        if self.oversample:
            return int(np.bincount(self.labels).max()) * len(np.unique(self.labels))
        return len(self.labels)


def make_loaders(manifest: dict, config: TrainConfig, device: torch.device):
    train = common.manifest_samples(manifest, "train")
    size = config.image_size
    sampler = EpochSampler([label for _, label in train], config.seed, config.balance == "oversample")
    loader_args = dict(num_workers=config.num_workers, pin_memory=device.type == "cuda",
                       persistent_workers=config.num_workers > 0)
    train_loader = torch.utils.data.DataLoader(
        common.XrayDataset(train, common.train_transform(size)), batch_size=config.batch_size,
        sampler=sampler, drop_last=len(sampler) > config.batch_size, **loader_args)
    eval_loaders = {
        side: torch.utils.data.DataLoader(
            common.XrayDataset(common.manifest_samples(manifest, side), common.eval_transform(size)),
            batch_size=config.batch_size * 2, shuffle=False, **loader_args)
        for side in ("val", "test")
    }
    return train_loader, eval_loaders["val"], eval_loaders["test"]


def loss_function(config: TrainConfig, train_labels: list[int], device: torch.device) -> nn.Module:
    if config.balance != "class-weight":
        return nn.CrossEntropyLoss()
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(len(common.CLASS_NAMES)), y=np.asarray(train_labels))
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


# --------------------------------------------------------------------------- train / evaluate
def train_one_epoch(model, loader, criterion, optimizer, scaler, device, amp_dtype=None, epoch: int = 0) -> dict:
    """One pass over the training loader; returns mean loss and accuracy."""
    model.train()
    loss_sum = torch.zeros((), device=device)  # running sums stay on the device: no per-step sync
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = skipped_steps = 0
    progress = tqdm(loader, desc=f"Epoch {epoch} train", unit="batch", leave=False, dynamic_ncols=True)
    for batch_index, (images, targets) in enumerate(progress, start=1):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(epoch, batch_index, loss.item())
        optimizer.zero_grad(set_to_none=True)
        scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # fp16: the scaler skips steps whose gradients overflowed and lowers its scale; that is normal.
        skipped_steps += scaler.is_enabled() and scaler.get_scale() < scale_before
        loss_sum += loss.detach() * len(targets)
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += len(targets)
    return {"loss": float(loss_sum) / seen, "accuracy": float(correct) / seen, "skipped_steps": int(skipped_steps)}


class NonFiniteLossError(SystemExit):
    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(
            f"error: the training loss became {value} at epoch {epoch}, batch {batch}. The best checkpoint is "
            "untouched. Try a lower learning rate (--lr) or full precision (--no-amp).")


def evaluate(model, loader, device, amp_dtype=None) -> dict:
    """Loss and classification metrics at threshold 0.5, plus the raw labels and probabilities."""
    labels, probs, loss = common.predict_probabilities(model, loader, device, amp_dtype)
    return {"loss": loss, **common.classification_metrics(labels, probs), "labels": labels, "probs": probs}


def scalar_metrics(results: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in results.items() if np.isscalar(v)}


# --------------------------------------------------------------------------- reports
def save_test_figures(labels, probs, out_dir: Path) -> list[Path]:
    """Confusion matrix and ROC curve PNGs plus the sklearn classification report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, classification_report

    preds = (probs >= 0.5).astype(int)
    paths = [out_dir / "confusion_matrix.png", out_dir / "roc_curve.png", out_dir / "classification_report.txt"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(labels, preds, display_labels=common.CLASS_NAMES, ax=ax, colorbar=False)
    ax.set_title("Test confusion matrix (threshold 0.5)")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if len(np.unique(labels)) == 2:
        RocCurveDisplay.from_predictions(labels, probs, ax=ax, name="ResNet50")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title("Test ROC curve (Tuberculosis positive)")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    report = classification_report(labels, preds, labels=[0, 1], target_names=common.CLASS_NAMES, zero_division=0)
    paths[2].write_text(report)
    return paths


def print_header(config: TrainConfig, device: torch.device, model: nn.Module, optimizer) -> None:
    profile = common.profile_for(config.freeze_features)
    print(f"Training ResNet50 for TB classification - {profile.title}")
    print(f"Device: {device}")
    if config.freeze_features:
        print("FEATURES FROZEN - only the final layer trains (transfer-learning baseline)")
    else:
        print("ALL LAYERS TRAINABLE - Full network training enabled")
    print(f"Model has {common.count_trainable(model):,} trainable parameters")
    lrs = common.group_lrs(optimizer)
    if "backbone" in lrs:
        print(f"Using different learning rates: Backbone {lrs['backbone']:.2e}, Classifier {lrs['classifier']:.2e}")
    else:
        print(f"Using a single learning rate: Classifier {lrs['classifier']:.2e}")


# --------------------------------------------------------------------------- data preparation
def prepare_manifest(config: TrainConfig, manifest_path: Path) -> dict:
    """Discover, decode-check, split and leak-check the data; write the split manifest."""
    data = common.discover_dataset(config.data_dir)
    paths = [path for path, _ in data.train + (data.test or [])]
    scan = common.scan_images(paths, workers=max(2, config.num_workers))
    if scan.unreadable:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(scan.unreadable.items()))
        if config.strict:
            raise SystemExit(f"error: {len(scan.unreadable)} image files cannot be read (--strict):\n{listing}")
        print(f"WARNING: skipping {len(scan.unreadable)} image files that cannot be read:\n{listing}", file=sys.stderr)
        data.train = [s for s in data.train if s[0] not in scan.unreadable]
        data.test = None if data.test is None else [s for s in data.test if s[0] not in scan.unreadable]
        for side, samples in (("train", data.train), ("test", data.test or data.train)):
            missing = set(range(len(common.CLASS_NAMES))) - {label for _, label in samples}
            if missing:
                raise common.DataLayoutError(
                    f"no readable {common.CLASS_NAMES[min(missing)]} images left on the {side} side")
    manifest = common.make_split_manifest(data, config.val_fraction, config.test_fraction, config.seed)
    manifest["unreadable"] = [[os.path.relpath(p, data.root), reason] for p, reason in sorted(scan.unreadable.items())]
    leaks = common.find_leaks(manifest, scan)
    if leaks:
        exact = sum(leak["kind"] == "exact" for leak in leaks)
        action = "removed from the held-out side (--dedup)" if config.dedup else "kept; --dedup removes them"
        print(f"WARNING: {exact} exact and {len(leaks) - exact} near-duplicate pairs between train, val and test "
              f"({action}); list in {manifest_path.name}", file=sys.stderr)
        if config.dedup:
            manifest = common.drop_leaks(manifest, leaks)
    manifest["leaks"] = leaks
    common.write_json(manifest, manifest_path)
    return manifest


# --------------------------------------------------------------------------- tracking
def start_tracking(config: TrainConfig, profile: common.Profile, resumed: dict | None, pending_path: Path):
    """A RunLogger for a new run, or for the resumed run with its queued records replayed."""
    # Fail over in seconds, not minutes, when a server disappears mid-run.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow.entities import Param

    if resumed:
        logger = common.RunLogger(resumed["tracking_uri"], resumed["mlflow_run_id"], pending_path)
        try:
            replayed = logger.replay_pending()
            history = resumed["history"]
            for key in ("val_loss",):  # epochs finished but never sent (killed between save and log)
                logged = logger.logged_steps(key)
                for record in history:
                    if record["epoch"] not in logged:
                        logger.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
            logger.set_status("RUNNING")
            print(f"MLflow: continuing run {logger.run_id} in {logger.tracking_uri}"
                  + (f" ({replayed} queued records replayed)" if replayed else ""))
        except logger.store_errors() as exc:
            logger.offline = True
            print(f"WARNING: MLflow store {logger.tracking_uri} does not answer ({type(exc).__name__}); "
                  f"records are queued in {pending_path}", file=sys.stderr)
        return logger
    tracking_uri, source = common.resolve_tracking_uri(config.tracking_uri, profile.port)
    print(f"MLflow: {tracking_uri} ({source}), experiment {config.experiment}")
    logger = common.RunLogger(tracking_uri, "", pending_path)
    experiment = logger.client.get_experiment_by_name(config.experiment)
    experiment_id = experiment.experiment_id if experiment else logger.client.create_experiment(config.experiment)
    run = logger.client.create_run(experiment_id,
                                   run_name=f"{profile.model_stem}-{datetime.now():%Y%m%d-%H%M%S}")
    logger.run_id = run.info.run_id
    pending_path.unlink(missing_ok=True)  # a queue left by an earlier run belongs to that run
    logger.client.log_batch(logger.run_id, params=[Param(k, str(v)) for k, v in asdict(config).items()])
    return logger


def log_model(logger: common.RunLogger, model: nn.Module, image_size: int) -> None:
    """The best model in MLflow's pt2 format (torch.export: loading it runs no pickled code)."""
    if logger.offline:
        return
    import mlflow

    example = np.zeros((2, 3, image_size, image_size), dtype=np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]  # given, so MLflow skips slow inference
    try:
        mlflow.set_tracking_uri(logger.tracking_uri)
        with mlflow.start_run(run_id=logger.run_id):
            mlflow.pytorch.log_model(model.cpu().eval(), name="model", input_example=example,
                                     pip_requirements=requirements)
    except logger.store_errors() as exc:
        logger.offline = True
        print(f"WARNING: could not log the model to MLflow ({type(exc).__name__}); "
              "it is in the best checkpoint; --resume logs it once the store answers", file=sys.stderr)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    if config.demo and config.data_dir == common.DEMO_DATA_DIR:
        common.make_demo_dataset(config.data_dir)
        print(f"Demo: SYNTHETIC chest X-rays in {config.data_dir}/ (not real data)")
    common.refuse_inside(config.checkpoint_dir, config.data_dir, "--checkpoint-dir")
    device = common.resolve_device(config.device)
    amp_dtype = common.autocast_dtype(device, config.amp)
    common.seed_everything(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    profile = common.profile_for(config.freeze_features)
    checkpoint_dir = Path(config.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = checkpoint_dir / common.MANIFEST_NAME
    last_path = checkpoint_dir / common.LAST_CHECKPOINT_NAME
    best_path = common.best_checkpoint_path(checkpoint_dir, config.freeze_features)
    pending_path = checkpoint_dir / common.PENDING_RECORDS_NAME

    # Data: reuse the saved split when resuming, so the test images never change.
    resumed = common.load_checkpoint(config.resume) if config.resume else None
    manifest = common.read_json(manifest_path) if resumed else prepare_manifest(config, manifest_path)
    train_loader, val_loader, test_loader = make_loaders(manifest, config, device)
    train_labels = [label for _, label in manifest["train"]]

    model = common.build_model(config.weights if not resumed else "none", config.freeze_features).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = not config.deterministic
    optimizer = common.build_optimizer(model, config.lr, config.backbone_lr_mult)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=config.scheduler_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = loss_function(config, train_labels, device)
    print_header(config, device, model, optimizer)
    print(f"Data: {manifest['layout']} layout in {manifest['data_dir']}; "
          + ", ".join(f"{side} {len(manifest[side])}" for side in ("train", "val", "test")) + " images")

    state = {"epoch": 0, "best_score": [-1.0, -float("inf")], "best_epoch": 0, "stale_epochs": 0,
             "history": [], "train_seconds": 0.0, "completed": False}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        state = {key: resumed[key] for key in state}
        print(f"Resumed from {config.resume} after epoch {state['epoch']}")
    logger = start_tracking(config, profile, resumed, pending_path)
    if resumed and state["completed"] and (state["epoch"] >= config.epochs
                                           or state["stale_epochs"] >= config.early_stop_patience):
        print("That run had already finished; nothing left to train.")
        if not logger.offline:
            log_model(logger, common.model_from_checkpoint(common.load_checkpoint(best_path)), config.image_size)
            logger.set_status("FINISHED")
        return common.read_json(checkpoint_dir / common.SUMMARY_NAME)
    if not resumed:
        logger.log_metrics({"trainable_parameters": common.count_trainable(model)})
        logger.log_artifact(manifest_path)

    def checkpoint(include_training_state: bool) -> dict:
        ckpt = common.checkpoint_dict(model, asdict(config), config.image_size, mlflow_run_id=logger.run_id,
                                      tracking_uri=logger.tracking_uri, **state)
        if include_training_state:
            ckpt |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict()}
        return ckpt

    state["completed"] = False
    resume_command = f"python resnet50_tb_full.py --resume {last_path}"
    try:
        if not resumed:  # so that an interrupt during the first epoch still leaves a resumable file
            common.save_checkpoint(checkpoint(True), last_path)
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            train_loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            train_results = train_one_epoch(model, train_loader, criterion, optimizer, scaler, device, amp_dtype, epoch)
            val_results = evaluate(model, val_loader, device, amp_dtype)
            lrs = common.group_lrs(optimizer)  # the rates this epoch trained with
            scheduler.step(val_results["loss"])
            state["train_seconds"] += time.perf_counter() - started
            state["epoch"] = epoch

            print(f"Epoch {epoch}: Loss={train_results['loss']:.4f}, Train Acc={train_results['accuracy']:.4f}, "
                  f"Backbone LR={lrs.get('backbone', 0.0):.2e}, Classifier LR={lrs['classifier']:.2e}")
            print(common.format_results("Val", val_results))
            metrics = {**scalar_metrics(train_results, "train"), **scalar_metrics(val_results, "val"),
                       **{f"lr_{name}": lr for name, lr in lrs.items()}}
            state["history"].append({"epoch": epoch, **metrics})

            score = [val_results["auc"] if np.isfinite(val_results["auc"]) else 0.0, -val_results["loss"]]
            if score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch, stale_epochs=0)
                common.save_checkpoint(checkpoint(include_training_state=False), best_path)
            else:
                state["stale_epochs"] += 1
            if epoch % config.save_every == 0:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                common.save_checkpoint(checkpoint(True), checkpoint_dir / f"{stamp}_epoch{epoch}_{profile.model_stem}.pth")
            # Checkpoint first, then log: a kill in between is repaired from the history on --resume.
            common.save_checkpoint(checkpoint(True), last_path)
            logger.log_metrics(metrics, step=epoch)
            if state["stale_epochs"] >= config.early_stop_patience:
                print(f"Early stopping: no better validation AUC for {config.early_stop_patience} epochs")
                break
    except KeyboardInterrupt:
        logger.set_status("KILLED")
        print(f"\nInterrupted. {last_path} holds epoch {state['epoch']}; resume with:\n  {resume_command}")
        raise SystemExit(130)
    except torch.OutOfMemoryError as exc:
        logger.set_status("FAILED")
        raise SystemExit(f"error: out of GPU memory at batch size {config.batch_size} ({str(exc).splitlines()[0]}).\n"
                         "Try --batch-size 8 and --amp (mixed precision), then resume with:\n  "
                         f"{resume_command} --batch-size 8 --amp") from exc
    except NonFiniteLossError:
        logger.set_status("FAILED")
        raise

    # The test set is scored once, on the best checkpoint.
    best = common.load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    test_results = evaluate(model, test_loader, device, amp_dtype)
    print(common.format_results("Test", test_results))
    test_metrics = scalar_metrics(test_results, "test")
    logger.log_metrics(test_metrics)
    for path in save_test_figures(test_results["labels"], test_results["probs"], checkpoint_dir):
        logger.log_artifact(path, artifact_path="test")
    summary = {
        "test_metrics": test_metrics, "best_epoch": best["best_epoch"], "epochs_trained": state["epoch"],
        "train_seconds": state["train_seconds"], "trainable_parameters": common.count_trainable(model),
        "best_checkpoint": str(best_path), "last_checkpoint": str(last_path),
        "split_manifest": str(manifest_path), "mlflow_run_id": logger.run_id, "tracking_uri": logger.tracking_uri,
        "experiment": config.experiment, "config": asdict(config),
    }
    common.write_json(summary, checkpoint_dir / common.SUMMARY_NAME)
    logger.log_artifact(checkpoint_dir / common.SUMMARY_NAME)
    state["completed"] = True
    common.save_checkpoint(checkpoint(True), last_path)
    log_model(logger, model, config.image_size)
    logger.set_status("FINISHED")
    print(f"Best checkpoint (epoch {best['best_epoch']}): {best_path}")
    print(f"Summary: {checkpoint_dir / common.SUMMARY_NAME}; MLflow run {logger.run_id}"
          + (f" (offline: queued records in {pending_path}; {resume_command} replays them)" if logger.offline else ""))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
