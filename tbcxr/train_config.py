"""The trainer's settings: TrainConfig, one field per command-line flag, and how a run's config is layered.

Dataclass defaults < the mode's defaults (--freeze-features, --demo, the from-scratch recipe for random
weights) < a resumed run's saved config < the flags typed; a resumed run keeps the settings its saved
optimizer, scheduler and split depend on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .checkpoint import Checkpoint
from .config import (
    FULL_TRAINING,
    TRANSFER_LEARNING,
    flag,
    image_size,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
)
from .demo import DEMO_DATA_DIR
from .errors import FlagError
from .metrics import SELECTION_WINDOWS


@dataclass
class TrainConfig:
    """Every setting of a training run; each field is a command-line flag."""

    data_dir: str = flag("", "data folder, organized train/test or raw Kaggle layout; also read from TB_DATA_DIR, "
                         "except by --test-only/--compare (a folder to score, else the split's test side)")  # fmt: skip
    epochs: int = flag(30, "maximum number of epochs", type=positive_int)
    batch_size: int = flag(16, "batch size (32 with --freeze-features)", type=positive_int)
    lr: float = flag(1e-4, "classifier learning rate (1e-3 with --freeze-features or the from-scratch recipe, which "
                     "--weights none chooses only without --lr)", type=positive_float)  # fmt: skip
    backbone_lr_mult: float = flag(0.1, "backbone LR = lr x this (1.0 in the from-scratch recipe; typing it keeps the "
                                   "recipe)", type=positive_float)  # fmt: skip
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
    registered_model: str = flag("resnet50_tb_full", "MLflow Model Registry name the best model is registered under "
                                 "as a servable pyfunc (images in, decisions out)")  # fmt: skip
    resume: str = flag("", "continue from this checkpoint (e.g. checkpoints/resnet50_tb_full/last.pth)")
    demo: bool = flag(False, "generate a small synthetic data set and run the whole pipeline on it")
    prepare_only: bool = flag(False, "check, split and cache the data, print a data report, and exit (no model)")
    deterministic: bool = flag(False, "deterministic kernels, so a resumed run repeats an uninterrupted one exactly")
    strict: bool = flag(False, "stop on unreadable image files instead of skipping them")
    dedup: bool = flag(False, "drop exact and near duplicates of training images from validation and test")
    temperature_scaling: bool = flag(False, "calibrate P(TB) on validation: Platt scaling, a scale and a bias of the "
                                     "logit difference (a temperature alone cannot undo the prior shift of "
                                     "oversampled training); stored in the checkpoint")  # fmt: skip
    test_only: bool = flag(False, "only evaluate the --resume checkpoint (95% bootstrap CIs) on --data-dir, else "
                           "on its split manifest's test side")  # fmt: skip
    site_thresholds: bool = flag(False, "with --test-only on a hospital's own labelled sample (20+ images of each "
                                 "class): write a threshold table and plot, and a new checkpoint beside --resume "
                                 "with operating points refitted on the sample; thresholds drift between sites, "
                                 "so WHO asks each to choose its own")  # fmt: skip
    prevalence: float = flag(0.05, "TB prevalence where the model will screen, for --site-thresholds' PPV, NPV and "
                             "referrals per 1,000: screening prevalence is often 1-5%, far below any training "
                             "set's", type=open_fraction)  # fmt: skip
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


def choose_recipe(given: dict, weights: str) -> tuple[str, str]:
    """A new run's recipe and why: from-scratch for random weights, unless --lr or a mode says otherwise.
    Only --lr turns it off: --backbone-lr-mult and the recipe's other settings adjust it, as typed flags."""
    if "recipe" in given:
        return given["recipe"], f"--recipe {given['recipe']} given"
    if given.get("freeze_features"):
        return "original", "--freeze-features: the transfer-learning baseline keeps its own settings"
    if given.get("demo"):
        return "original", "--demo keeps its own settings"
    if weights != "none":
        return "original", f"initial weights {weights}, which the original design's rates are made for"
    if "lr" in given:
        return "original", "random initial weights, but --lr given; --recipe from-scratch keeps your rate"
    return "from-scratch", "random initial weights and no --lr given; --recipe original turns it off"


