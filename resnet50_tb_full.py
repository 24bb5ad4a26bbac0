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
from pathlib import Path

import torch
from torch import nn

from tbcxr import comparison, evaluation, runtime
from tbcxr import training as stages
from tbcxr.checkpoint import Checkpoint, read_json
from tbcxr.config import LAST_CHECKPOINT_NAME, MANIFEST_NAME, add_dataclass_arguments, refuse_inside
from tbcxr.data import LoaderSettings, PreparationSettings, make_loaders, prepare_manifest
from tbcxr.demo import DEMO_DATA_DIR, make_demo_dataset
from tbcxr.errors import ConfigurationError, FlagError, NonFiniteLossError, TrainingError, exits_on_error
from tbcxr.metrics import (
    SELECTION_WINDOWS,
    Calibration,
    classification_metrics,
    format_results,
    operating_points,
    probability_of,
    scalar_metrics,
    selection_score,
    tb_log_odds,
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
from tbcxr.model_registry import log_model, register_servable_model
from tbcxr.progress import track
from tbcxr.split import manifest_beside, split_digest
from tbcxr.train_config import TrainConfig, layered_config
from tbcxr.training import Run, Training, load_resumable, loss_function, lr_multiplier, print_header


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, str]:
    """The run's config (train_config.layered_config) and why its recipe applies; bad flag mixes: usage errors."""
    parser = get_args_parser()
    try:
        return layered_config(vars(parser.parse_args(argv)))
    except FlagError as exc:
        parser.error(str(exc))


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The run's config; see parse_config."""
    return parse_config(argv)[0]


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


def evaluate(
    model, loader, device, dist=runtime.SINGLE_PROCESS, total: int = 0, calibration: Calibration = Calibration()
) -> dict:
    """Loss and classification metrics at threshold 0.5, plus the raw labels, logits and probabilities
    (P(TB) under `calibration`; validation's stay the network's own, as the calibration is fitted on them).
    Under torchrun every rank scores its shard and the `total` predictions are gathered in order."""
    runtime.broadcast_buffers(model, dist)
    with runtime.ieee_float32():  # reported scores in float32, as --test-only recomputes them
        labels, logits, loss = predict_logits(model, loader, device)
    if dist.active:
        stacked = torch.cat([logits, torch.as_tensor(labels).unsqueeze(1).float()], 1).to(device)
        gathered = runtime.gather_shards(stacked, dist, total).cpu()
        logits, labels = gathered[:, :-1], gathered[:, -1].long().numpy()
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(labels)))
    scores = tb_log_odds(logits, calibration)  # float64: a float32 P(TB) ties every image past log-odds ~17
    results = {"loss": loss, **classification_metrics(labels, scores), "labels": labels, "logits": logits}
    return results | {"scores": scores, "probs": probability_of(scores)}


