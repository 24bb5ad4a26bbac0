"""Numbers about predictions: metrics, intervals, operating points, P(TB) and its calibration.

Tuberculosis is the positive class: sensitivity is TB recall, specificity Normal recall. Every decision,
ranking and operating point works on the calibrated log-odds s = scale x (logit_TB - logit_Normal) + bias
in float64 (an image is TB when s >= threshold); P(TB) = sigmoid(s) is reported beside it. A float32 P(TB)
is exactly 1.0 once s passes about 17, so on near-separable data it ties images the log-odds still rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import CLASS_NAMES, POSITIVE_CLASS

THRESHOLD_FREE_METRICS = ("auc", "average_precision")
WHO_TRIAGE_SENSITIVITY = 0.90  # WHO target product profile for a TB triage test
WHO_TRIAGE_MIN_SPECIFICITY = 0.70
THRESHOLD_NAMES = {"default": "0.5", "youden": "Youden's J", "who_triage": "WHO triage"}
DEFAULT_THRESHOLD = 0.0  # log-odds 0 is P(TB) 0.5
CONFIDENCE = 0.95
# Below this many validation images of a class, operating points and calibration rest on too few images to
# trust: at 20 TB images all called TB, the Wilson interval of the sensitivity is [0.84, 1.00].
MINIMUM_VALIDATION_PER_CLASS = 20


def threshold_metrics(labels, preds) -> dict[str, float]:
    """Metrics of hard predictions; TB is positive: sensitivity is TB recall, specificity Normal recall."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_recall_fscore_support

    # Undefined values (precision with nobody called TB, sensitivity without TB images) are NaN, never 0.
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=np.nan)
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)) if both_classes else float("nan"),
        "f1": float(f1[POSITIVE_CLASS]),
        "sensitivity": float(recall[POSITIVE_CLASS]),
        "specificity": float(recall[1 - POSITIVE_CLASS]),
        "precision": float(precision[POSITIVE_CLASS]),
        "npv": float(precision[1 - POSITIVE_CLASS]),
    }


def proportion_counts(labels, preds) -> dict[str, tuple[int, int]]:
    """{proportion: (successes, trials)} of accuracy, sensitivity, specificity, precision (PPV) and NPV."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    tb, called = labels == POSITIVE_CLASS, preds == POSITIVE_CLASS
    return {
        "accuracy": (int((tb == called).sum()), len(labels)),
        "sensitivity": (int((tb & called).sum()), int(tb.sum())),
        "specificity": (int((~tb & ~called).sum()), int((~tb).sum())),
        "precision": (int((tb & called).sum()), int(called.sum())),
        "npv": (int((~tb & ~called).sum()), int((~called).sum())),
    }


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion (right at 0 and 1, unlike the percentile bootstrap, which
    gives [1, 1] for 25/25); NaN for no trials (the proportion is undefined)."""
    from scipy.stats import binomtest

    if trials == 0:
        return float("nan"), float("nan")
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def hanley_mcneil_variance(auc: float, n_tb: int, n_normal: int, pooled: float | None = None) -> float:
    """Var(AUC) of Hanley & McNeil (1982, Radiology 143:29, table 2's formula), Q1 = A / (2 - A),
    Q2 = 2A^2 / (1 + A); with `pooled`, Newcombe's N* - 1 stands for both n_TB - 1 and n_Normal - 1."""
    tb_weight, normal_weight = (n_tb - 1, n_normal - 1) if pooled is None else (pooled, pooled)
    q1_excess = auc * (1 - auc) ** 2 / (2 - auc)  # Q1 - A^2
    q2_excess = auc**2 * (1 - auc) / (1 + auc)  # Q2 - A^2
    return (auc * (1 - auc) + tb_weight * q1_excess + normal_weight * q2_excess) / (n_tb * n_normal)


