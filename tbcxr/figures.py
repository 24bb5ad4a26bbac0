"""Every plot of the project (except GradCAM's own panels), and the one helper that saves them.

matplotlib runs on the file-only Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import CLASS_NAMES, FULL_TRAINING, TRANSFER_LEARNING
from .metrics import THRESHOLD_NAMES


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure (closing frees its memory in long runs)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def save_test_figures(labels, scores, out_dir: Path) -> list[Path]:
    """Confusion matrix (P(TB) 0.5: log-odds 0) and ROC curve (of the log-odds `scores`) PNGs plus the sklearn
    classification report."""
    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, classification_report

    preds = (scores >= 0.0).astype(int)
    paths = [out_dir / "confusion_matrix.png", out_dir / "roc_curve.png", out_dir / "classification_report.txt"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(labels, preds, display_labels=CLASS_NAMES, ax=ax, colorbar=False)
    ax.set_title("Test confusion matrix (threshold 0.5)")
    save_figure(fig, paths[0], dpi=120)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if len(np.unique(labels)) == 2:
        RocCurveDisplay.from_predictions(labels, scores, ax=ax, name="ResNet50")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title("Test ROC curve (Tuberculosis positive)")
    save_figure(fig, paths[1], dpi=120)
    report = classification_report(labels, preds, labels=[0, 1], target_names=CLASS_NAMES, zero_division=np.nan)
    paths[2].write_text(report)
    return paths


def save_evaluation_figures(labels, scores, report: dict, prefix: Path, title: str) -> list[Path]:
    """ROC with the operating points, precision-recall, confusion matrices (of the log-odds `scores`, thresholds
    in log-odds), reliability diagram (of P(TB))."""
    plt = pyplot()
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    from .metrics import probability_of

    probs = probability_of(scores)
    paths = [Path(f"{prefix}_{kind}.png") for kind in ("roc", "pr", "confusion", "reliability")]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    RocCurveDisplay.from_predictions(labels, scores, ax=ax, name="ResNet50")
    for name, entry in report["thresholds"].items():
        metrics = entry["metrics"]
        ax.scatter(
            1 - metrics["specificity"]["value"],
            metrics["sensitivity"]["value"],
            zorder=3,
            label=f"{THRESHOLD_NAMES.get(name, name)} (log-odds {entry['threshold_log_odds']:.3f})",
        )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"ROC: {title}")
    figures = [fig]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    PrecisionRecallDisplay.from_predictions(labels, scores, ax=ax, name="ResNet50")
    ax.set_title(f"Precision-recall: {title}")
    figures.append(fig)
    fig, axes = plt.subplots(1, len(report["thresholds"]), figsize=(4 * len(report["thresholds"]), 3.8), squeeze=False)
    for ax, (name, entry) in zip(axes[0], report["thresholds"].items()):
        ConfusionMatrixDisplay.from_predictions(
            labels,
            (scores >= entry["threshold_log_odds"]).astype(int),
            labels=[0, 1],
            display_labels=CLASS_NAMES,
            ax=ax,
            colorbar=False,
        )
        ax.set_title(f"{THRESHOLD_NAMES.get(name, name)} (log-odds {entry['threshold_log_odds']:.3f})", fontsize=9)
    fig.suptitle(f"Confusion matrices: {title}")
    figures.append(fig)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    CalibrationDisplay.from_predictions(labels, probs, n_bins=10, ax=ax, name="ResNet50")
    ax.set_title(
        f"Reliability: Brier {report['calibration']['brier_score']:.3f}, "
        f"ECE {report['calibration']['expected_calibration_error']:.3f}"
    )
    figures.append(fig)
    return [save_figure(fig, path) for fig, path in zip(figures, paths)]


def training_curves_figure(histories: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Loss and validation AUC per epoch from (step, value) histories of train_loss, val_loss, val_auc."""
    plt = pyplot()
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    for key, ax in (("train_loss", loss_ax), ("val_loss", loss_ax), ("val_auc", auc_ax)):
        steps, values = zip(*histories[key]) if histories[key] else ((), ())
        ax.plot(steps, values, marker="o", label=key)
    for ax, name in ((loss_ax, "loss"), (auc_ax, "validation ROC AUC")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    save_figure(fig, path, dpi=110)
    return path


def gradcam_row(labels: list[str], checkpoints: list[Path], out: Path) -> Path | None:
    """Both models' GradCAM summary grids side by side, when both exist and their index says they were
    rendered from these very checkpoints (a grid of another run would mislead)."""
    folders = [
        Path(TRANSFER_LEARNING.gradcam_dir if label == TRANSFER_LEARNING.gradcam_label else FULL_TRAINING.gradcam_dir)
        for label in labels
    ]
    grids = [folder / f"gradcam_summary_{label}.png" for folder, label in zip(folders, labels)]
    indexes = [folder / f"gradcam_index_{label}.json" for folder, label in zip(folders, labels)]
    if not all(grid.is_file() and index.is_file() for grid, index in zip(grids, indexes)):
        return None
    rendered_from = [Path(json.loads(index.read_text())["checkpoint"]).resolve() for index in indexes]
    if rendered_from != [Path(c).resolve() for c in checkpoints]:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(16, 5))
    for ax, grid, label in zip(axes, grids, labels):
        ax.imshow(plt.imread(grid))
        ax.set_title(label)
        ax.axis("off")
    return save_figure(fig, out)