# --------------------------------------------------------------------------- the run's stages
def set_up(config: TrainConfig) -> tuple[runtime.DistributedContext, torch.device]:
    """Join torchrun if launched by it, make the demo data, seed, and pick the device."""
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
    if dist.is_main:
        Path(config.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return dist, device


def prepare_data(config: TrainConfig, dist, device, resumed: Checkpoint | None) -> tuple[dict, tuple]:
    """The split manifest and the train, validation and test loaders (none with --prepare-only). The data is
    split, checked and cached once; a resumed run reuses its saved split, so test images never change."""
    checkpoint_dir = Path(config.checkpoint_dir)
    if config.prepare_only and (checkpoint_dir / LAST_CHECKPOINT_NAME).is_file():
        raise ConfigurationError(
            f"error: {checkpoint_dir} holds a training run's checkpoints, whose split manifest --prepare-only "
            "would replace: use another --checkpoint-dir"
        )
    with runtime.main_process_first(dist):
        if resumed is not None:
            manifest = manifest_beside(checkpoint_dir / LAST_CHECKPOINT_NAME, resumed, required=True)
        elif not dist.is_main:
            manifest = read_json(checkpoint_dir / MANIFEST_NAME)
        else:
            settings = PreparationSettings(
                config.val_fraction, config.test_fraction, config.seed, strict=config.strict, dedup=config.dedup
            )
            manifest = prepare_manifest(
                config.data_dir, checkpoint_dir / MANIFEST_NAME, settings, workers=config.num_workers,
                image_size=config.image_size if config.fast_data else 0,
                cache_dir=checkpoint_dir / "cache",  # the scan is kept there on either data path
            )  # fmt: skip
        if config.prepare_only:
            return manifest, ()
        settings = LoaderSettings(
            image_size=config.image_size, batch_size=config.batch_size, seed=config.seed,
            oversample=config.balance == "oversample", fast_data=config.fast_data,
            cache_dir=checkpoint_dir / "cache", num_workers=config.num_workers, clahe=config.clahe,
            intensity=config.intensity_augment,
        )  # fmt: skip
        return manifest, make_loaders(manifest, device, settings, dist)


def build_training(config: TrainConfig, dist, device, train_labels: list[int], resumed: bool) -> Training:
    """The model (and its DDP/compile wrappers), Adam with differential learning rates, scheduler, AMP, loss."""
    model = build_model(config.weights if not resumed else "none", config.freeze_features).to(device)
    if runtime.use_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic
    if config.sync_bn and dist.active:
        if device.type != "cuda":
            raise ConfigurationError("error: --sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model = model  # checkpoints keep the plain model's keys
    if dist.active:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        step_model = torch.compile(step_model)
    lr = config.lr * lr_multiplier(config.lr_scale, dist.world_size)
    optimizer = build_optimizer(model, lr, config.backbone_lr_mult)
    scheduler = build_scheduler(
        optimizer, config.schedule, config.epochs, config.warmup_epochs, config.scheduler_patience
    )
    amp_dtype = runtime.autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = loss_function(config.balance, train_labels, device)
    return Training(model, step_model, optimizer, scheduler, scaler, criterion, amp_dtype, device)


def restore_or_start(run: Run, resumed: Checkpoint | None) -> bool:
    """Load a resumed checkpoint's weights and state, or open a new MLflow run; False if nothing is left to train."""
    if resumed:
        run.restore(resumed)
        print(f"Resumed from {run.config.resume} after epoch {run.state.epoch}")
    state = run.state  # every process decides alike: under torchrun they must all stop or all train
    finished = bool(resumed) and state.completed and (state.epoch >= run.config.epochs or run.stopped_early)
    if run.dist.is_main:
        run.open_tracking(resumed)
        if resumed and not state.completed and state.best_epoch == state.epoch > 0:
            # The last epoch was the best: a kill after its last.pth may have come before its best file.
            run.save(run.best_path, include_training_state=False)
        if finished:
            print("That run had already finished; nothing left to train.")
            # Its model is logged and registered here only if the store did not answer when it finished.
            if run.logger.model_registered():
                run.logger.set_status("FINISHED")  # continue_run set it RUNNING
            elif not run.logger.offline and (servable := log_best_model(run, Checkpoint.load(run.best_path).model())):
                print(servable)
    return not finished


def train_and_validate(run: Run, loaders: tuple, val_images: int, epoch: int) -> None:
    """One epoch: train, validate, step the scheduler, keep the best and the periodic checkpoints, log."""
    config, state, training = run.config, run.state, run.training
    train_loader, val_loader, _ = loaders
    device = training.device
    train_loader.sampler.set_epoch(epoch)
    started = time.perf_counter()
    train_results = train_one_epoch(training.step_model, train_loader, training.criterion, training.optimizer,
                                    training.scaler, device, training.amp_dtype, epoch, run.dist)  # fmt: skip
    val_results = evaluate(training.model, val_loader, device, run.dist, val_images)
    lrs = group_lrs(training.optimizer)  # the rates this epoch trained with
    step_scheduler(training.scheduler, val_results["loss"])
    state.train_seconds += time.perf_counter() - started
    state.epoch = epoch
    state.peak_memory_mb = max(state.peak_memory_mb, runtime.peak_memory_mb(device))

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
    state.thresholds, state.calibration = points["thresholds"], points["calibration"]
    state.operating_points_epoch, state.validation_counts = epoch, points["validation_counts"]
    window = min(SELECTION_WINDOWS[config.selection], config.epochs)
    score = selection_score(state.history, window)
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.stale_epochs = score, epoch, 0
    elif len(state.history) >= window:  # patience counts from the first full window: before it nothing was compared
        state.stale_epochs += 1
    run.save_epoch(improved)  # checkpoints first, then log: a kill before the log is repaired on --resume
    run.logger.log_metrics(metrics, step=epoch)


def fit(run: Run, loaders: tuple, val_images: int, resumed: bool) -> None:
    """The epoch loop, with its one place for Ctrl-C, out-of-memory and non-finite-loss handling."""
    config, state = run.config, run.state
    state.completed, epoch = False, state.epoch + 1  # epoch: the one under way (training, validating or saving)
    try:
        if not resumed:  # so that an interrupt during the first epoch still leaves a resumable file
            run.save(run.last_path)
        # A resumed run that had stopped early (killed while finishing) goes straight to finish().
        while state.epoch < config.epochs and not run.stopped_early:
            train_and_validate(run, loaders, val_images, epoch := state.epoch + 1)
        if run.stopped_early:
            print(f"Early stopping: no better validation AUC for {config.early_stop_patience} epochs")
    except KeyboardInterrupt:
        run.logger.set_status("KILLED")
        print(f"\n{run.interruption_report(epoch)}")
        raise SystemExit(130) from None
    except torch.OutOfMemoryError as exc:
        run.logger.set_status("FAILED")
        raise TrainingError(
            f"error: out of GPU memory at batch size {config.batch_size} ({str(exc).splitlines()[0]}).\n"
            "Try --batch-size 8 and --amp (mixed precision), then resume with:\n  "
            f"{run.resume_command} --batch-size 8 --amp"
        ) from exc
    except NonFiniteLossError:
        run.logger.set_status("FAILED")
        raise


def finish(run: Run, test_loader, test_images: int) -> dict:
    """Score the test set once on the best checkpoint, at 0.5 and its operating point; write summary.json; log."""
    runtime.barrier(run.dist)  # rank 0 has finished writing the best checkpoint
    best, device = run.load_best(), run.training.device
    best_model = runtime.on_device(best.model(), device)  # run.training.model: the last epoch's weights
    test_results = evaluate(best_model, test_loader, device, run.dist, test_images, best.state.calibration)
    if run.dist.active:
        torch.distributed.destroy_process_group()
    if not run.dist.is_main:
        return {}
    if run.config.temperature_scaling and (calibration := best.state.calibration) == Calibration():
        print("P(TB) not calibrated: validation ranked the classes the wrong way round, so Platt scaling kept the "
              "network's own softmax (metrics.fit_calibration)")  # fmt: skip
    elif run.config.temperature_scaling:
        print(f"P(TB) calibrated on validation by Platt scaling: sigmoid({calibration.scale:.4f} x (logit_TB - "
              f"logit_Normal) {calibration.bias:+.4f})")  # fmt: skip
    print(format_results("Test", test_results))
    at_point = stages.test_at_operating_point(best, test_results["labels"], test_results["scores"])
    summary = run.record_test(best.state.best_epoch, test_results, at_point)
    run.state.completed = True
    run.save(run.last_path)
    servable = log_best_model(run, best_model)
    print(f"Best checkpoint (epoch {best.state.best_epoch}): {run.best_path}")
    offline = f" (offline: queued records in {run.pending_path}; {run.resume_command} replays them)"
    print(f"Summary: {run.summary_path}; MLflow run {run.logger.run_id}" + (offline if run.logger.offline else ""))
    if servable:
        print(servable)
    return summary


def log_best_model(run: Run, model: nn.Module) -> str:
    """Log the best model (pt2) and register it as a servable model; the run is then FINISHED. Returns the line
    saying how to serve it ("" when the store cannot be reached)."""
    log_model(run.logger, model, run.config.image_size)
    servable = register_servable_model(run.logger, run.best_path, run.config.registered_model)
    run.logger.set_status("FINISHED")
    return servable


def scoring(config: TrainConfig) -> evaluation.Scoring:
    device = runtime.resolve_device(config.device)
    return evaluation.Scoring(
        device, config.batch_size * 2, config.num_workers, config.bootstrap_resamples, config.seed
    )


# --------------------------------------------------------------------------- main
@exits_on_error(get_args_parser)
def main(argv: list[str] | None = None) -> dict:
    config, recipe_reason = parse_config(argv)
    if config.compare:
        return comparison.compare_checkpoints(config.compare, config.data_dir, scoring(config), config.tracking_uri)
    if config.test_only:
        site_prevalence = config.prevalence if config.site_thresholds else None
        return evaluation.run_test_only(
            Path(config.resume), config.data_dir, scoring(config), config.tracking_uri, site_prevalence=site_prevalence
        )
    resumed = load_resumable(config.resume) if config.resume else None
    dist, device = set_up(config)
    manifest, loaders = prepare_data(config, dist, device, resumed)
    if config.prepare_only:  # the data report is printed: stop before any model is built
        return manifest
    stages.check_validation_size(config.temperature_scaling, [label for _, label in manifest["val"]])
    training = build_training(config, dist, device, [label for _, label in manifest["train"]], resumed is not None)
    print_header(config, recipe_reason, manifest, training, device, dist)
    run = Run(config, dist, training, split_digest(manifest))
    if not restore_or_start(run, resumed):
        return read_json(run.summary_path)
    fit(run, loaders, len(manifest["val"]), resumed=resumed is not None)
    return finish(run, loaders[2], len(manifest["test"]))


if __name__ == "__main__":
    main(sys.argv[1:])
