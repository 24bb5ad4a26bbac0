"""Numbers about predictions: metrics, bootstrap intervals, operating points, P(TB) and its calibration.

Tuberculosis is the positive class: sensitivity is TB recall, specificity Normal recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
    lower = np.float32(thresholds[last + 1] if last + 1 < len(thresholds) else 0.0)
    # Probabilities are float32 and are compared as such (torch, numpy 2) or upcast (the CSV): a float32
    # threshold decides alike in both. The middle can round down onto `lower` when the stretch is one float32
    # step wide, or be `lower` itself at the "nobody is TB" end (+inf clipped to 1.0) above scores of exactly
    # 1.0; p >= it would then call those scores TB. The next float32 above `lower` keeps J's point.
    middle = np.float32((np.float64(thresholds[first]) + np.float64(lower)) / 2)
    if middle <= lower:
        middle = np.nextafter(lower, np.float32(np.inf))
    return float(middle)


@dataclass(frozen=True)
class Calibration:
    """How P(TB) is read from the network's two logits: sigmoid(scale * d + bias), d = logit_TB - logit_Normal.
    The defaults are the identity: the network's own softmax."""

    scale: float = 1.0
    bias: float = 0.0


def tb_probability(logits: torch.Tensor, calibration: Calibration) -> torch.Tensor:
    """P(TB) of a batch of two-class logits under `calibration`. Computed as the softmax of
    (scale * logits + bias on the TB logit), which is sigmoid(scale * d + bias); the identity leaves every
    logit as it is, so it gives the softmax bit for bit."""
    shift = torch.zeros(logits.shape[1], device=logits.device)
    shift[POSITIVE_CLASS] = calibration.bias
    return (logits.float() * calibration.scale + shift).softmax(dim=1)[:, POSITIVE_CLASS]


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Platt scaling: the logistic regression of the labels on d = logit_TB - logit_Normal (validation's).

    A temperature only rescales d; the bias also removes an offset, such as the shift of the log-odds by
    about log(prevalence ratio) that 1:1 oversampled batches teach. Platt's targets, (N_TB + 1) / (N_TB + 2)
    for TB and 1 / (N_Normal + 2) for Normal instead of 1 and 0, keep the fit finite (and the scores ranked)
    when validation is separable, so no penalty is needed."""
    from sklearn.linear_model import LogisticRegression

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    d = logits[:, POSITIVE_CLASS] - logits[:, 1 - POSITIVE_CLASS]
    is_tb = labels == POSITIVE_CLASS
    target = np.where(is_tb, (is_tb.sum() + 1) / (is_tb.sum() + 2), 1 / ((~is_tb).sum() + 2))
    # Soft targets as weights: every image once as TB (weight target) and once as Normal (1 - target).
    both = np.concatenate([d, d])[:, None]
    as_tb = np.r_[np.ones(len(d)), np.zeros(len(d))]
    fitted = LogisticRegression(C=np.inf).fit(both, as_tb, sample_weight=np.r_[target, 1 - target])
    if fitted.coef_[0, 0] <= 0:
        # Validation ranks the classes the wrong way round (AUC <= 0.5): a negative scale would reverse every
        # score and report 1 - AUC as the model's. Keep the network's ranking: the identity.
        return Calibration()
    return Calibration(scale=float(fitted.coef_[0, 0]), bias=float(fitted.intercept_[0]))


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


def format_results(prefix: str, metrics: dict[str, float], operating_point: str = "") -> str:
    """One console line of metrics; `operating_point` names the threshold when it is not 0.5."""
    at = f" at {operating_point}" if operating_point else ""
    return (
        f"{prefix} Results{at} - Accuracy: {metrics['accuracy']:.4f}, F1: {metrics['f1']:.4f}, "
        f"Sensitivity: {metrics['sensitivity']:.4f}, Specificity: {metrics['specificity']:.4f}, "
        f"AUC: {metrics['auc']:.4f}"
    )


def operating_points(val_results: dict, calibrate: bool) -> dict:
    """The calibration of P(TB) (Platt scaling when `calibrate`, else the identity) and the thresholds on
    that P(TB), both chosen on the validation predictions."""
    labels, logits = val_results["labels"], val_results["logits"]
    calibration = fit_calibration(logits.numpy(), labels) if calibrate else Calibration()
    probs = tb_probability(logits, calibration).numpy()
    return {"calibration": calibration, "thresholds": select_thresholds(labels, probs)}


def scalar_metrics(results: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in results.items() if np.isscalar(v) and np.isfinite(v)}


def format_p_value(p_value: float, resamples: int, upper_bound: bool = False) -> str:
    """A two-sided bootstrap p-value as text. None of the resamples on the far side (an estimate of 0, or
    upper_bound) means p < 2 / resamples (the test's resolution), not p = 0; three decimals cannot show
    values below 0.001."""
    if upper_bound or p_value == 0:
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
