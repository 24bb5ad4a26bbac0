"""Training the lung-field model of tbcxr/lungs.py from random weights: `python -m tbcxr.lung_training`.

Reads ../shared/data/cxr-lung-masks (images/NAME.png with masks/NAME.png), holds out a seeded share of the pairs
(scikit-learn's train_test_split on the sorted names), trains the MONAI U-Net on the rest with augmentation
applied jointly to picture and mask (MONAI: scale, shift, small rotation; gamma, blur and noise on the picture
alone; no flips: a mirrored chest puts the heart on the wrong side), then scores the held-out pairs once, at
their own size: mean Dice and the IoU of the lung box with the radiologists' box. It writes the weights with
the command, the data digest, the held-out names and scores (tbcxr/lung_model.pt by default). Seeded and
deterministic on the CPU: the same command, data and library versions give the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import add_dataclass_arguments, checked, flag, non_negative_int, positive_float, positive_int
from .decoding import load_xray
from .errors import DataError, exits_on_error
from .lungs import (
    BOX_CONVENTION,
    LungModel,
    box_iou,
    dice,
    full_box,
    lung_box,
    lung_mask,
    lung_network,
    resized,
    save_lung_model,
    standardised,
)
from .runtime import seed_everything

COMMAND = "python -m tbcxr.lung_training"
input_size = checked(
    int, lambda v: v >= 32 and v % 16 == 0, "be a multiple of 16 (the U-Net halves it 4 times), 32 or more"
)


@dataclass
class LungTrainConfig:
    """Every setting of the lung-field model's training; each field is a command-line flag."""

    data_dir: str = flag("../shared/data/cxr-lung-masks", "folder with images/NAME.png and masks/NAME.png")
    output: str = flag("tbcxr/lung_model.pt", "weights file to write (the shipped model's path by default)")
    epochs: int = flag(50, "training epochs (one cosine learning-rate cycle over all of them)", type=positive_int)
    batch_size: int = flag(8, "pictures per step", type=positive_int)
    lr: float = flag(3e-3, "peak learning rate (AdamW, one-cycle schedule)", type=positive_float)
    input_size: int = flag(96, "square network input in pixels (scores are at each mask's own size)", type=input_size)
    held_out: int = flag(20, "pairs held out for scoring, never trained on", type=positive_int)
    seed: int = flag(0, "seed of the held-out choice, the weights' initialisation and the augmentation")
    limit: int = flag(0, "use only the first N pairs by name (0: all), for a quick check", type=non_negative_int)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, LungTrainConfig)
    return parser


def pair_names(folder: Path, limit: int) -> list[str]:
    """Sorted names of the pictures that have a mask; the first `limit` of them when limit > 0."""
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise DataError(f"error: {folder} needs images/ and masks/ folders of same-named PNGs")
    names = sorted(p.name for p in (folder / "images").glob("*.png") if (folder / "masks" / p.name).is_file())
    return names[:limit] if limit else names


def data_digest(folder: Path, names: list[str]) -> str:
    """SHA-256 over each pair's name, picture bytes and mask bytes, in name order: which data made the weights."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update((folder / "images" / name).read_bytes())
        digest.update((folder / "masks" / name).read_bytes())
    return digest.hexdigest()


def held_out_split(names: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """(training names, held-out names), both sorted: `count` names drawn with the seed."""
    from sklearn.model_selection import train_test_split

    if count >= len(names):
        raise DataError(f"error: cannot hold out {count} of {len(names)} pairs and still train on some")
    training, held_out = train_test_split(names, test_size=count, random_state=seed, shuffle=True)
    return sorted(training), sorted(held_out)


def read_pairs(folder: Path, names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(8-bit picture through the project's decoder, bool mask: 255 = lung) for each name."""
    pairs = []
    for name in names:
        picture = np.asarray(load_xray(folder / "images" / name))
        mask = np.asarray(Image.open(folder / "masks" / name).convert("L")) > 127
        if picture.shape != mask.shape:
            raise DataError(f"error: {name}: picture {picture.shape} and mask {mask.shape} differ in size")
        pairs.append((picture, mask))
    return pairs


def augmentation(input_size: int, seed: int):
    """MONAI transforms for one {"image", "label"} sample: the geometry moves picture and mask together
    (bilinear and nearest), the intensity changes touch the picture only. Anatomically safe: no flips."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
    )

    return Compose([
        RandAffined(keys=("image", "label"), prob=0.9, rotate_range=np.deg2rad(10), scale_range=(0.2, 0.2),
                    translate_range=(0.1 * input_size, 0.1 * input_size), mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
        RandScaleIntensityd(keys="image", prob=0.3, factors=0.2),
        RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        RandGaussianNoised(keys="image", prob=0.3, std=0.04),
    ]).set_random_state(seed=seed)  # fmt: skip


def train(network: torch.nn.Module, pairs: list, config: LungTrainConfig) -> list[float]:
    """Train in place; returns each epoch's mean training loss (Dice + cross-entropy, on augmented pictures)."""
    from monai.data import get_track_meta, set_track_meta

    tracking = get_track_meta()
    set_track_meta(False)  # plain tensors out of the transforms, no metadata overhead in the network
    try:
        return train_epochs(network, pairs, config)
    finally:
        set_track_meta(tracking)