def auc_interval(auc: float, n_tb: int, n_normal: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's score-type interval for the AUC (Newcombe 2006, Stat Med 25:559, method 5): every theta
    with |theta - AUC| <= z sqrt(V(theta)), V Hanley & McNeil's variance at theta with n_TB - 1 and n_Normal - 1
    both replaced by N* - 1, N* = (n_TB + n_Normal) / 2. Evaluated at theta, not at the estimate, it is not
    [1, 1] at an AUC of 1, where DeLong's and the bootstrap's are. NaN without both classes."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if not (n_tb and n_normal and np.isfinite(auc)):
        return float("nan"), float("nan")
    z = norm.ppf(0.5 + confidence / 2)
    pooled = (n_tb + n_normal) / 2 - 1

    def excess(theta: float) -> float:
        return (theta - auc) ** 2 - z**2 * hanley_mcneil_variance(theta, n_tb, n_normal, pooled)

    # Inside the interval excess < 0; at an AUC of 0 or 1 the variance vanishes there too, so the search
    # starts a hair inside, where it is negative again.
    inner_low, inner_high = min(auc, 1 - 1e-9), max(auc, 1e-9)
    low = 0.0 if excess(0.0) <= 0 else brentq(excess, 0.0, inner_low)
    high = 1.0 if excess(1.0) <= 0 else brentq(excess, inner_high, 1.0)
    return float(low), float(high)


def ranking_metrics(labels, probs) -> dict[str, float]:
    """Threshold-free metrics: ROC AUC and average precision (NaN when one class is missing)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "average_precision": float("nan")}
    return {
        "auc": float(roc_auc_score(labels, probs)),
        "average_precision": float(average_precision_score(labels, probs)),
    }


def classification_metrics(labels, scores, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Metrics of the log-odds `scores` called TB at scores >= threshold (log-odds), and their ranking."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    return threshold_metrics(labels, (scores >= threshold).astype(int)) | ranking_metrics(labels, scores)


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


def with_intervals(
    point: dict[str, float],
    draws: list[dict],
    counts: dict[str, tuple[int, int]] | None = None,
    confidence: float = CONFIDENCE,
) -> dict[str, dict]:
    """{metric: {"value", "ci_low", "ci_high", "method"}}. Proportions with their `counts` get Wilson
    intervals (and "successes", "trials"), the AUC Newcombe's, the rest percentile intervals of the bootstrap
    draws; "bootstrap (degenerate)" where every draw gave one value."""
    counts = counts or {}
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, value in point.items():
        if name in counts:
            successes, trials = counts[name]
            low, high = wilson_interval(successes, trials, confidence)
            out[name] = {"value": value, "ci_low": low, "ci_high": high, "method": "wilson"}
            out[name] |= {"successes": successes, "trials": trials}
            continue
        if name == "auc" and "sensitivity" in counts:
            n_tb, n_normal = counts["sensitivity"][1], counts["specificity"][1]
            low, high = auc_interval(value, n_tb, n_normal, confidence)
            out[name] = {"value": value, "ci_low": low, "ci_high": high, "method": "newcombe"}
            continue
        drawn = np.asarray([d[name] for d in draws], dtype=float)
        finite = drawn[np.isfinite(drawn)]
        low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan)
        degenerate = finite.size > 0 and finite.min() == finite.max()
        method = "bootstrap (degenerate)" if degenerate else "bootstrap"
        out[name] = {"value": value, "ci_low": float(low), "ci_high": float(high), "method": method}
    return out


def select_thresholds(labels, scores) -> dict[str, float]:
    """Operating points (log-odds thresholds) chosen on validation scores: 0.5 (log-odds 0), Youden's J and the
    WHO triage point; an image is TB when its score >= the threshold.

    Both chosen points sit between two validation scores, not on one: Youden's J in the middle of the stretch
    of thresholds that maximise it, the WHO triage point midway between the TB score that brings sensitivity
    to 0.90 (the highest such threshold, the best specificity there) and the next lower score. On a threshold
    equal to a score, a one-ulp difference between cards or batch sizes flips that image.
    """
    from sklearn.metrics import roc_curve

    # drop_intermediate=False keeps every score: dropped collinear points can hide the exact 0.90 point.
    fpr, tpr, thresholds = roc_curve(labels, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    who = int(np.nonzero(tpr >= WHO_TRIAGE_SENSITIVITY)[0][0])
    return {
        "default": DEFAULT_THRESHOLD,
        "youden": youden_threshold(fpr, tpr, thresholds),
        "who_triage": between(thresholds, who),
    }


def between(thresholds: np.ndarray, first: int, last: int | None = None) -> float:
    """The middle of (thresholds[last + 1], thresholds[first]]: the thresholds that classify like roc_curve's
    points first..last (thresholds descending). Where a neighbour is missing (roc_curve's +inf above the top
    score, nothing below the lowest), the middle lies one log-odds unit beyond the extreme score."""
    last = first if last is None else last
    upper = thresholds[first] if np.isfinite(thresholds[first]) else thresholds[first + 1] + 2.0
    lower = thresholds[last + 1] if last + 1 < len(thresholds) else thresholds[last] - 2.0
    middle = (np.float64(upper) + np.float64(lower)) / 2
    return float(middle if middle > lower else np.nextafter(lower, np.inf))  # adjacent doubles: keep above lower


def youden_threshold(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> float:
    """The middle of the first stretch of thresholds that maximise J = sensitivity + specificity - 1.

    Threshold i of a descending roc_curve classifies like every t in (thresholds[i + 1], thresholds[i]],
    so a run of maximising points i_first..i_last covers (thresholds[i_last + 1], thresholds[i_first]].
    """
    youden = tpr - fpr
    first = last = int(np.argmax(youden))
    while last + 1 < len(youden) and np.isclose(youden[last + 1], youden[first]):
        last += 1
    return between(thresholds, first, last)


@dataclass(frozen=True)
class Calibration:
    """How P(TB) is read from the network's two logits: sigmoid(scale * d + bias), d = logit_TB - logit_Normal.
    The defaults are the identity: the network's own softmax."""

    scale: float = 1.0
    bias: float = 0.0


def tb_log_odds(logits: torch.Tensor, calibration: Calibration) -> np.ndarray:
    """The calibrated log-odds of TB of a batch of two-class logits, in float64: scale x d + bias,
    d = logit_TB - logit_Normal. What every decision, ranking and operating point uses."""
    logits = logits.detach().cpu().double()
    d = logits[:, POSITIVE_CLASS] - logits[:, 1 - POSITIVE_CLASS]
    return (calibration.scale * d + calibration.bias).numpy()


def probability_of(log_odds) -> np.ndarray:
    """P(TB) = sigmoid(log-odds), in float64 (1.0 only past log-odds of about 37)."""
    from scipy.special import expit

    return expit(np.asarray(log_odds, dtype=np.float64))


def log_odds_of(probability) -> np.ndarray:
    """The log-odds of a probability (P(TB) 0.5: 0; 1: +inf)."""
    from scipy.special import logit

    return logit(np.asarray(probability, dtype=np.float64))


def tb_probability(logits: torch.Tensor, calibration: Calibration) -> np.ndarray:
    """P(TB) of a batch of two-class logits under `calibration`: sigmoid(scale x d + bias), float64."""
    return probability_of(tb_log_odds(logits, calibration))


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


def shown(value: float, digits: int = 4) -> str:
    """A number for people: "n/a" where it is undefined (NaN), never 0."""
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def format_threshold(log_odds: float) -> str:
    """A log-odds threshold with its P(TB): the log-odds (what decides) in repr digits, so that no printed
    score equal to it can be on the other side; P(TB) to 6 significant digits beside it."""
    return f"log-odds {log_odds!r} (P(TB) {float(probability_of(log_odds)):.6g})"


def format_results(prefix: str, metrics: dict[str, float], operating_point: str = "") -> str:
    """One console line of metrics; `operating_point` names the threshold when it is not 0.5."""
    at = f" at {operating_point}" if operating_point else ""
    return (
        f"{prefix} Results{at} - Accuracy: {shown(metrics['accuracy'])}, F1: {shown(metrics['f1'])}, "
        f"Sensitivity: {shown(metrics['sensitivity'])}, Specificity: {shown(metrics['specificity'])}, "
        f"AUC: {shown(metrics['auc'])}"
    )


def class_counts(labels) -> dict[str, int]:
    """{class name: images} of a label array."""
    labels = np.asarray(labels)
    return {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}


def operating_points(val_results: dict, calibrate: bool) -> dict:
    """The calibration of the log-odds (Platt scaling when `calibrate`, else the identity), the log-odds
    thresholds under it, both chosen on the validation predictions, and the class counts they rest on."""
    labels, logits = val_results["labels"], val_results["logits"]
    calibration = fit_calibration(logits.numpy(), labels) if calibrate else Calibration()
    scores = tb_log_odds(logits, calibration)
    return {
        "calibration": calibration,
        "thresholds": select_thresholds(labels, scores),
        "validation_counts": class_counts(labels),
    }


def too_few_for_operating_points(counts: dict[str, int]) -> str:
    """Why operating points and calibration fitted on validation images of these class counts are unreliable
    ("" when every class has at least MINIMUM_VALIDATION_PER_CLASS)."""
    minimum = MINIMUM_VALIDATION_PER_CLASS
    short = {name: n for name, n in counts.items() if n < minimum}
    if not short:
        return ""
    found = " and ".join(f"{n} {name}" for name, n in short.items())
    return (
        f"validation holds only {found} image(s) (fewer than {minimum} of a class): the operating points and "
        "any calibration chosen on it rest on too few images to trust"
    )


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
