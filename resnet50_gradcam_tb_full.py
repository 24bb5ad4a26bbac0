"""Render GradCAM overlays that show where the trained TB ResNet50 looks.

    python resnet50_gradcam_tb_full.py                      # best full-training checkpoint, its test images
    python resnet50_gradcam_tb_full.py --images xray.png scans/ --method gradcam++
    python resnet50_gradcam_tb_full.py --compare-checkpoint checkpoints/resnet50_tb/best_resnet50_tb_finetuned.pth

The model, image size, normalisation and class names come from the checkpoint. CAMs come
from pytorch-grad-cam on model.layer4; each map's faithfulness is scored with ROAD
(remove-and-debias: confidence change when the least vs the most relevant pixels are
removed; higher means the map points at what the model really uses), seeded by --seed so
that a rerun prints the same scores. Captions give P(TB) against the operating threshold.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tbcxr.checkpoint import load_checkpoint, model_from_checkpoint, write_json
from tbcxr.config import (
    CLASS_NAMES,
    FULL_TRAINING,
    add_dataclass_arguments,
    best_checkpoint_path,
    flag,
    non_negative_int,
    positive_int,
    profile_of,
    refuse_inside,
)
from tbcxr.data import checkpoint_transform, find_class_dirs, labelled_images, list_images
from tbcxr.decoding import UNREADABLE_IMAGE_ERRORS, load_xray
from tbcxr.evaluation import held_out_samples, manifest_beside
from tbcxr.figures import pyplot, save_figure
from tbcxr.metrics import operating_threshold, tb_probability
from tbcxr.progress import track
from tbcxr.runtime import resolve_device
from tbcxr.tracking import log_to_training_run


@dataclass
class GradCamConfig:
    """Every setting of a GradCAM run; each field is a command-line flag."""

    checkpoint: str = flag(
        str(best_checkpoint_path(FULL_TRAINING.checkpoint_dir, False)), "checkpoint written by resnet50_tb_full.py"
    )
    data_dir: str = flag("", "data folder; default: the one the checkpoint was trained on (its test images)")
    images: list[str] = flag([], "explain these image files or folders instead of the test set", nargs="+")
    num_images: int = flag(5, "images per class from the test set", type=positive_int)
    method: str = flag(
        "gradcam", "CAM method", choices=["gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam"]
    )
    target: str = flag("predicted", "class the map explains", choices=["predicted", "normal", "tuberculosis"])
    batch_size: int = flag(8, "images per CAM batch", type=positive_int)
    device: str = flag("auto", "compute device", choices=["auto", "cuda", "cpu", "mps"])
    output_dir: str = flag(
        "", "output folder; default gradcam_results/resnet50_tb_full (resnet50_tb for transfer learning)"
    )
    compare_checkpoint: str = flag("", "second checkpoint (e.g. transfer learning): side-by-side maps per image")
    demo: bool = flag(False, "explain the checkpoint of `resnet50_tb_full.py --demo` on its synthetic test images")
    seed: int = flag(0, "seed of the ROAD score (imputation noise, order of equal map values)", type=non_negative_int)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, GradCamConfig)
    return parser


def config_from_args(argv: list[str] | None = None) -> GradCamConfig:
    return GradCamConfig(**vars(get_args_parser().parse_args(argv)))


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
    predicted: int
    target: int
    cam: np.ndarray
    rgb: np.ndarray
    road: float
    threshold: float  # the operating threshold that turned prob_tb into `predicted`

    @property
    def wrong(self) -> bool:
        return self.true_label != UNLABELLED and self.true_label != self.predicted


def load_batch(samples, transform) -> torch.Tensor:
    tensors = []
    for path, _ in samples:
        try:
            tensors.append(transform(load_xray(path)))
        except UNREADABLE_IMAGE_ERRORS as exc:
            raise SystemExit(f"error: cannot read image {path}: {exc}") from exc
    return torch.stack(tensors)


def explain(
    model,
    target_layer,
    samples,
    checkpoint: dict,
    device,
    method: str,
    target: str,
    batch_size: int,
    score_faithfulness: bool = True,
    seed: int = 0,
) -> list[Explanation]:
    """Predict and explain every (path, label) sample, batch by batch (road is NaN when not scored).

    Predictions use the checkpoint's temperature and operating threshold (validation-chosen)."""
    threshold = operating_threshold(checkpoint)
    transform = checkpoint_transform(checkpoint)
    model = model.to(device).eval()
    explanations = []
    for start in track(range(0, len(samples), batch_size), method, unit="batch", noun="batches"):
        chunk = samples[start : start + batch_size]
        batch = load_batch(chunk, transform).to(device)
        with torch.no_grad():
            probs = tb_probability(model(batch), checkpoint.get("temperature", 1.0)).cpu().numpy()
        predicted = (probs >= threshold).astype(int)
        targets = [int(p) if target == "predicted" else CLASS_NAMES.index(target.capitalize()) for p in predicted]
        maps = compute_cams(model, target_layer, batch, targets, method)
        scores = faithfulness(model, batch, maps, targets, seed) if score_faithfulness else np.full(len(chunk), np.nan)
        for i, (path, label) in enumerate(chunk):
            explanations.append(
                Explanation(
                    path=str(path),
                    true_label=label,
                    prob_tb=float(probs[i]),
                    predicted=int(predicted[i]),
                    target=targets[i],
                    cam=maps[i],
                    rgb=display_rgb(batch[i], checkpoint["mean"], checkpoint["std"]),
                    road=float(scores[i]),
                    threshold=threshold,
                )
            )
    return explanations