def train_epochs(network: torch.nn.Module, pairs: list, config: LungTrainConfig) -> list[float]:
    from monai.losses import DiceCELoss

    pictures = resized([picture for picture, _ in pairs], config.input_size)
    masks = (resized([mask.astype(np.uint8) * 255 for _, mask in pairs], config.input_size) > 0.5).float()
    augment = augmentation(config.input_size, config.seed)
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(pairs) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(config.seed)
    losses = []
    network.train()
    for epoch in range(1, config.epochs + 1):
        epoch_loss = 0.0
        for batch in torch.randperm(len(pairs), generator=order).split(config.batch_size):
            samples = [augment({"image": pictures[i], "label": masks[i]}) for i in batch.tolist()]
            images = standardised(torch.stack([sample["image"] for sample in samples]))
            labels = torch.stack([sample["label"] for sample in samples])
            loss = loss_function(network(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(pairs))
        print(
            f"epoch {epoch}/{config.epochs}: training loss {losses[-1]:.4f} (Dice + cross-entropy, augmented)",
            flush=True,
        )
    return losses


def held_out_scores(model: LungModel, names: list[str], pairs: list) -> dict:
    """Each held-out pair's Dice (at the mask's own size) and lung-box IoU against the radiologists' box
    (0 where lung_box finds no plausible pair), their means and minima, and how many had no box."""
    predicted = lung_mask(model, [picture for picture, _ in pairs])
    per_image = {}
    for name, found, (_, reference) in zip(names, predicted, pairs):
        box = lung_box(found)
        per_image[name] = {"dice": dice(found, reference), "box_iou": box_iou(box, full_box(reference)),
                           "box": list(box) if box else None}  # fmt: skip
    dices = [score["dice"] for score in per_image.values()]
    ious = [score["box_iou"] for score in per_image.values()]
    return {"mean_dice": float(np.mean(dices)), "min_dice": float(np.min(dices)), "mean_box_iou": float(np.mean(ious)),
            "min_box_iou": float(np.min(ious)), "no_plausible_box": sum(s["box"] is None for s in per_image.values()),
            "per_image": per_image}  # fmt: skip


def scores_line(scores: dict, count: int, seed: int) -> str:
    return (
        f"held-out pairs ({count}, seed {seed} split, never trained on), scored at their own size: "
        f"mean Dice {scores['mean_dice']:.4f} (min {scores['min_dice']:.4f}), "
        f"mean lung-box IoU {scores['mean_box_iou']:.4f} (min {scores['min_box_iou']:.4f}), "
        f"no plausible box on {scores['no_plausible_box']}"
    )


@exits_on_error(get_args_parser)
def main(argv: list[str] | None = None) -> dict:
    import monai

    argv = sys.argv[1:] if argv is None else argv
    config = LungTrainConfig(**vars(get_args_parser().parse_args(argv)))
    folder = Path(config.data_dir)
    names = pair_names(folder, config.limit)
    training_names, held_out_names = held_out_split(names, config.held_out, config.seed)
    digest = data_digest(folder, names)
    print(f"lung-field model: {len(training_names)} pairs to train on, {len(held_out_names)} held out "
          f"(seed {config.seed}), input {config.input_size} px, data digest {digest[:12]}")  # fmt: skip
    seed_everything(config.seed)
    network = lung_network()
    started = time.perf_counter()
    losses = train(network, read_pairs(folder, training_names), config)
    train_seconds = time.perf_counter() - started
    model = LungModel(network.eval(), config.input_size, {})
    scores = held_out_scores(model, held_out_names, read_pairs(folder, held_out_names))
    print(scores_line(scores, len(held_out_names), config.seed))
    record = {
        "command": shlex.join([*COMMAND.split(), *argv]),
        "config": asdict(config),
        "data_digest": digest,
        "pairs": len(names),
        "held_out": held_out_names,
        "scores": scores,
        "box_convention": BOX_CONVENTION,
        "training_losses": losses,
        "train_seconds": round(train_seconds, 1),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
        f"{torch.get_num_threads()} torch threads",
        "trained_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "versions": {"torch": str(torch.__version__), "monai": monai.__version__},
    }
    output = Path(config.output)
    save_lung_model(output, network, config.input_size, record)
    print(f"trained in {train_seconds:.0f} s on the CPU; weights and record written to {output} "
          f"({output.stat().st_size / 1e6:.2f} MB)")  # fmt: skip
    return record


if __name__ == "__main__":
    main()