def fixed_on_resume(settings: dict) -> dict[str, str]:
    """The settings a resumed run keeps as they were saved, each with the reason."""
    fixed = {"selection": "the best checkpoint so far was chosen by its rule"}
    fixed |= dict.fromkeys(("lr", "backbone_lr_mult", "lr_scale"), "the optimizer's saved state holds the rates")
    fixed["freeze_features"] = "the optimizer's saved state holds the trained layers"
    fixed["recipe"] = "the run goes on with its saved settings"
    fixed["schedule"] = "the scheduler's saved state holds it"
    # The split settings would be ignored yet recorded in later configs; the image settings would change mid-run
    # (and a size recorded in the best checkpoint that its weights were not trained at).
    fixed |= dict.fromkeys(("val_fraction", "test_fraction", "dedup"), "the saved split is reused, test images and all")
    prepared = "every epoch so far saw the images prepared this way"
    fixed |= dict.fromkeys(("image_size", "clahe", "intensity_augment"), prepared)
    if settings["schedule"] == "plateau":
        fixed["scheduler_patience"] = "the scheduler's saved state holds it"
    else:
        fixed |= dict.fromkeys(("epochs", "warmup_epochs"), "they laid out the cosine schedule at the start")
    return fixed


def layered_config(given: dict) -> tuple[TrainConfig, str]:
    """Layer the config: dataclass defaults < mode defaults < resumed config < `given` (the flags typed).
    Also says why the recipe applies, for the console. FlagError for flags that do not go together."""
    if given.get("test_only") and not given.get("resume"):
        raise FlagError("--test-only needs --resume CKPT, the checkpoint to evaluate")
    if given.get("site_thresholds") and not given.get("test_only"):
        raise FlagError("--site-thresholds needs --test-only --resume CKPT --data-dir DIR: it scores a labelled sample")
    if given.get("site_thresholds") and not given.get("data_dir"):
        raise FlagError(
            "--site-thresholds needs --data-dir DIR, the site's own labelled sample (never the split's test side)"
        )
    if "prevalence" in given and not given.get("site_thresholds"):
        raise FlagError("--prevalence is used only by --site-thresholds")
    # Evaluation scores the split manifest's test side unless --data-dir is typed: no saved or environment folder.
    evaluating = bool(given.get("test_only") or given.get("compare"))
    layered, defaults, recipe_reason = {}, asdict(TrainConfig()), ""
    if os.environ.get("TB_DATA_DIR") and not evaluating:
        layered["data_dir"] = os.environ["TB_DATA_DIR"]
    if given.get("resume") and not evaluating:  # settings of earlier versions that no longer exist are dropped
        saved = {k: v for k, v in Checkpoint.load(given["resume"]).config.items() if k in defaults and k != "resume"}
        layered |= saved
        recipe_reason = "the resumed run's saved setting"
        before = defaults | saved  # what the resumed run was trained with
        for key, reason in fixed_on_resume(before).items():
            if key in given and given[key] != before[key]:
                raise FlagError(f"--{key.replace('_', '-')} cannot change on resume: {reason}")
    else:
        if given.get("freeze_features"):
            layered |= TRANSFER_DEFAULTS
        if given.get("demo"):
            layered |= DEMO_DEFAULTS
        recipe, recipe_reason = choose_recipe(given, (defaults | layered | given)["weights"])
        if recipe == "from-scratch":
            layered |= FROM_SCRATCH_DEFAULTS
    if "warmup_epochs" in given and (layered | given).get("schedule", "plateau") == "plateau":
        raise FlagError("--warmup-epochs needs --schedule cosine")
    return TrainConfig(**(layered | given)), recipe_reason
