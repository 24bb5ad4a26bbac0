"""Train ALL layers of an ImageNet-initialised ResNet50 to tell Normal from Tuberculosis
chest X-rays, tracked in MLflow (port 5003), with checkpoints for resnet50_gradcam_tb_full.py.

    python resnet50_tb_full.py --data-dir DIR          # organized train/test or raw Kaggle layout
    python resnet50_tb_full.py --demo                  # synthetic data, CPU, about a minute
    python resnet50_tb_full.py --freeze-features ...   # the seed's transfer-learning baseline
    python resnet50_tb_full.py --resume checkpoints/resnet50_tb_full/last.pth
    python resnet50_tb_full.py --test-only --resume CKPT [--data-dir DIR]   # metrics with bootstrap CIs
    python resnet50_tb_full.py --compare CKPT_A CKPT_B                      # reports/comparison.md
    torchrun --standalone --nproc_per_node=N resnet50_tb_full.py ...        # data-parallel training

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
    temperature_scaling: bool = field(default=False, metadata={"help": "fit a softmax temperature on validation and store it in the checkpoint"})
    test_only: bool = field(default=False, metadata={"help": "only evaluate the --resume checkpoint on --data-dir (metrics with 95% bootstrap CIs)"})
    compare: list[str] = field(default_factory=list, metadata={"help": "evaluate two checkpoints on the same images and write reports/comparison.md", "nargs": 2, "metavar": "CKPT"})
    lr_scale: str = field(default="linear", metadata={"help": "under torchrun, multiply the learning rates by the number of processes (linear) or not", "choices": ["linear", "none"]})
    sync_bn: bool = field(default=False, metadata={"help": "under torchrun on CUDA, synchronise BatchNorm statistics across GPUs"})
    fast_data: bool = field(default=True, metadata={"help": "decode images once into a uint8 cache and augment batches on the device (--no-fast-data: per-image PIL transforms)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slow start, faster steps on GPUs)"})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "bootstrap resamples for confidence intervals", "type": common.positive_int})


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
    parser = get_args_parser()
    given = vars(parser.parse_args(argv))
    if given.get("test_only") and not given.get("resume"):
        parser.error("--test-only needs --resume CKPT, the checkpoint to evaluate")
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

    def __init__(self, labels: list[int], seed: int, oversample: bool,
                 ctx: common.DistributedContext = common.DistributedContext()):
        self.labels, self.seed, self.oversample, self.ctx = np.asarray(labels), seed, oversample, ctx
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
        return iter(common.shard(list(zip(indices.tolist(), seeds.tolist())), self.ctx))

    def __len__(self) -> int:
        total = int(np.bincount(self.labels).max()) * len(np.unique(self.labels)) if self.oversample else len(self.labels)
        return -(-total // self.ctx.world_size)


def make_loaders(manifest: dict, config: TrainConfig, device: torch.device,
                 ctx: common.DistributedContext = common.DistributedContext()):
    """Train, validation and test loaders (this rank's shards): the fast cached/device path,
    or per-image PIL transforms."""
    train = common.manifest_samples(manifest, "train")
    size = config.image_size
    sampler = EpochSampler([label for _, label in train], config.seed, config.balance == "oversample", ctx)
    drop_last = len(sampler) > config.batch_size
    sides = {side: common.manifest_samples(manifest, side) for side in ("val", "test")}
    eval_batch = max(config.batch_size * 4, 64)  # no gradients: larger batches are free
    if config.fast_data:
        cache_dir = Path(config.checkpoint_dir) / "cache"
        workers = max(2, config.num_workers)
        pin = device.type == "cuda"

        def cached(samples, cache_size, batch_size, sampler=None, drop=False):
            cache = common.decoded_cache([p for p, _ in samples], cache_size, cache_dir, workers)
            return common.CachedBatches(cache, [label for _, label in samples], batch_size, sampler, drop, pin)

        channels_last = device.type == "cuda"
        train_loader = common.DeviceBatches(
            cached(train, common.train_cache_size(size), config.batch_size, sampler, drop_last), device, size,
            augment=True, channels_last=channels_last)
        val_loader, test_loader = (
            common.DeviceBatches(cached(sides[side], size, eval_batch, common.ShardOrder(len(sides[side]), ctx)),
                                 device, size, augment=False, channels_last=channels_last)
            for side in ("val", "test"))
        return train_loader, val_loader, test_loader
    loader_args = dict(num_workers=config.num_workers, pin_memory=device.type == "cuda",
                       persistent_workers=config.num_workers > 0)
    train_loader = torch.utils.data.DataLoader(
        common.XrayDataset(train, common.train_transform(size)), batch_size=config.batch_size,
        sampler=sampler, drop_last=drop_last, **loader_args)
    val_loader, test_loader = (
        torch.utils.data.DataLoader(common.XrayDataset(sides[side], common.eval_transform(size)),
                                    batch_size=eval_batch, sampler=common.ShardOrder(len(sides[side]), ctx),
                                    **loader_args)
        for side in ("val", "test"))
    return train_loader, val_loader, test_loader


def loss_function(config: TrainConfig, train_labels: list[int], device: torch.device) -> nn.Module:
    if config.balance != "class-weight":
        return nn.CrossEntropyLoss()
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(len(common.CLASS_NAMES)), y=np.asarray(train_labels))
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


# --------------------------------------------------------------------------- train / evaluate
def train_one_epoch(model, loader, criterion, optimizer, scaler, device, amp_dtype=None, epoch: int = 0,
                    ctx: common.DistributedContext = common.DistributedContext()) -> dict:
    """One pass over the training loader: mean loss and accuracy, images/s and the share of
    time spent waiting for data. Nothing here waits for the device until the epoch ends."""
    model.train()
    loss_sum = torch.zeros((), device=device)  # running sums stay on the device: no per-step sync
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad_batch = torch.full((), -1, device=device, dtype=torch.long)
    bad_loss = torch.zeros((), device=device)
    seen = skipped_steps = 0
    data_wait = 0.0
    progress = tqdm(loader, desc=f"Epoch {epoch} train", unit="img", unit_scale=loader.batch_size, leave=False,
                    dynamic_ncols=True)
    started = fetch_started = time.perf_counter()
    for batch_index, (images, targets) in enumerate(progress, start=1):
        data_wait += time.perf_counter() - fetch_started
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        newly_bad = ~torch.isfinite(loss.detach()) & (first_bad_batch < 0)
        first_bad_batch = torch.where(newly_bad, batch_index, first_bad_batch)
        bad_loss = torch.where(newly_bad, loss.detach(), bad_loss)
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
        fetch_started = time.perf_counter()
    if int(first_bad_batch) >= 0:  # the one host read of the epoch
        raise NonFiniteLossError(epoch, int(first_bad_batch), float(bad_loss))
    elapsed = time.perf_counter() - started
    totals = common.all_reduce_sum(torch.stack([loss_sum, correct.to(loss_sum.dtype),
                                                torch.tensor(float(seen), device=device)]), ctx)
    return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2]),
            "skipped_steps": int(skipped_steps), "images_per_second": float(totals[2]) / elapsed,
            "data_wait_fraction": data_wait / elapsed}


class NonFiniteLossError(SystemExit):
    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(
            f"error: the training loss became {value} at epoch {epoch}, batch {batch}. The best checkpoint is "
            "untouched. Try a lower learning rate (--lr) or full precision (--no-amp).")


def evaluate(model, loader, device, amp_dtype=None, ctx: common.DistributedContext = common.DistributedContext(),
             total: int = 0) -> dict:
    """Loss and classification metrics at threshold 0.5, plus the raw labels, logits and probabilities.
    Under torchrun every rank scores its shard and the `total` predictions are gathered in order."""
    common.broadcast_buffers(model, ctx)
    labels, logits, loss = common.predict_logits(model, loader, device, amp_dtype)
    if ctx.active:
        gathered = common.gather_shards(torch.cat([logits, torch.as_tensor(labels).unsqueeze(1).float()], 1).to(device),
                                        ctx, total).cpu()
        logits, labels = gathered[:, :-1], gathered[:, -1].long().numpy()
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(labels)))
    probs = common.tb_probability(logits).numpy()
    return {"loss": loss, **common.classification_metrics(labels, probs), "labels": labels, "logits": logits,
            "probs": probs}


def operating_points(val_results: dict, temperature_scaling: bool) -> dict:
    """Temperature (optional) and thresholds chosen on the validation predictions."""
    labels, logits = val_results["labels"], val_results["logits"]
    temperature = common.fit_temperature(logits.numpy(), labels) if temperature_scaling else 1.0
    probs = common.tb_probability(logits, temperature).numpy()
    return {"temperature": temperature, "thresholds": common.select_thresholds(labels, probs)}


def scalar_metrics(results: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in results.items() if np.isscalar(v) and np.isfinite(v)}


# --------------------------------------------------------------------------- reports
def save_test_figures(labels, probs, out_dir: Path) -> list[Path]:
    """Confusion matrix and ROC curve PNGs plus the sklearn classification report."""
    plt = common.pyplot()
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


# --------------------------------------------------------------------------- evaluation and comparison
THRESHOLD_NAMES = {"default": "0.5", "youden": "Youden's J", "who_triage": "WHO triage"}
REPORT_METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision", "auc",
                  "average_precision")


def predict_checkpoint(checkpoint: dict, samples, device, batch_size: int, num_workers: int):
    """Labels and (temperature-scaled) TB probabilities of a checkpoint on labelled samples."""
    model = common.model_from_checkpoint(checkpoint).to(device)
    transform = common.eval_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    loader = torch.utils.data.DataLoader(common.XrayDataset(samples, transform), batch_size=batch_size,
                                         num_workers=num_workers)
    labels, logits, _ = common.predict_logits(model, loader, device)
    return labels, common.tb_probability(logits, checkpoint.get("temperature", 1.0)).numpy()


def evaluation_report(labels, probs, thresholds: dict[str, float], resamples: int, seed: int) -> dict:
    """Every metric with a 95% bootstrap CI at each stored threshold, plus calibration."""
    from sklearn.metrics import brier_score_loss, confusion_matrix

    report = {"n_images": int(len(labels)),
              "class_counts": {name: int((labels == i).sum()) for i, name in enumerate(common.CLASS_NAMES)},
              "bootstrap_resamples": resamples, "thresholds": {}}
    draws = common.bootstrap_metrics(labels, probs, thresholds, resamples, seed)
    for name, threshold in thresholds.items():
        point = common.classification_metrics(labels, probs, threshold)
        matrix = confusion_matrix(labels, (probs >= threshold).astype(int), labels=[0, 1])
        report["thresholds"][name] = {"threshold": threshold, "metrics": common.with_intervals(point, draws[name]),
                                      "confusion_matrix": matrix.tolist()}
    if "who_triage" in report["thresholds"]:
        metrics = report["thresholds"]["who_triage"]["metrics"]
        report["who_triage"] = {
            "sensitivity": metrics["sensitivity"]["value"], "specificity": metrics["specificity"]["value"],
            "meets_sensitivity_target": metrics["sensitivity"]["value"] >= common.WHO_TRIAGE_SENSITIVITY,
            "meets_minimum_specificity": metrics["specificity"]["value"] >= common.WHO_TRIAGE_MIN_SPECIFICITY}
    report["calibration"] = {"brier_score": float(brier_score_loss(labels, probs)),
                             "expected_calibration_error": common.expected_calibration_error(labels, probs)}
    return report


def format_interval(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def print_report(report: dict) -> None:
    names = list(report["thresholds"])
    print(f"{'metric (95% CI)':<20}" + "".join(
        f"{THRESHOLD_NAMES.get(n, n) + ' t=' + format(report['thresholds'][n]['threshold'], '.3f'):<28}" for n in names))
    for metric in REPORT_METRICS:
        print(f"{metric:<20}" + "".join(f"{format_interval(report['thresholds'][n]['metrics'][metric]):<28}" for n in names))
    if "who_triage" in report:
        who = report["who_triage"]
        print(f"WHO triage point: sensitivity {who['sensitivity']:.4f} (target 0.90 met: {who['meets_sensitivity_target']}), "
              f"specificity {who['specificity']:.4f} (WHO minimum 0.70 met: {who['meets_minimum_specificity']})")
    calibration = report["calibration"]
    print(f"Calibration: Brier {calibration['brier_score']:.4f}, ECE {calibration['expected_calibration_error']:.4f}")


def save_evaluation_figures(labels, probs, report: dict, prefix: Path, title: str) -> list[Path]:
    """ROC with the operating points, precision-recall, confusion matrices, reliability diagram."""
    plt = common.pyplot()
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    paths = [Path(f"{prefix}_{kind}.png") for kind in ("roc", "pr", "confusion", "reliability")]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    RocCurveDisplay.from_predictions(labels, probs, ax=ax, name="ResNet50")
    for name, entry in report["thresholds"].items():
        metrics = entry["metrics"]
        ax.scatter(1 - metrics["specificity"]["value"], metrics["sensitivity"]["value"], zorder=3,
                   label=f"{THRESHOLD_NAMES.get(name, name)} (t={entry['threshold']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"ROC: {title}")
    figures = [fig]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    PrecisionRecallDisplay.from_predictions(labels, probs, ax=ax, name="ResNet50")
    ax.set_title(f"Precision-recall: {title}")
    figures.append(fig)
    fig, axes = plt.subplots(1, len(report["thresholds"]), figsize=(4 * len(report["thresholds"]), 3.8), squeeze=False)
    for ax, (name, entry) in zip(axes[0], report["thresholds"].items()):
        ConfusionMatrixDisplay.from_predictions(labels, (probs >= entry["threshold"]).astype(int), labels=[0, 1],
                                                display_labels=common.CLASS_NAMES, ax=ax, colorbar=False)
        ax.set_title(f"{THRESHOLD_NAMES.get(name, name)} (t={entry['threshold']:.3f})", fontsize=9)
    fig.suptitle(f"Confusion matrices: {title}")
    figures.append(fig)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    CalibrationDisplay.from_predictions(labels, probs, n_bins=10, ax=ax, name="ResNet50")
    ax.set_title(f"Reliability: Brier {report['calibration']['brier_score']:.3f}, "
                 f"ECE {report['calibration']['expected_calibration_error']:.3f}")
    figures.append(fig)
    for fig, path in zip(figures, paths):
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths


def training_curves_figure(checkpoint: dict, path: Path) -> Path | None:
    """Loss and validation AUC per epoch, read back from the checkpoint's MLflow run."""
    uri, run_id = checkpoint.get("tracking_uri", ""), checkpoint.get("mlflow_run_id", "")
    if not run_id or not common.store_reachable(uri):
        print(f"Training curves: MLflow run {run_id or '?'} not reachable at {uri or '?'}; skipped")
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    plt = common.pyplot()
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    for key, ax in (("train_loss", loss_ax), ("val_loss", loss_ax), ("val_auc", auc_ax)):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=key)
    for ax, name in ((loss_ax, "loss"), (auc_ax, "validation ROC AUC")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_evaluation_run(tracking_uri: str, experiment: str, run_name: str, tags: dict, metrics: dict,
                       paths: list[Path]) -> str:
    """A new MLflow run holding an evaluation or comparison, tagged with the runs it is about."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if np.isfinite(v)],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in paths:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def report_metrics(report: dict) -> dict[str, float]:
    flat = {}
    for name, entry in report["thresholds"].items():
        for metric, value in entry["metrics"].items():
            flat |= {f"{name}_{metric}": value["value"], f"{name}_{metric}_ci_low": value["ci_low"],
                     f"{name}_{metric}_ci_high": value["ci_high"]}
    return flat | report["calibration"]


def score_checkpoint(checkpoint: dict, samples, config: TrainConfig, device: torch.device):
    """Labels, probabilities and the full evaluation report of one checkpoint on labelled samples."""
    labels, probs = predict_checkpoint(checkpoint, samples, device, config.batch_size * 2, config.num_workers)
    thresholds = {"default": 0.5, **checkpoint.get("thresholds", {})}
    return labels, probs, evaluation_report(labels, probs, thresholds, config.bootstrap_resamples, config.seed)


def test_only(config: TrainConfig) -> dict:
    """--test-only: evaluate one checkpoint on one labelled folder, with intervals and figures."""
    checkpoint_path = Path(config.resume)
    checkpoint = common.load_checkpoint(checkpoint_path)
    samples, source = common.test_samples(checkpoint_path, config.data_dir)
    device = common.resolve_device(config.device)
    name = Path(config.data_dir).resolve().name if config.data_dir else "test"
    print(f"Evaluating {checkpoint_path} on {len(samples)} images: {source}")
    labels, probs, report = score_checkpoint(checkpoint, samples, config, device)
    print(common.format_results("Test", common.classification_metrics(labels, probs)))
    report |= {"checkpoint": str(checkpoint_path), "data": source, "temperature": checkpoint.get("temperature", 1.0),
               "training_run_id": checkpoint.get("mlflow_run_id", "")}
    print_report(report)
    out = checkpoint_path.parent / f"eval_{name}"
    json_path = Path(f"{out}.json")
    common.write_json(report, json_path)
    paths = [json_path, *save_evaluation_figures(labels, probs, report, out, name)]
    curves = training_curves_figure(checkpoint, Path(f"{out}_training_curves.png"))
    paths += [curves] if curves else []
    profile = common.profile_for(checkpoint["config"].get("freeze_features", False))
    tracking_uri, _ = common.resolve_tracking_uri(config.tracking_uri, profile.port)
    run_id = log_evaluation_run(tracking_uri, checkpoint["config"].get("experiment", profile.experiment),
                                f"eval-{name}", {"training_run_id": report["training_run_id"],
                                                 "checkpoint": checkpoint_path, "data": source},
                                report_metrics(report), paths)
    print(f"Wrote {json_path} and {len(paths) - 1} figures; MLflow evaluation run {run_id} ({tracking_uri})")
    return report


def paired_auc_difference(labels, probs_a, probs_b, resamples: int, seed: int) -> dict[str, float]:
    """AUC(B) - AUC(A) on the same images, with a paired stratified bootstrap CI and two-sided p-value
    (DeLong's test is in no maintained Python library we depend on)."""
    from sklearn.metrics import roc_auc_score

    differences = np.asarray([roc_auc_score(labels[i], probs_b[i]) - roc_auc_score(labels[i], probs_a[i])
                              for i in common.bootstrap_indices(labels, resamples, seed)])
    low, high = np.percentile(differences, [2.5, 97.5])
    p_value = min(1.0, 2 * min((differences <= 0).mean(), (differences >= 0).mean()))
    return {"difference": float(roc_auc_score(labels, probs_b) - roc_auc_score(labels, probs_a)),
            "ci_low": float(low), "ci_high": float(high), "p_value": float(p_value)}


def training_facts(checkpoint_path: Path, checkpoint: dict) -> dict:
    """Time, epochs and memory of the whole training run (summary.json beside it, when present)."""
    summary_path = checkpoint_path.parent / common.SUMMARY_NAME
    summary = common.read_json(summary_path) if summary_path.is_file() else {}
    return {"trainable_parameters": checkpoint.get("trainable_parameters", 0),
            "train_seconds": summary.get("train_seconds", checkpoint.get("train_seconds", float("nan"))),
            "epochs_trained": summary.get("epochs_trained", checkpoint.get("epoch", 0)),
            "best_epoch": checkpoint.get("best_epoch", 0),
            "peak_memory_mb": summary.get("peak_memory_mb", checkpoint.get("peak_memory_mb", float("nan")))}


def gradcam_row(labels: list[str], out: Path) -> Path | None:
    """Both models' GradCAM summary grids side by side, when both exist."""
    grids = [Path(common.TRANSFER_LEARNING.gradcam_dir if label == common.TRANSFER_LEARNING.gradcam_label
                  else common.FULL_TRAINING.gradcam_dir) / f"gradcam_summary_{label}.png" for label in labels]
    if not all(grid.is_file() for grid in grids):
        return None
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(16, 5))
    for ax, grid, label in zip(axes, grids, labels):
        ax.imshow(plt.imread(grid))
        ax.set_title(label)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare_checkpoints(config: TrainConfig) -> dict:
    """--compare A B: both checkpoints on the same images; reports/comparison.md plus figures."""
    paths = [Path(p) for p in config.compare]
    checkpoints = [common.load_checkpoint(p) for p in paths]
    samples, source = common.test_samples(paths[0], config.data_dir)
    device = common.resolve_device(config.device)
    labels_of = [common.profile_for(c["config"].get("freeze_features", False)).gradcam_label for c in checkpoints]
    names = [f"{label} ({path.name})" for label, path in zip(labels_of, paths)]
    print(f"Comparing {names[0]} and {names[1]} on {len(samples)} images: {source}")
    results = []
    for checkpoint in checkpoints:
        labels, probs, report = score_checkpoint(checkpoint, samples, config, device)
        results.append({"probs": probs, "report": report})
    auc_test = paired_auc_difference(labels, results[0]["probs"], results[1]["probs"],
                                     config.bootstrap_resamples, config.seed)
    report_dir = Path("reports")
    report_dir.mkdir(exist_ok=True)
    figures = [report_dir / "comparison_roc.png"]
    plt = common.pyplot()
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, result in zip(names, results):
        RocCurveDisplay.from_predictions(labels, result["probs"], ax=ax, name=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(f"ROC on the same {len(labels)} images (p = {auc_test['p_value']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(figures[0], dpi=110)
    plt.close(fig)
    cams = gradcam_row(labels_of, report_dir / "comparison_gradcam.png")
    figures += [cams] if cams else []

    facts = [training_facts(p, c) for p, c in zip(paths, checkpoints)]
    rows = [("Trainable parameters", [f"{f['trainable_parameters']:,}" for f in facts]),
            ("Training time (wall clock)", [f"{f['train_seconds']:.1f} s" for f in facts]),
            ("Epochs to best (of trained)", [f"{f['best_epoch']} of {f['epochs_trained']}" for f in facts]),
            ("Peak memory (GPU allocated on CUDA, else process RSS)", [f"{f['peak_memory_mb']:.0f} MB" for f in facts])]
    for metric in REPORT_METRICS:
        where = "threshold-free" if metric in common.THRESHOLD_FREE_METRICS else "at 0.5"
        rows.append((f"{metric} {where} (95% CI)", [format_interval(r["report"]["thresholds"]["default"]["metrics"][metric])
                                                    for r in results]))
    for r_name, threshold in (("Youden's J", "youden"), ("WHO triage", "who_triage")):
        if all(threshold in r["report"]["thresholds"] for r in results):
            rows.append((f"sensitivity / specificity at {r_name} (validation-chosen t)", [
                f"{r['report']['thresholds'][threshold]['metrics']['sensitivity']['value']:.4f} / "
                f"{r['report']['thresholds'][threshold]['metrics']['specificity']['value']:.4f} "
                f"(t={r['report']['thresholds'][threshold]['threshold']:.3f})" for r in results]))
    rows.append(("Brier score / ECE", [f"{r['report']['calibration']['brier_score']:.4f} / "
                                       f"{r['report']['calibration']['expected_calibration_error']:.4f}" for r in results]))
    lines = [f"# Transfer learning vs full training: {names[0]} vs {names[1]}", "",
             f"Evaluated on the same {len(labels)} images ({source}); "
             f"{config.bootstrap_resamples} stratified bootstrap resamples, seed {config.seed}.", "",
             f"| Aspect | {names[0]} | {names[1]} |", "|---|---|---|"]
    lines += [f"| {aspect} | {a} | {b} |" for aspect, (a, b) in rows]
    lines += ["", f"ROC AUC difference (B - A): {auc_test['difference']:+.4f} "
                  f"[{auc_test['ci_low']:+.4f}, {auc_test['ci_high']:+.4f}], paired bootstrap p = {auc_test['p_value']:.3f}",
              "", "![ROC curves](comparison_roc.png)"]
    if cams:
        lines += ["", "![GradCAM summaries side by side](comparison_gradcam.png)"]
    report_path = report_dir / "comparison.md"
    report_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:-2]))
    comparison = {"checkpoints": [str(p) for p in paths], "data": source, "auc_difference": auc_test,
                  "reports": [r["report"] for r in results], "training": facts}
    common.write_json(comparison, report_dir / "comparison.json")
    tracking_uri, _ = common.resolve_tracking_uri(config.tracking_uri, common.FULL_TRAINING.port)
    run_id = log_evaluation_run(
        tracking_uri, "ResNet50_TB_Comparison", "comparison",
        {"run_a": checkpoints[0].get("mlflow_run_id", ""), "run_b": checkpoints[1].get("mlflow_run_id", "")},
        {"auc_difference": auc_test["difference"], "auc_difference_p_value": auc_test["p_value"]},
        [report_path, report_dir / "comparison.json", *figures])
    print(f"Wrote {report_path}; MLflow run {run_id} ({tracking_uri})")
    return comparison


