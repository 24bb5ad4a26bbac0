"""Numbers about predictions: metrics, bootstrap intervals, operating points, temperature, calibration.

Tuberculosis is the positive class: sensitivity is TB recall, specificity Normal recall.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import POSITIVE_CLASS

THRESHOLD_FREE_METRICS = ("auc", "average_precision")
WHO_TRIAGE_SENSITIVITY = 0.90  # WHO target product profile for a TB triage test
WHO_TRIAGE_MIN_SPECIFICITY = 0.70
THRESHOLD_NAMES = {"default": "0.5", "youden": "Youden's J", "who_triage": "WHO triage"}


def threshold_metrics(labels, preds) -> dict[str, float]:
    """Metrics of hard predictions; TB is positive: sensitivity is TB recall, specificity Normal recall."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=0)
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)) if both_classes else float("nan"),
        "f1": float(f1[POSITIVE_CLASS]),
        "sensitivity": float(recall[POSITIVE_CLASS]),
        "specificity": float(recall[1 - POSITIVE_CLASS]),
        "precision": float(precision[POSITIVE_CLASS]),
    }


def ranking_metrics(labels, probs) -> dict[str, float]:
    """Threshold-free metrics: ROC AUC and average precision (NaN when one class is missing)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "average_precision": float("nan")}
    return {
        "auc": float(roc_auc_score(labels, probs)),
        "average_precision": float(average_precision_score(labels, probs)),
    }


def classification_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    labels, probs = np.asarray(labels), np.asarray(probs)
    return threshold_metrics(labels, (probs >= threshold).astype(int)) | ranking_metrics(labels, probs)


def bootstrap_indices(labels, resamples: int, seed: int):
    """Seeded, class-stratified bootstrap resamples of range(len(labels)); the same seed gives the
    same resamples, so two models scored on the same images are paired."""
    from sklearn.utils import resample

    rng = np.random.RandomState(seed)
    index = np.arange(len(labels))
    for _ in range(resamples):
        yield resample(index, stratify=labels, random_state=rng)


def bootstrap_metrics(
    labels, probs, thresholds: dict[str, float], resamples: int = 1000, seed: int = 0
) -> dict[str, list[dict]]:
    """classification_metrics at each threshold on the same seeded, class-stratified resamples."""
    import sklearn

    labels, probs = np.asarray(labels), np.asarray(probs)
    draws = {name: [] for name in thresholds}
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):  # inputs checked once above
        for i in bootstrap_indices(labels, resamples, seed):
            ranking = ranking_metrics(labels[i], probs[i])
            for name, threshold in thresholds.items():
                draws[name].append(threshold_metrics(labels[i], (probs[i] >= threshold).astype(int)) | ranking)
    return draws


def with_intervals(point: dict[str, float], draws: list[dict], confidence: float = 0.95) -> dict[str, dict]:
    """{metric: {"value", "ci_low", "ci_high"}}: percentile intervals of the bootstrap draws."""
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, value in point.items():
        low, high = np.nanpercentile([d[name] for d in draws], [tail, 100 - tail])
        out[name] = {"value": value, "ci_low": float(low), "ci_high": float(high)}
    return out


def select_thresholds(labels, probs) -> dict[str, float]:
    """Operating points chosen on validation data: 0.5, Youden's J, and the WHO triage point.

    Youden's J is maximal on a stretch of thresholds, not at one score; its first maximum in
    roc_curve is a TB score itself (zero margin: on a separable set, the lowest TB score). Take the
    middle of the stretch instead. The WHO triage point is the highest threshold whose sensitivity
    reaches 0.90 (the best specificity there), searched over every point of the curve.
    """
    from sklearn.metrics import roc_curve

    # drop_intermediate=False keeps every score: dropped collinear points can hide the exact 0.90 point.
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve's first threshold is +inf
    who = int(np.nonzero(tpr >= WHO_TRIAGE_SENSITIVITY)[0][0])
    return {"default": 0.5, "youden": youden_threshold(fpr, tpr, thresholds), "who_triage": float(thresholds[who])}


def youden_threshold(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> float:
    """The middle of the first stretch of thresholds that maximise J = sensitivity + specificity - 1.

    Threshold i of a descending roc_curve classifies like every t in (thresholds[i + 1], thresholds[i]],
    so a run of maximising points i_first..i_last covers (thresholds[i_last + 1], thresholds[i_first]].
    """
    youden = tpr - fpr
    first = last = int(np.argmax(youden))
    while last + 1 < len(youden) and np.isclose(youden[last + 1], youden[first]):
        last += 1
    lower = thresholds[last + 1] if last + 1 < len(thresholds) else 0.0
    return float((thresholds[first] + lower) / 2)


def operating_threshold(checkpoint: dict) -> float:
    """The threshold predictions use: Youden's J from validation when stored, else 0.5."""
    return float(checkpoint.get("thresholds", {}).get("youden", 0.5))


def tb_probability(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.float() / temperature).softmax(dim=1)[:, POSITIVE_CLASS]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising validation NLL of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    logits_t, labels_t = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)

    def nll(temperature: float) -> float:
        return float(nn.functional.cross_entropy(logits_t / temperature, labels_t))

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def expected_calibration_error(labels, probs, bins: int = 10) -> float:
    """ECE over equal-width bins of the TB probability (no library function exists for it)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(labels[which == b].mean() - probs[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )


def format_results(prefix: str, metrics: dict[str, float]) -> str:
    return (
        f"{prefix} Results - Accuracy: {metrics['accuracy']:.4f}, F1: {metrics['f1']:.4f}, "
        f"Sensitivity: {metrics['sensitivity']:.4f}, Specificity: {metrics['specificity']:.4f}, "
        f"AUC: {metrics['auc']:.4f}"
    )


def operating_points(val_results: dict, temperature_scaling: bool) -> dict:
    """Temperature (optional) and thresholds chosen on the validation predictions."""
    labels, logits = val_results["labels"], val_results["logits"]
    temperature = fit_temperature(logits.numpy(), labels) if temperature_scaling else 1.0
    probs = tb_probability(logits, temperature).numpy()
    return {"temperature": temperature, "thresholds": select_thresholds(labels, probs)}


def scalar_metrics(results: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in results.items() if np.isscalar(v) and np.isfinite(v)}


def format_p_value(p_value: float, resamples: int) -> str:
    """A two-sided bootstrap p-value as text. None of the resamples on the far side means p < 2 / resamples
    (the test's resolution), not p = 0; three decimals cannot show values below 0.001."""
    if p_value == 0:
        return f"p < {2 / resamples:.2g}"
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


SELECTION_WINDOWS = {"auc": 1, "auc3": 3, "last": 0}  # --selection: epochs averaged; 0: the latest epoch wins


def selection_score(history: list[dict], window: int) -> list[float]:
    """[validation AUC, -validation loss] of the last epoch, each averaged over the last `window` epochs:
    on a validation set of a few dozen images one epoch's AUC is noisy, a running mean less so. Until a
    window is full the score is -inf, so that an early epoch cannot win on one noisy value. Window 0 scores
    the epoch itself, so that the latest epoch always wins."""
    if window == 0:
        return [float(len(history)), 0.0]
    if len(history) < window:
        return [-float("inf"), -float("inf")]
    recent = history[-window:]
    auc = np.mean([h["val_auc"] if np.isfinite(h.get("val_auc", np.nan)) else 0.0 for h in recent])
    return [float(auc), -float(np.mean([h["val_loss"] for h in recent]))]
