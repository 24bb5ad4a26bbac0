"""Train ALL layers of an ImageNet-initialised ResNet50 to tell Normal from Tuberculosis
chest X-rays, tracked in MLflow (port 5003), with checkpoints for resnet50_gradcam_tb_full.py.

    python resnet50_tb_full.py --data-dir DIR          # organized train/test or raw Kaggle layout
    python resnet50_tb_full.py --demo                  # synthetic data, CPU, about a minute
    python resnet50_tb_full.py --freeze-features ...   # the original design's transfer-learning baseline
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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from tbcxr import evaluation, runtime
from tbcxr.checkpoint import load_checkpoint, model_from_checkpoint, read_json, write_json
from tbcxr.config import (
    FULL_TRAINING,
    SUMMARY_NAME,
    TRANSFER_LEARNING,
    add_dataclass_arguments,
    flag,
    image_size,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    profile_for,
    refuse_inside,
)
from tbcxr.data import make_loaders, prepare_manifest
from tbcxr.demo import DEMO_DATA_DIR, make_demo_dataset
from tbcxr.figures import save_test_figures
from tbcxr.metrics import (
    SELECTION_WINDOWS,
    classification_metrics,
    format_results,
    operating_points,
    scalar_metrics,
    selection_score,
    tb_probability,
)
from tbcxr.model import (
    build_model,
    build_optimizer,
    build_scheduler,
    group_lrs,
    optimizer_steps,
    predict_logits,
    step_scheduler,
    train_mode,
)
from tbcxr.progress import track
from tbcxr.tracking import log_model
from tbcxr.training import NonFiniteLossError, Run, fixed_on_resume, load_resumable, loss_function


@dataclass
class TrainConfig:
    """Every setting of a training run; each field is a command-line flag."""

    data_dir: str = flag("", "data folder, organized train/test or raw Kaggle layout; also read from TB_DATA_DIR, "
                         "except by --test-only/--compare (a folder to score, else the split's test side)")  # fmt: skip
    epochs: int = flag(30, "maximum number of epochs", type=positive_int)
    batch_size: int = flag(16, "batch size (32 with --freeze-features)", type=positive_int)
    lr: float = flag(1e-4, "classifier learning rate (1e-3 with --freeze-features)", type=positive_float)
    backbone_lr_mult: float = flag(0.1, "backbone LR = lr x this", type=positive_float)
    image_size: int = flag(224, "square input size in pixels", type=image_size)
    weights: str = flag("imagenet", "initial weights: imagenet, none (random), or PATH to a state dict (--demo: none)")
    freeze_features: bool = flag(False, "train only the final layer: the original design's transfer-learning baseline")
    amp: bool | None = flag(None, "mixed precision (bf16, or fp16 with a GradScaler); default on for CUDA only")
    device: str = flag("auto", "compute device", choices=["auto", "cuda", "cpu", "mps"])
    num_workers: int = flag(min(4, os.cpu_count() or 1), "processes preparing and loading data", type=non_negative_int)
    val_fraction: float = flag(0.15, "share of train held out for validation (stratified)", type=open_fraction)
    test_fraction: float = flag(0.2, "share held out for test when the data has no test/ side", type=open_fraction)
    scheduler_patience: int = flag(3, "ReduceLROnPlateau patience in epochs, on validation loss", type=non_negative_int)
    recipe: str = flag("original", "original: the original design's settings, made for ImageNet weights; from-scratch: "
                       "the settings measured best from random weights (default with --weights none and no --lr)",
                       choices=["original", "from-scratch"])  # fmt: skip
    schedule: str = flag("plateau", "plateau: ReduceLROnPlateau on validation loss, with early stopping; cosine: "
                         "--warmup-epochs of linear warm-up, then cosine decay over --epochs",
                         choices=["plateau", "cosine"])  # fmt: skip
    selection: str = flag("auc", "which epoch becomes the best checkpoint: auc (best validation AUC), auc3 (its mean "
                          "over 3 epochs) or last (the schedule's end)", choices=list(SELECTION_WINDOWS))  # fmt: skip
    warmup_epochs: int = flag(0, "warm-up epochs: from a tenth of the rate, one step an epoch", type=non_negative_int)
    clahe: bool = flag(False, "contrast-limited adaptive histogram equalisation of every image, train and test alike")
    intensity_augment: bool = flag(False, "also augment intensity (gamma, blur, noise): X-rays of other hospitals")
    early_stop_patience: int = flag(7, "stop after this many epochs without a better validation AUC", type=positive_int)
    balance: str = flag("oversample", "class imbalance handling", choices=["oversample", "class-weight", "none"])
    seed: int = flag(42, "random seed for splits, sampling and initialisation")
    save_every: int = flag(5, "also keep a timestamped checkpoint every N epochs", type=positive_int)
    checkpoint_dir: str = flag(FULL_TRAINING.checkpoint_dir, "checkpoint folder (checkpoints/resnet50_tb if frozen)")
    tracking_uri: str = flag("", "MLflow tracking URI; default MLFLOW_TRACKING_URI, else (--test-only) the "
                             "training run's store, else http://127.0.0.1:5003 if it answers, else "
                             "sqlite:///mlflow.db")  # fmt: skip
    experiment: str = flag(FULL_TRAINING.experiment, "MLflow experiment (ResNet50_TB_FineTuning if frozen)")
    resume: str = flag("", "continue from this checkpoint (e.g. checkpoints/resnet50_tb_full/last.pth)")
    demo: bool = flag(False, "generate a small synthetic data set and run the whole pipeline on it")
    prepare_only: bool = flag(False, "check, split and cache the data, print a data report, and exit (no model)")
    deterministic: bool = flag(False, "deterministic kernels, so a resumed run repeats an uninterrupted one exactly")
    strict: bool = flag(False, "stop on unreadable image files instead of skipping them")
    dedup: bool = flag(False, "drop exact and near duplicates of training images from validation and test")
    temperature_scaling: bool = flag(False, "fit a softmax temperature on validation and store it in the checkpoint")
    test_only: bool = flag(False, "only evaluate the --resume checkpoint (95% bootstrap CIs) on --data-dir, else "
                           "on its split manifest's test side")  # fmt: skip
    compare: list[str] = flag(
        [], "evaluate two checkpoints on the same images and write reports/comparison.md", nargs=2, metavar="CKPT"
    )
    lr_scale: str = flag(
        "none",
        "under torchrun, keep the learning rates (none: Adam), or scale them by the number of processes "
        "(linear: the SGD rule, for large global batches) or its square root (sqrt)",
        choices=["none", "linear", "sqrt"],
    )
    sync_bn: bool = flag(False, "under torchrun on CUDA, synchronise BatchNorm statistics across GPUs")
    fast_data: bool = flag(
        True,
        "decode images once into a uint8 cache and augment batches on the device "
        "(--no-fast-data: per-image PIL transforms)",
    )
    compile: bool = flag(False, "torch.compile the model (slow start, faster steps on GPUs)")
    bootstrap_resamples: int = flag(1000, "bootstrap resamples for confidence intervals", type=positive_int)


# Defaults that change with the mode; explicit flags still win over them.
TRANSFER_DEFAULTS = dict(
    lr=1e-3, batch_size=32, checkpoint_dir=TRANSFER_LEARNING.checkpoint_dir, experiment=TRANSFER_LEARNING.experiment
)
# From random weights the original design's rates barely move the backbone; this recipe was chosen by
# measurement on a second collection (README: "Training from random weights", 5 seeds).
FROM_SCRATCH_DEFAULTS = dict(
    recipe="from-scratch",
    lr=1e-3,
    backbone_lr_mult=1.0,
    schedule="cosine",
    warmup_epochs=1,
    clahe=True,
    intensity_augment=True,
    selection="last",
)
DEMO_DEFAULTS = dict(
    data_dir=DEMO_DATA_DIR, epochs=6, image_size=64, weights="none", lr=1e-3, backbone_lr_mult=1.0, num_workers=0
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Layer the config: dataclass defaults < mode defaults < resumed config < typed flags."""
    parser = get_args_parser()
    given = vars(parser.parse_args(argv))
    if given.get("test_only") and not given.get("resume"):
        parser.error("--test-only needs --resume CKPT, the checkpoint to evaluate")
    # Evaluation scores the split manifest's test side unless --data-dir is typed: no saved or environment folder.
    evaluating = bool(given.get("test_only") or given.get("compare"))
    layered, defaults = {}, asdict(TrainConfig())
    if os.environ.get("TB_DATA_DIR") and not evaluating:
        layered["data_dir"] = os.environ["TB_DATA_DIR"]
    if given.get("resume") and not evaluating:  # settings of earlier versions that no longer exist are dropped
        saved = {k: v for k, v in load_checkpoint(given["resume"])["config"].items() if k in defaults and k != "resume"}
        layered |= saved
        before = defaults | saved  # what the resumed run was trained with
        for key, reason in fixed_on_resume(before).items():
            if key in given and given[key] != before[key]:
                parser.error(f"--{key.replace('_', '-')} cannot change on resume: {reason}")
    else:
        if given.get("freeze_features"):
            layered |= TRANSFER_DEFAULTS
        if given.get("demo"):
            layered |= DEMO_DEFAULTS
        # Random weights and no rates of the user's own: the from-scratch recipe, unless --recipe says otherwise.
        automatic = (layered | given).get("weights") == "none" and not {"lr", "backbone_lr_mult"} & given.keys()
        automatic &= not (given.get("freeze_features") or given.get("demo"))
        if given.get("recipe", "from-scratch" if automatic else "original") == "from-scratch":
            layered |= FROM_SCRATCH_DEFAULTS
    if "warmup_epochs" in given and (layered | given).get("schedule", "plateau") == "plateau":
        parser.error("--warmup-epochs needs --schedule cosine")
    return TrainConfig(**(layered | given))