class SilentLogger:
    """The MLflow logger of ranks other than 0: rank 0 logs for the whole torchrun job."""

    run_id = tracking_uri = ""
    offline = True

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def set_status(self, status: str) -> None:
        pass


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    if config.compare:
        return compare_checkpoints(config)
    if config.test_only:
        return test_only(config)
    common.refuse_inside(config.checkpoint_dir, config.data_dir, "--checkpoint-dir")
    ctx, device = common.init_distributed(config.device)
    if not ctx.is_main:  # rank 0 speaks for the job: console, progress bars, files, MLflow
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"
    if config.demo and config.data_dir == common.DEMO_DATA_DIR:
        with common.main_process_first(ctx):
            common.make_demo_dataset(config.data_dir)
        print(f"Demo: SYNTHETIC chest X-rays in {config.data_dir}/ (not real data)")
    amp_dtype = common.autocast_dtype(device, config.amp)
    common.seed_everything(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    profile = common.profile_for(config.freeze_features)
    checkpoint_dir = Path(config.checkpoint_dir)
    if ctx.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = checkpoint_dir / common.MANIFEST_NAME
    last_path = checkpoint_dir / common.LAST_CHECKPOINT_NAME
    best_path = common.best_checkpoint_path(checkpoint_dir, config.freeze_features)
    pending_path = checkpoint_dir / common.PENDING_RECORDS_NAME

    # Data: reuse the saved split when resuming, so the test images never change.
    resumed = common.load_checkpoint(config.resume) if config.resume else None
    with common.main_process_first(ctx):
        fresh = not resumed and ctx.is_main
        manifest = prepare_manifest(config, manifest_path) if fresh else common.read_json(manifest_path)
        train_loader, val_loader, test_loader = make_loaders(manifest, config, device, ctx)
    train_labels = [label for _, label in manifest["train"]]

    model = common.build_model(config.weights if not resumed else "none", config.freeze_features).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = not config.deterministic
    if config.sync_bn and ctx.active:
        if device.type != "cuda":
            raise SystemExit("error: --sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr_mult = ctx.world_size if config.lr_scale == "linear" else 1
    optimizer = common.build_optimizer(model, config.lr * lr_mult, config.backbone_lr_mult)
    step_model = model  # checkpoints keep the plain model's keys; these wrappers only run the steps
    if ctx.active:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=config.scheduler_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = loss_function(config, train_labels, device)
    print_header(config, device, model, optimizer)
    print(f"Data: {manifest['layout']} layout in {manifest['data_dir']}; "
          + ", ".join(f"{side} {len(manifest[side])}" for side in ("train", "val", "test")) + " images; "
          + ("decoded once into a cache, augmented in batches on the device" if config.fast_data
             else "per-image PIL transforms"))
    if ctx.active:
        print(f"Distributed: {ctx.world_size} processes ({torch.distributed.get_backend()}); global batch "
              f"{config.batch_size} x {ctx.world_size} = {config.batch_size * ctx.world_size}; learning rates "
              + (f"x {ctx.world_size} (--lr-scale linear)" if lr_mult > 1 else "unscaled (--lr-scale none)"))

    state = {"epoch": 0, "best_score": [-1.0, -float("inf")], "best_epoch": 0, "stale_epochs": 0,
             "history": [], "train_seconds": 0.0, "completed": False, "thresholds": {"default": 0.5},
             "temperature": 1.0, "peak_memory_mb": 0.0}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        state = {key: resumed[key] for key in state}
        print(f"Resumed from {config.resume} after epoch {state['epoch']}")
    logger = start_tracking(config, profile, resumed, pending_path) if ctx.is_main else SilentLogger()
    save = common.save_checkpoint if ctx.is_main else (lambda checkpoint, path: None)
    if resumed and state["completed"] and (state["epoch"] >= config.epochs
                                           or state["stale_epochs"] >= config.early_stop_patience):
        print("That run had already finished; nothing left to train.")
        if not logger.offline:
            log_model(logger, common.model_from_checkpoint(common.load_checkpoint(best_path)), config.image_size)
            logger.set_status("FINISHED")
        return common.read_json(checkpoint_dir / common.SUMMARY_NAME)
    if not resumed:
        logger.log_metrics({"trainable_parameters": common.count_trainable(model), "world_size": ctx.world_size,
                            "global_batch_size": config.batch_size * ctx.world_size})
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
            save(checkpoint(True), last_path)
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            train_loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            train_results = train_one_epoch(step_model, train_loader, criterion, optimizer, scaler, device,
                                            amp_dtype, epoch, ctx)
            val_results = evaluate(model, val_loader, device, amp_dtype, ctx, len(manifest["val"]))
            lrs = common.group_lrs(optimizer)  # the rates this epoch trained with
            scheduler.step(val_results["loss"])
            state["train_seconds"] += time.perf_counter() - started
            state["epoch"] = epoch
            state["peak_memory_mb"] = max(state["peak_memory_mb"], common.peak_memory_mb(device))

            print(f"Epoch {epoch}: Loss={train_results['loss']:.4f}, Train Acc={train_results['accuracy']:.4f}, "
                  f"Backbone LR={lrs.get('backbone', 0.0):.2e}, Classifier LR={lrs['classifier']:.2e}")
            print(common.format_results("Val", val_results))
            metrics = {**scalar_metrics(train_results, "train"), **scalar_metrics(val_results, "val"),
                       **{f"lr_{name}": lr for name, lr in lrs.items()}}
            state["history"].append({"epoch": epoch, **metrics})

            score = [val_results["auc"] if np.isfinite(val_results["auc"]) else 0.0, -val_results["loss"]]
            if score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch, stale_epochs=0,
                             **operating_points(val_results, config.temperature_scaling))
                save(checkpoint(include_training_state=False), best_path)
            else:
                state["stale_epochs"] += 1
            if epoch % config.save_every == 0:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                save(checkpoint(True), checkpoint_dir / f"{stamp}_epoch{epoch}_{profile.model_stem}.pth")
            # Checkpoint first, then log: a kill in between is repaired from the history on --resume.
            save(checkpoint(True), last_path)
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
    common.barrier(ctx)  # rank 0 has finished writing it
    best = common.load_checkpoint(best_path)
    best_model = common.model_from_checkpoint(best).to(device)  # `model` keeps the last epoch's weights for last.pth
    if device.type == "cuda":
        best_model = best_model.to(memory_format=torch.channels_last)
    test_results = evaluate(best_model, test_loader, device, amp_dtype, ctx, len(manifest["test"]))
    if ctx.active:
        torch.distributed.destroy_process_group()
    if not ctx.is_main:
        return {}
    print(common.format_results("Test", test_results))
    test_metrics = scalar_metrics(test_results, "test")
    logger.log_metrics(test_metrics)
    for path in save_test_figures(test_results["labels"], test_results["probs"], checkpoint_dir):
        logger.log_artifact(path, artifact_path="test")
    summary = {
        "test_metrics": test_metrics, "best_epoch": best["best_epoch"], "epochs_trained": state["epoch"],
        "train_seconds": state["train_seconds"], "peak_memory_mb": state["peak_memory_mb"],
        "trainable_parameters": common.count_trainable(model),
        "best_checkpoint": str(best_path), "last_checkpoint": str(last_path),
        "split_manifest": str(manifest_path), "mlflow_run_id": logger.run_id, "tracking_uri": logger.tracking_uri,
        "experiment": config.experiment, "config": asdict(config),
    }
    common.write_json(summary, checkpoint_dir / common.SUMMARY_NAME)
    logger.log_artifact(checkpoint_dir / common.SUMMARY_NAME)
    state["completed"] = True
    save(checkpoint(True), last_path)
    log_model(logger, best_model, config.image_size)
    logger.set_status("FINISHED")
    print(f"Best checkpoint (epoch {best['best_epoch']}): {best_path}")
    print(f"Summary: {checkpoint_dir / common.SUMMARY_NAME}; MLflow run {logger.run_id}"
          + (f" (offline: queued records in {pending_path}; {resume_command} replays them)" if logger.offline else ""))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
