"""Names and settings shared by both scripts.

The class names and their order, the file names a run writes, the two run profiles of the
original design (full network training, and the final-layer-only transfer-learning baseline),
and the bridge from a configuration dataclass to argparse flags with typed value checks.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

CLASS_NAMES = ("Normal", "Tuberculosis")
POSITIVE_CLASS = 1  # Tuberculosis: sensitivity is recall on this class
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MANIFEST_NAME = "split_manifest.json"
SUMMARY_NAME = "summary.json"
LAST_CHECKPOINT_NAME = "last.pth"
PENDING_RECORDS_NAME = "mlflow_pending.jsonl"

# The original design's enhanced augmentation, shared by the per-image CPU transforms and the batched
# device augmentation so that both draw from the same ranges.
AUGMENTATION = {
    "crop_scale": (0.8, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "hflip_p": 0.5,
    "degrees": 15.0,
    "brightness": 0.2,
    "contrast": 0.2,
}
# --intensity-augment: what differs between hospitals' X-rays (exposure curve, sharpness, noise), drawn
# per image after the geometric augmentation; identity is gamma 1, no blur, no noise.
INTENSITY_AUGMENTATION = {"gamma": (0.7, 1.4), "blur_sigma": (0.0, 1.0), "noise_std": (0.0, 0.03)}
# --clahe: OpenCV's contrast-limited adaptive histogram equalisation on the resized image.
CLAHE = {"clip_limit": 2.0, "tile_grid": (8, 8)}


@dataclass(frozen=True)
class Profile:
    """What differs between full training and the original design's transfer-learning baseline."""

    title: str
    experiment: str
    port: int
    checkpoint_dir: str
    model_stem: str
    gradcam_label: str
    gradcam_dir: str


FULL_TRAINING = Profile(
    title="FULL NETWORK TRAINING",
    experiment="ResNet50_TB_FullTraining",
    port=5003,
    checkpoint_dir="checkpoints/resnet50_tb_full",
    model_stem="resnet50_tb_full_trained",
    gradcam_label="full_training",
    gradcam_dir="gradcam_results/resnet50_tb_full",
)


TRANSFER_LEARNING = Profile(
    title="TRANSFER LEARNING (final layer only)",
    experiment="ResNet50_TB_FineTuning",
    port=5001,
    checkpoint_dir="checkpoints/resnet50_tb",
    model_stem="resnet50_tb_finetuned",
    gradcam_label="transfer_learning",
    gradcam_dir="gradcam_results/resnet50_tb",
)


def profile_for(freeze_features: bool) -> Profile:
    return TRANSFER_LEARNING if freeze_features else FULL_TRAINING


def best_checkpoint_path(checkpoint_dir: str | Path, freeze_features: bool) -> Path:
    return Path(checkpoint_dir) / f"best_{profile_for(freeze_features).model_stem}.pth"


def flag(default, help: str, **argparse_kwargs):
    """A configuration field that is also a command-line flag: its default, help text and argparse options."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """Add one kebab-case flag per dataclass field.

    Defaults are argparse.SUPPRESS so the namespace holds only what the user typed:
    that lets profile defaults (--freeze-features, --demo) and a resumed checkpoint's
    config sit underneath explicit flags.
    """
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{meta.pop('help')} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
        kwargs = dict(default=argparse.SUPPRESS, help=help_text, **meta)
        if f.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = {"int": int, "float": float}.get(f.type, str)
        parser.add_argument(_flag(f.name), **kwargs)


def checked(cast, accept, requirement: str):
    """An argparse value type: `cast` the text, then refuse values `accept` rejects, saying what is required."""

    def parse(text: str):
        value = cast(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must {requirement}, got {text}")
        return value

    parse.__name__ = cast.__name__  # argparse: "invalid int value: 'x'"
    return parse


positive_int = checked(int, lambda v: v >= 1, "be a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "be 0 or more")
open_fraction = checked(float, lambda v: 0.0 < v < 1.0, "lie strictly between 0 and 1")
positive_float = checked(float, lambda v: 0.0 < v < float("inf"), "be greater than 0")
image_size = checked(int, lambda v: v >= 32, "be at least 32 pixels (ResNet50 downsamples 32x)")


def refuse_inside(output: str | Path, data_dir: str | Path, flag: str) -> None:
    """Outputs never go inside the data folder: a later scan would take them for data."""
    if data_dir and Path(output).resolve().is_relative_to(Path(data_dir).resolve()):
        raise ConfigurationError(
            f"error: {flag} {output} lies inside the data folder {data_dir}; choose a folder outside it"
        )