# --------------------------------------------------------------------------- one epoch
def train_one_epoch(
    model, loader, criterion, optimizer, scaler, device, amp_dtype=None, epoch: int = 0, dist=runtime.SINGLE_PROCESS
) -> dict:
    """One pass over the training loader: mean loss and accuracy, images/s and the share of
    time spent waiting for data. Nothing here waits for the device until the epoch ends."""
    train_mode(model)
    steps_before = optimizer_steps(optimizer)
    loss_sum = torch.zeros((), device=device)  # running sums stay on the device: no per-step sync
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad_batch = torch.full((), -1, device=device, dtype=torch.long)
    bad_loss = torch.zeros((), device=device)
    seen = batches = 0
    data_wait = 0.0
    progress = track(
        loader, f"Epoch {epoch} train", total=len(loader) * loader.batch_size, size=lambda b: len(b[1]), summary=False
    )
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
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        batches += 1
        loss_sum += loss.detach() * len(targets)
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += len(targets)
        fetch_started = time.perf_counter()
    if int(first_bad_batch) >= 0:  # the one host read of the epoch
        raise NonFiniteLossError(epoch, int(first_bad_batch), float(bad_loss))
    elapsed = time.perf_counter() - started
    # fp16: the scaler skips steps whose gradients overflowed (normal); Adam counts the steps it applied.
    skipped_steps = batches - (optimizer_steps(optimizer) - steps_before)
    totals = runtime.all_reduce_sum(
        torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=device)]), dist
    )
    return {
        "loss": float(totals[0] / totals[2]),
        "accuracy": float(totals[1] / totals[2]),
        "skipped_steps": int(skipped_steps),
        "images_per_second": float(totals[2]) / elapsed,
        "data_wait_fraction": data_wait / elapsed,
    }


