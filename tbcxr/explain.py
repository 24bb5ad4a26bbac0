"""GradCAM: maps of where a checkpoint's network looks, their faithfulness (ROAD), and their figures.

CAMs come from pytorch-grad-cam on a target layer (model.layer4 for the ResNet50); each map's
faithfulness is scored with ROAD (remove-and-debias: confidence change when the least vs the most
relevant pixels are removed; higher means the map points at what the model really uses), seeded so
that a rerun gives the same scores. Captions give P(TB) against the operating threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import CLASS_NAMES
from .data import XrayDataset, checkpoint_transform
from .decoding import UNREADABLE_IMAGE_ERRORS
from .errors import ImageReadError
from .figures import pyplot, save_figure
from .lung_share import lung_share_text
from .metrics import probability_of, tb_log_odds
from .progress import track
from .runtime import ieee_float32

UNLABELLED = -1
ROAD_PERCENTILES = (20, 40, 60, 80)


def cam_methods() -> dict:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM

    return {
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "hirescam": HiResCAM,
        "layercam": LayerCAM,
        "eigencam": EigenCAM,
        "scorecam": ScoreCAM,
    }


# --------------------------------------------------------------------------- pure helpers
def display_rgb(tensor: torch.Tensor, mean, std) -> np.ndarray:
    """Undo normalisation: the float RGB image in [0, 1] exactly as the model saw it (H, W, 3)."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    return (tensor.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)


def class_slug(label: int) -> str:
    return "unlabelled" if label == UNLABELLED else CLASS_NAMES[label].lower()


def label_name(label: int) -> str:
    return "unknown" if label == UNLABELLED else CLASS_NAMES[label]


