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
class EpochSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch shuffle, optionally over a RandomOverSampler-balanced index set.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
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
        return iter(self.epoch_indices().tolist())

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
    seen = 0
    progress = tqdm(loader, desc=f"Epoch {epoch} train", unit="batch", leave=False, dynamic_ncols=True)
    for images, targets in progress:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(targets)
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += len(targets)
    return {"loss": float(loss_sum) / seen, "accuracy": float(correct) / seen}


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


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    if config.demo and config.data_dir == common.DEMO_DATA_DIR:
        common.make_demo_dataset(config.data_dir)
        print(f"Demo: SYNTHETIC chest X-rays in {config.data_dir}/ (not real data)")
    device = common.resolve_device(config.device)
    amp_dtype = common.autocast_dtype(device, config.amp)
    common.seed_everything(config.seed)
    profile = common.profile_for(config.freeze_features)
    checkpoint_dir = Path(config.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = checkpoint_dir / common.MANIFEST_NAME

    # Data: reuse the saved split when resuming, so the test images never change.
    resumed = common.load_checkpoint(config.resume) if config.resume else None
    if resumed:
        manifest = common.read_json(manifest_path)
    else:
        data = common.discover_dataset(config.data_dir)
        manifest = common.make_split_manifest(data, config.val_fraction, config.test_fraction, config.seed)
        common.write_json(manifest, manifest_path)
    train_loader, val_loader, test_loader = make_loaders(manifest, config, device)
    train_labels = [label for _, label in manifest["train"]]

    model = common.build_model(config.weights if not resumed else "none", config.freeze_features).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = common.build_optimizer(model, config.lr, config.backbone_lr_mult)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=config.scheduler_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = loss_function(config, train_labels, device)
    print_header(config, device, model, optimizer)
    print(f"Data: {manifest['layout']} layout in {manifest['data_dir']}; "
          + ", ".join(f"{side} {len(manifest[side])}" for side in ("train", "val", "test")) + " images")

    state = {"epoch": 0, "best_score": [-1.0, -float("inf")], "best_epoch": 0, "stale_epochs": 0,
             "history": [], "train_seconds": 0.0}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        state = {key: resumed[key] for key in state}
        print(f"Resumed from {config.resume} after epoch {state['epoch']}")

    import mlflow

    tracking_uri, source = common.resolve_tracking_uri(config.tracking_uri, profile.port)
    print(f"MLflow: {tracking_uri} ({source}), experiment {config.experiment}")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(config.experiment)
    run = mlflow.start_run(run_id=resumed["mlflow_run_id"] if resumed else None)
    if not resumed:
        mlflow.log_params(asdict(config))
        mlflow.log_param("trainable_parameters", common.count_trainable(model))
        mlflow.log_artifact(str(manifest_path))

    def checkpoint(include_training_state: bool) -> dict:
        ckpt = common.checkpoint_dict(model, asdict(config), config.image_size, mlflow_run_id=run.info.run_id,
                                      tracking_uri=tracking_uri, **state)
        if include_training_state:
            ckpt |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict()}
        return ckpt

    best_path = common.best_checkpoint_path(checkpoint_dir, config.freeze_features)
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
        mlflow.log_metrics(metrics, step=epoch)

        score = [val_results["auc"] if np.isfinite(val_results["auc"]) else 0.0, -val_results["loss"]]
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch, stale_epochs=0)
            common.save_checkpoint(checkpoint(include_training_state=False), best_path)
        else:
            state["stale_epochs"] += 1
        if epoch % config.save_every == 0:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            common.save_checkpoint(checkpoint(True), checkpoint_dir / f"{stamp}_epoch{epoch}_{profile.model_stem}.pth")
        common.save_checkpoint(checkpoint(True), checkpoint_dir / common.LAST_CHECKPOINT_NAME)
        if state["stale_epochs"] >= config.early_stop_patience:
            print(f"Early stopping: no better validation AUC for {config.early_stop_patience} epochs")
            break

    # The test set is scored once, on the best checkpoint.
    best = common.load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    test_results = evaluate(model, test_loader, device, amp_dtype)
    print(common.format_results("Test", test_results))
    test_metrics = scalar_metrics(test_results, "test")
    mlflow.log_metrics(test_metrics)
    for path in save_test_figures(test_results["labels"], test_results["probs"], checkpoint_dir):
        mlflow.log_artifact(str(path), artifact_path="test")
    summary = {
        "test_metrics": test_metrics, "best_epoch": best["best_epoch"], "epochs_trained": state["epoch"],
        "train_seconds": state["train_seconds"], "trainable_parameters": common.count_trainable(model),
        "best_checkpoint": str(best_path), "last_checkpoint": str(checkpoint_dir / common.LAST_CHECKPOINT_NAME),
        "split_manifest": str(manifest_path), "mlflow_run_id": run.info.run_id, "tracking_uri": tracking_uri,
        "experiment": config.experiment, "config": asdict(config),
    }
    common.write_json(summary, checkpoint_dir / common.SUMMARY_NAME)
    mlflow.log_artifact(str(checkpoint_dir / common.SUMMARY_NAME))
    # pt2 (torch.export) rather than pickle: loading the logged model runs no pickled code.
    example = np.zeros((2, 3, config.image_size, config.image_size), dtype=np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]  # given, so MLflow skips slow inference
    mlflow.pytorch.log_model(model.cpu().eval(), name="model", input_example=example, pip_requirements=requirements)
    mlflow.end_run()
    print(f"Best checkpoint (epoch {best['best_epoch']}): {best_path}")
    print(f"Summary: {checkpoint_dir / common.SUMMARY_NAME}; MLflow run {run.info.run_id}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