# --------------------------------------------------------------------------- selecting images
def samples_from_paths(paths: list[str]) -> list[tuple[str, int]]:
    """Files or folders given on the command line; a class folder name gives the true label."""
    samples = []
    for item in map(Path, paths):
        if item.is_dir():
            class_dirs = find_class_dirs(item)
            if class_dirs:
                samples += labelled_images(class_dirs)
            else:
                samples += [(str(p), label_from_folder(p)) for p in list_images(item)]
        elif item.is_file():
            samples.append((str(item), label_from_folder(item)))
        else:
            raise SystemExit(f"error: cannot read image {item}: no such file or folder")
    if not samples:
        raise SystemExit(f"error: no images found in {' '.join(paths)}")
    return samples


def label_from_folder(path: Path) -> int:
    names = [name.lower() for name in CLASS_NAMES]
    return names.index(path.parent.name.lower()) if path.parent.name.lower() in names else UNLABELLED


def first_per_class(samples, count: int) -> list[tuple[str, int]]:
    chosen = []
    for label in sorted({label for _, label in samples}):
        chosen += [s for s in samples if s[1] == label][:count]
    return chosen


# --------------------------------------------------------------------------- figures and index
def overlay(e: Explanation) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(e.rgb, e.cam, use_rgb=True)


def percent_pair(prob: float, threshold: float) -> tuple[str, str]:
    """Both as percentages, with the fewest decimals (1 to 4) that tell them apart: never '60.0% < 60.0%'."""
    for decimals in range(1, 5):
        shown = f"{prob:.{decimals}%}", f"{threshold:.{decimals}%}"
        if shown[0] != shown[1] or prob == threshold:
            break
    return shown


def caption_lines(e: Explanation) -> list[str]:
    """True label, predicted label, and P(TB) against the operating threshold that decided it.

    Never a 'confidence' in the predicted class: with a threshold above 50%, 'Normal (48.5%)' for
    P(TB) 51.5% reads as 48.5% sure of Normal."""
    prob, threshold = percent_pair(e.prob_tb, e.threshold)
    side = "≥" if e.prob_tb >= e.threshold else "<"
    return [
        f"True: {label_name(e.true_label)}",
        f"Pred: {CLASS_NAMES[e.predicted]}{'  WRONG' if e.wrong else ''}",
        f"P(TB) {prob} {side} threshold {threshold}",
    ]


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


def provenance(checkpoint: dict, manifest: dict | None) -> str:
    """What the model in a figure was trained on and how, so that no reader takes it for more than it is."""
    weights = checkpoint["config"].get("weights", "?")
    start = {"none": "random initial weights", "imagenet": "ImageNet initial weights"}.get(weights, weights)
    data = "unknown data"
    if manifest:
        data = f"{Path(manifest['data_dir']).name} ({len(manifest['train']) + len(manifest['val'])} training images)"
    return f"model trained on {data}, {checkpoint['image_size']} px, {start}; epoch {checkpoint.get('epoch', '?')}"


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