def comparison_roc_figure(labels, named_scores: dict[str, np.ndarray], p_value: str, path: Path) -> Path:
    """Both models' ROC curves (of their log-odds) on the same images, titled with the paired test's p-value."""
    plt = pyplot()
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, scores in named_scores.items():
        RocCurveDisplay.from_predictions(labels, scores, ax=ax, name=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(f"ROC on the same {len(labels)} images ({p_value})", fontsize=10)
    return save_figure(fig, path)


def site_threshold_figure(rows: list[dict], refitted: dict[str, float], path: Path, title: str) -> Path:
    """Sensitivity (red) and specificity (blue) against the threshold with their 95% bands, the WHO triage
    targets as dashed lines, and the operating points refitted on the site sample marked."""
    plt = pyplot()
    from .metrics import WHO_TRIAGE_MIN_SPECIFICITY, WHO_TRIAGE_SENSITIVITY

    thresholds = [row["threshold_log_odds"] for row in rows]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for metric, colour, target in (
        ("sensitivity", "tab:red", WHO_TRIAGE_SENSITIVITY),
        ("specificity", "tab:blue", WHO_TRIAGE_MIN_SPECIFICITY),
    ):
        values = [row[metric] for row in rows]
        ax.plot(thresholds, values, color=colour, marker=".", label=metric)
        low, high = [row[f"{metric}_ci_low"] for row in rows], [row[f"{metric}_ci_high"] for row in rows]
        ax.fill_between(thresholds, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.axhline(target, color=colour, linestyle="--", linewidth=0.9, label=f"WHO triage {metric} {target:.2f}")
    for (name, threshold), marker in zip(refitted.items(), ("o", "s", "D")):
        ax.axvline(threshold, color="0.3", linestyle=":", linewidth=0.9)
        row = next(row for row in rows if row["threshold_log_odds"] == threshold)
        ax.scatter([threshold] * 2, [row["sensitivity"], row["specificity"]], color="black", marker=marker,
                   zorder=3, label=f"site {THRESHOLD_NAMES.get(name, name)} (log-odds {threshold:.3f})")  # fmt: skip
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("log-odds threshold (positive when calibrated log-odds >= threshold)")
    ax.set_ylabel("proportion (95% Wilson band)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, never over them
    ax.set_title(f"Site thresholds: {title}", fontsize=10)
    return save_figure(fig, path)