def evaluate(model, loader, device, dist=runtime.SINGLE_PROCESS, total: int = 0) -> dict:
    """Loss and classification metrics at threshold 0.5, plus the raw labels, logits and probabilities.
    Under torchrun every rank scores its shard and the `total` predictions are gathered in order."""
    runtime.broadcast_buffers(model, dist)
    labels, logits, loss = predict_logits(model, loader, device)
    if dist.active:
        stacked = torch.cat([logits, torch.as_tensor(labels).unsqueeze(1).float()], 1).to(device)
        gathered = runtime.gather_shards(stacked, dist, total).cpu()
        logits, labels = gathered[:, :-1], gathered[:, -1].long().numpy()
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(labels)))
    probs = tb_probability(logits).numpy()
    return {"loss": loss, **classification_metrics(labels, probs), "labels": labels, "logits": logits, "probs": probs}


# --------------------------------------------------------------------------- the run's stages
def set_up(config: TrainConfig) -> Run:
    """Join torchrun if launched by it, make the demo data, seed, and pick the device and precision."""
    refuse_inside(config.checkpoint_dir, config.data_dir, "--checkpoint-dir")
    dist, device = runtime.init_distributed(config.device)
    if not dist.is_main:  # rank 0 speaks for the job: console, progress bars, files, MLflow
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"
    if config.demo and config.data_dir == DEMO_DATA_DIR:
        with runtime.main_process_first(dist):
            make_demo_dataset(config.data_dir)
        print(f"Demo: SYNTHETIC chest X-rays in {config.data_dir}/ (not real data)")
    runtime.seed_everything(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    run = Run(
        config,
        dist,
        device,
        runtime.autocast_dtype(device, config.amp),
        profile_for(config.freeze_features),
        Path(config.checkpoint_dir),
    )
    if dist.is_main:
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    return run


def prepare_data(run: Run, resumed: dict | None) -> None:
    """Split, check and cache the data once; reuse the saved split when resuming, so test images never change."""
    config = run.config
    if config.prepare_only and run.last_path.is_file():
        raise SystemExit(
            f"error: {run.checkpoint_dir} holds a training run's checkpoints, whose split manifest --prepare-only "
            "would replace: use another --checkpoint-dir"
        )
    with runtime.main_process_first(run.dist):
        if resumed is not None:
            run.manifest = evaluation.manifest_beside(run.last_path, resumed, required=True)
        elif not run.dist.is_main:
            run.manifest = read_json(run.manifest_path)
        else:
            run.manifest = prepare_manifest(
                config.data_dir, run.manifest_path, val_fraction=config.val_fraction,
                test_fraction=config.test_fraction, seed=config.seed, strict=config.strict, dedup=config.dedup,
                workers=config.num_workers, image_size=config.image_size if config.fast_data else 0,
                cache_dir=run.checkpoint_dir / "cache",  # the scan is kept there on either data path
            )  # fmt: skip
        if config.prepare_only:
            return
        run.loaders = make_loaders(
            run.manifest, run.device, image_size=config.image_size, batch_size=config.batch_size, seed=config.seed,
            oversample=config.balance == "oversample", fast_data=config.fast_data, num_workers=config.num_workers,
            cache_dir=run.checkpoint_dir / "cache", dist=run.dist, clahe=config.clahe,
            intensity=config.intensity_augment,
        )  # fmt: skip


def build_training(run: Run, resumed: dict | None) -> None:
    """Model, its DDP/compile wrappers, Adam with differential learning rates, ReduceLROnPlateau, AMP scaler."""
    config, device, dist = run.config, run.device, run.dist
    model = build_model(config.weights if not resumed else "none", config.freeze_features).to(device)
    if runtime.use_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic
    if config.sync_bn and dist.active:
        if device.type != "cuda":
            raise SystemExit("error: --sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr_mult = {"none": 1.0, "linear": dist.world_size, "sqrt": dist.world_size**0.5}[config.lr_scale]
    run.model, run.step_model = model, model  # checkpoints keep the plain model's keys
    if dist.active:
        run.step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        run.step_model = torch.compile(run.step_model)
    run.optimizer = build_optimizer(model, config.lr * lr_mult, config.backbone_lr_mult)
    run.scheduler = build_scheduler(
        run.optimizer, config.schedule, config.epochs, config.warmup_epochs, config.scheduler_patience
    )
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)
    run.criterion = loss_function(config.balance, [label for _, label in run.manifest["train"]], device)
    run.print_header(lr_mult)


def restore_or_start(run: Run, resumed: dict | None) -> bool:
    """Load a resumed checkpoint's weights and state, or open a new MLflow run; False if nothing is left to train."""
    if resumed:
        run.restore(resumed)
        print(f"Resumed from {run.config.resume} after epoch {run.state.epoch}")
    state = run.state  # every process decides alike: under torchrun they must all stop or all train
    finished = bool(resumed) and state.completed and (state.epoch >= run.config.epochs or run.stopped_early)
    if run.dist.is_main:
        run.open_tracking(resumed)
        if finished:
            print("That run had already finished; nothing left to train.")
            if not run.logger.offline:
                log_model(run.logger, model_from_checkpoint(load_checkpoint(run.best_path)), run.config.image_size)
                run.logger.set_status("FINISHED")
    return not finished


def train_and_validate(run: Run, epoch: int) -> None:
    """One epoch: train, validate, step the scheduler, keep the best and the periodic checkpoints, log."""
    config, state = run.config, run.state
    train_loader, val_loader, _ = run.loaders
    train_loader.sampler.set_epoch(epoch)
    started = time.perf_counter()
    train_results = train_one_epoch(run.step_model, train_loader, run.criterion, run.optimizer, run.scaler,
                                    run.device, run.amp_dtype, epoch, run.dist)  # fmt: skip
    val_results = evaluate(run.model, val_loader, run.device, run.dist, len(run.manifest["val"]))
    lrs = group_lrs(run.optimizer)  # the rates this epoch trained with
    step_scheduler(run.scheduler, val_results["loss"])
    state.train_seconds += time.perf_counter() - started
    state.epoch = epoch
    state.peak_memory_mb = max(state.peak_memory_mb, runtime.peak_memory_mb(run.device))

    print(
        f"Epoch {epoch}: Loss={train_results['loss']:.4f}, Train Acc={train_results['accuracy']:.4f}, "
        f"Backbone LR={lrs.get('backbone', 0.0):.2e}, Classifier LR={lrs['classifier']:.2e}"
    )
    print(format_results("Val", val_results))
    metrics = scalar_metrics(train_results, "train") | scalar_metrics(val_results, "val")
    metrics |= {f"lr_{name}": lr for name, lr in lrs.items()}
    state.history.append({"epoch": epoch, **metrics})

    # Every checkpoint carries the operating points of its own weights, fitted on this epoch's validation.
    points = operating_points(val_results, config.temperature_scaling)
    state.thresholds, state.temperature = points["thresholds"], points["temperature"]
    state.operating_points_epoch = epoch
    score = selection_score(state.history, min(SELECTION_WINDOWS[config.selection], config.epochs))
    if score > state.best_score:
        state.best_score, state.best_epoch, state.stale_epochs = score, epoch, 0
        run.save(run.best_path, include_training_state=False)
    else:
        state.stale_epochs += 1
    if epoch % config.save_every == 0:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run.save(run.checkpoint_dir / f"{stamp}_epoch{epoch}_{run.profile.model_stem}.pth")
    # Checkpoint first, then log: a kill in between is repaired from the history on --resume.
    run.save(run.last_path)
    run.logger.log_metrics(metrics, step=epoch)


def fit(run: Run, resumed: bool) -> None:
    """The epoch loop, with its one place for Ctrl-C, out-of-memory and non-finite-loss handling."""
    config, state = run.config, run.state
    state.completed = False
    try:
        if not resumed:  # so that an interrupt during the first epoch still leaves a resumable file
            run.save(run.last_path)
        # A resumed run that had stopped early (killed while finishing) goes straight to finish().
        while state.epoch < config.epochs and not run.stopped_early:
            train_and_validate(run, state.epoch + 1)
        if run.stopped_early:
            print(f"Early stopping: no better validation AUC for {config.early_stop_patience} epochs")
    except KeyboardInterrupt:
        run.logger.set_status("KILLED")
        print(f"\nInterrupted. {run.last_path} holds epoch {state.epoch}; resume with:\n  {run.resume_command}")
        raise SystemExit(130) from None
    except torch.OutOfMemoryError as exc:
        run.logger.set_status("FAILED")
        raise SystemExit(
            f"error: out of GPU memory at batch size {config.batch_size} ({str(exc).splitlines()[0]}).\n"
            "Try --batch-size 8 and --amp (mixed precision), then resume with:\n  "
            f"{run.resume_command} --batch-size 8 --amp"
        ) from exc
    except NonFiniteLossError:
        run.logger.set_status("FAILED")
        raise


def finish(run: Run) -> dict:
    """Score the test set once, on the best checkpoint; write summary.json; log the model; close the run."""
    runtime.barrier(run.dist)  # rank 0 has finished writing the best checkpoint
    best = load_checkpoint(run.best_path)
    best_model = model_from_checkpoint(best).to(run.device)  # run.model keeps the last epoch's weights
    if runtime.use_channels_last(run.device):
        best_model = best_model.to(memory_format=torch.channels_last)
    test_results = evaluate(best_model, run.loaders[2], run.device, run.dist, len(run.manifest["test"]))
    if run.dist.active:
        torch.distributed.destroy_process_group()
    if not run.dist.is_main:
        return {}
    print(format_results("Test", test_results))
    test_metrics = scalar_metrics(test_results, "test")
    run.logger.log_metrics(test_metrics)
    for path in save_test_figures(test_results["labels"], test_results["probs"], run.checkpoint_dir):
        run.logger.log_artifact(path, artifact_path="test")
    summary = run.summary(best["best_epoch"], test_metrics)
    summary_path = run.checkpoint_dir / SUMMARY_NAME
    write_json(summary, summary_path)
    run.logger.log_artifact(summary_path)
    run.state.completed = True
    run.save(run.last_path)
    log_model(run.logger, best_model, run.config.image_size)
    run.logger.set_status("FINISHED")
    print(f"Best checkpoint (epoch {best['best_epoch']}): {run.best_path}")
    offline = f" (offline: queued records in {run.pending_path}; {run.resume_command} replays them)"
    print(f"Summary: {summary_path}; MLflow run {run.logger.run_id}" + (offline if run.logger.offline else ""))
    return summary


def scoring(config: TrainConfig) -> evaluation.Scoring:
    device = runtime.resolve_device(config.device)
    return evaluation.Scoring(
        device, config.batch_size * 2, config.num_workers, config.bootstrap_resamples, config.seed
    )


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    if config.compare:
        return evaluation.compare_checkpoints(config.compare, config.data_dir, scoring(config), config.tracking_uri)
    if config.test_only:
        return evaluation.run_test_only(Path(config.resume), config.data_dir, scoring(config), config.tracking_uri)
    resumed = load_resumable(config.resume) if config.resume else None
    run = set_up(config)
    prepare_data(run, resumed)
    if config.prepare_only:  # the data report is printed: stop before any model is built
        return run.manifest
    build_training(run, resumed)
    if not restore_or_start(run, resumed):
        return read_json(run.checkpoint_dir / SUMMARY_NAME)
    fit(run, resumed=resumed is not None)
    return finish(run)


if __name__ == "__main__":
    main(sys.argv[1:])