def write_index(rows: list[dict], summary: dict, csv_path: Path, json_path: Path) -> None:
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json({**summary, "images": rows}, json_path)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    checkpoint_path = Path(config.checkpoint)
    checkpoint = load_checkpoint(checkpoint_path)
    profile = profile_of(checkpoint)
    if config.demo:
        print("Demo: explaining the --demo checkpoint on its SYNTHETIC test images (not real data)")
    device = resolve_device(config.device)
    model = model_from_checkpoint(checkpoint)
    output_dir = Path(config.output_dir or profile.gradcam_dir)
    manifest = manifest_beside(checkpoint_path, checkpoint)
    trained_on = manifest["data_dir"] if manifest else ""
    for data_dir in {config.data_dir, trained_on} - {""}:
        refuse_inside(output_dir, data_dir, "--output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)

    if config.images:
        samples = samples_from_paths(config.images)
    else:
        samples = first_per_class(
            held_out_samples(checkpoint_path, config.data_dir, checkpoint=checkpoint)[0], config.num_images
        )
    print(
        f"GradCAM ({config.method}) for {checkpoint_path} [{profile.gradcam_label}] "
        f"on {len(samples)} images, device {device}"
    )
    explanations = explain(
        model,
        model.layer4,
        samples,
        checkpoint,
        device,
        config.method,
        config.target,
        config.batch_size,
        seed=config.seed,
    )

    written, rows, counters = [], [], {}
    for e in explanations:
        counters[e.true_label] = counters.get(e.true_label, 0) + 1
        path = output_dir / f"gradcam_{class_slug(e.true_label)}_{counters[e.true_label]}_{profile.gradcam_label}.png"
        render_explanation(e, config.method, profile.gradcam_label, path)
        written.append(path)
        rows.append(
            {
                "image": e.path,
                "true_label": label_name(e.true_label),
                "predicted_label": CLASS_NAMES[e.predicted],
                "probability_tuberculosis": round(e.prob_tb, 6),
                "threshold": round(e.threshold, 6),
                "correct": "" if e.true_label == UNLABELLED else not e.wrong,
                "cam_target": CLASS_NAMES[e.target],
                "road_score": round(e.road, 6),
                "file": path.name,
            }
        )

    if config.compare_checkpoint:
        other_checkpoint = load_checkpoint(config.compare_checkpoint)
        other_profile = profile_of(other_checkpoint)
        other_model = model_from_checkpoint(other_checkpoint)
        others = explain(
            other_model,
            other_model.layer4,
            samples,
            other_checkpoint,
            device,
            config.method,
            config.target,
            config.batch_size,
            seed=config.seed,
        )
        counters = {}
        for e, other in zip(explanations, others):
            counters[e.true_label] = counters.get(e.true_label, 0) + 1
            path = output_dir / f"gradcam_compare_{class_slug(e.true_label)}_{counters[e.true_label]}.png"
            render_comparison((e, other), (profile.gradcam_label, other_profile.gradcam_label), config.method, path)
            written.append(path)

    grid_path = output_dir / f"gradcam_summary_{profile.gradcam_label}.png"
    render_grid(explanations, config.method, f"{profile.gradcam_label}\n{provenance(checkpoint, manifest)}", grid_path)
    road = mean_road_per_class(explanations)
    summary = {
        "checkpoint": str(checkpoint_path),
        "method": config.method,
        "target": config.target,
        "label": profile.gradcam_label,
        "mean_road_per_class": road,
        "config": asdict(config),
    }
    csv_path = output_dir / f"gradcam_index_{profile.gradcam_label}.csv"
    json_path = output_dir / f"gradcam_index_{profile.gradcam_label}.json"
    write_index(rows, summary, csv_path, json_path)
    written += [grid_path, csv_path, json_path]

    print(
        "Faithfulness (ROAD combined, higher is better): "
        + ", ".join(f"{name} {score:+.4f}" for name, score in road.items())
    )
    wrong = sum(e.wrong for e in explanations)
    print(f"Wrote {len(written)} files to {output_dir}/ ({wrong} wrong predictions marked)")
    print(log_to_training_run(checkpoint, written))
    return {**summary, "files": [str(p) for p in written], "images": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