# --------------------------------------------------------------------------- CAM computation
def compute_cams(model, target_layer, batch: torch.Tensor, target_classes: list[int], method: str) -> np.ndarray:
    """(B, H, W) maps in [0, 1] from pytorch-grad-cam; its context manager removes the hooks."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam_methods()[method](model=model, target_layers=[target_layer]) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in target_classes])


def tie_free_ranks(cam: np.ndarray, seed: int) -> np.ndarray:
    """The map's pixel ranks spread evenly over [0, 1], equal values in a seeded random order.

    ROAD depends only on the order of the pixels, so ranks score the same as the map where it has no
    ties. Where it has (GradCAM's ReLU leaves large areas at exactly 0), the library's percentile masks
    (pixels below the percentile's value) remove every tied pixel: all of a flat map at every percentile.
    """
    flat = cam.ravel()
    order = np.lexsort((np.random.default_rng(seed).random(flat.size), flat))
    ranks = np.empty(flat.size, dtype=np.float32)
    ranks[order] = np.arange(flat.size) / (flat.size - 1)
    return ranks.reshape(cam.shape)


def faithfulness(model, batch: torch.Tensor, maps: np.ndarray, target_classes: list[int], seed: int = 0) -> np.ndarray:
    """ROAD combined score per image (pytorch-grad-cam's metric); higher is more faithful.

    Reproducible: each percentile removes that share of pixels (tie_free_ranks), and the imputer's
    noise (torch's global CPU generator) is seeded per image, so a score depends on neither the run
    nor the other images of its batch."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    road = ROADCombined(percentiles=list(ROAD_PERCENTILES))
    scores = []
    for image, cam, target in zip(batch, maps, target_classes):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.default_generator.manual_seed(seed)
            ranks = tie_free_ranks(cam, seed)[None]
            scores.append(road(image[None], ranks, [ClassifierOutputSoftmaxTarget(target)], model)[0])
    return np.asarray(scores, dtype=float)


@dataclass
class Explanation:
    path: str
    true_label: int
    prob_tb: float
    log_odds: float  # calibrated log-odds of TB: what `predicted` was decided on
    predicted: int
    target: int
    cam: np.ndarray
    rgb: np.ndarray
    road: float
    threshold: float  # the log-odds threshold that turned log_odds into `predicted`
    chosen_on: str = ""  # the images the threshold was chosen on, e.g. "validation (20 Normal and 20 Tuberculosis)"
    lung_share: float | None = None  # share of the map's mass inside the lungs (lung_share.py); None: n/a
    lung_fields: str = ""  # how the lungs behind lung_share were found; "": not measured
    lung_area: float | None = None  # the lungs' share of the map's grid: an even map's lung share

    @property
    def wrong(self) -> bool:
        return self.true_label != UNLABELLED and self.true_label != self.predicted


class ExplainedImages(XrayDataset):
    """XrayDataset whose unreadable file stops the run with an error naming it: a map is asked for each one."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except UNREADABLE_IMAGE_ERRORS as exc:
            raise ImageReadError(self.samples[index][0], exc) from exc


def explain(
    model,
    target_layer,
    samples,
    checkpoint: Checkpoint,
    device,
    method: str,
    target: str,
    batch_size: int,
    score_faithfulness: bool = True,
    seed: int = 0,
    threshold: float | None = None,
) -> list[Explanation]:
    """Predict and explain every (path, label) sample, batch by batch (road is NaN when not scored).

    Predictions use the checkpoint's calibration and a log-odds threshold: by default its recommended operating
    point (validation-chosen)."""
    threshold = checkpoint.operating_threshold if threshold is None else threshold
    # No worker processes: CAMs, not decoding, take the time, and an unreadable file's error stays as it is.
    loader = torch.utils.data.DataLoader(ExplainedImages(samples, checkpoint_transform(checkpoint)), batch_size)
    model = model.to(device).eval()
    explanations = []
    batches = (samples[start : start + batch_size] for start in range(0, len(samples), batch_size))
    for chunk, (batch, _) in track(zip(batches, loader), method, total=len(loader), unit="batch", noun="batches"):
        batch = batch.to(device)
        with torch.no_grad(), ieee_float32():  # log-odds as prediction and --test-only compute them
            log_odds = tb_log_odds(model(batch), checkpoint.state.calibration)
        probs, predicted = probability_of(log_odds), (log_odds >= threshold).astype(int)
        targets = [int(p) if target == "predicted" else CLASS_NAMES.index(target.capitalize()) for p in predicted]
        maps = compute_cams(model, target_layer, batch, targets, method)
        scores = faithfulness(model, batch, maps, targets, seed) if score_faithfulness else np.full(len(chunk), np.nan)
        for i, (path, label) in enumerate(chunk):
            explanations.append(
                Explanation(
                    path=str(path),
                    true_label=label,
                    prob_tb=float(probs[i]),
                    log_odds=float(log_odds[i]),
                    predicted=int(predicted[i]),
                    target=targets[i],
                    cam=maps[i],
                    rgb=display_rgb(batch[i], checkpoint.mean, checkpoint.std),
                    road=float(scores[i]),
                    threshold=threshold,
                    chosen_on=checkpoint.operating_points_chosen_on_text,
                )
            )
    return explanations


# --------------------------------------------------------------------------- figures
def overlay(e: Explanation) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(e.rgb, e.cam, use_rgb=True)


def distinct_pair(a: float, b: float, spec: str, most: int) -> tuple[str, str]:
    """Both formatted with the fewest decimals (1 to `most`) that tell them apart (`spec`: "%" or "f")."""
    for decimals in range(1, most + 1):
        shown = f"{a:.{decimals}{spec}}", f"{b:.{decimals}{spec}}"
        if shown[0] != shown[1] or a == b:
            break
    return shown


def caption_lines(e: Explanation) -> list[str]:
    """True label, predicted label, and P(TB) and its log-odds against the operating threshold that decided it
    (the log-odds with as many decimals as tell them apart: P(TB) near 1 can print alike on both sides), and
    how many images the threshold was chosen on.

    Never a 'confidence' in the predicted class: with a threshold above 50%, 'Normal (48.5%)' for
    P(TB) 51.5% reads as 48.5% sure of Normal."""
    prob, threshold = distinct_pair(e.prob_tb, float(probability_of(e.threshold)), "%", 4)
    score, cut = distinct_pair(e.log_odds, e.threshold, "f", 17)
    side = "≥" if e.log_odds >= e.threshold else "<"
    lines = [
        f"True: {label_name(e.true_label)}",
        f"Pred: {CLASS_NAMES[e.predicted]}{'  WRONG' if e.wrong else ''}",
        f"P(TB) {prob} vs threshold {threshold}: log-odds {score} {side} {cut}",
        *([lung_share_text(e.lung_share, e.lung_fields)] if e.lung_fields else []),
    ]
    return lines + ([f"threshold chosen on {e.chosen_on}"] if e.chosen_on else [])


def caption(e: Explanation) -> str:
    return " | ".join(caption_lines(e))


def render_explanation(e: Explanation, method: str, run_label: str, path: Path) -> None:
    """Original X-ray, heatmap with colour bar, and overlay, in one titled PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    axes[0].imshow(e.rgb[..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("X-ray")
    heat = axes[1].imshow(e.cam, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"{method} map for {CLASS_NAMES[e.target]}")
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay(e))
    axes[2].set_title(f"Overlay (ROAD {e.road:+.3f})")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{caption(e)}\n{method} | {run_label} | {Path(e.path).name}", color="red" if e.wrong else "black")
    save_figure(fig, path, dpi=100)


def provenance(checkpoint: Checkpoint, manifest: dict | None) -> str:
    """What the model in a figure was trained on and how, so that no reader takes it for more than it is."""
    weights = checkpoint.initial_weights
    start = {"none": "random initial weights", "imagenet": "ImageNet initial weights"}.get(weights, weights)
    data = "unknown data"
    if manifest:
        data = f"{Path(manifest['data_dir']).name} ({len(manifest['train']) + len(manifest['val'])} training images)"
    return f"model trained on {data}, {checkpoint.image_size} px, {start}; epoch {checkpoint.state.epoch}"


def render_grid(explanations: list[Explanation], method: str, run_label: str, path: Path, per_class: int = 4) -> None:
    """A few cases per true class, wrong predictions first, as one overview PNG."""
    rows = []
    for label in sorted({e.true_label for e in explanations}):
        cases = sorted((e for e in explanations if e.true_label == label), key=lambda e: not e.wrong)
        rows.append(cases[:per_class])
    columns = max(len(row) for row in rows)
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), columns, figsize=(max(3 * columns, 9), 3.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(overlay(row[c]))
                ax.set_title("\n".join(caption_lines(row[c])), fontsize=8, color="red" if row[c].wrong else "black")
    fig.suptitle(f"GradCAM summary: {method} | {run_label}")
    save_figure(fig, path, dpi=100)


def render_comparison(pair: tuple[Explanation, Explanation], labels: tuple[str, str], method: str, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    axes[0].imshow(pair[0].rgb[..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"X-ray (true: {label_name(pair[0].true_label)})")
    for ax, e, label in zip(axes[1:], pair, labels):
        ax.imshow(overlay(e))
        ax.set_title(
            "\n".join([label, *caption_lines(e)[1:], f"ROAD {e.road:+.3f}"]),
            fontsize=9,
            color="red" if e.wrong else "black",
        )
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{method}: {labels[0]} vs {labels[1]} | {Path(pair[0].path).name}")
    save_figure(fig, path, dpi=100)


def mean_road_per_class(explanations: list[Explanation]) -> dict[str, float]:
    return {
        label_name(label): float(np.mean([e.road for e in explanations if e.true_label == label]))
        for label in sorted({e.true_label for e in explanations})
    }
