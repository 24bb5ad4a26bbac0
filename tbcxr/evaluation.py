"""--test-only: score a checkpoint on held-out images and write its report (tbcxr.comparison: --compare).

Every metric is reported at the operating points stored in the checkpoint (log-odds thresholds) with a
95% interval: Wilson for proportions (sensitivity, specificity, accuracy, precision/PPV, NPV; as the site
table), Newcombe's for the AUC (right at 1.0), a seeded, stratified bootstrap for the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, write_json
from .errors import DataError
from .figures import save_evaluation_figures, training_curves_figure
from .layout import discover_dataset
from .metrics import (
    THRESHOLD_NAMES,
    WHO_TRIAGE_MIN_SPECIFICITY,
    WHO_TRIAGE_SENSITIVITY,
    bootstrap_metrics,
    class_counts,
    classification_metrics,
    expected_calibration_error,
    format_results,
    format_threshold,
    probability_of,
    proportion_counts,
    shown,
    with_intervals,
)
from .predict import left_out_listing, screened_scores, write_labelled_predictions
from .site import fit_site_thresholds, refuse_small_sample
from .split import held_out_samples, pixel_hashes
from .tracking import log_evaluation_run, metric_histories, resolve_tracking_uri

REPORT_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "auc",
    "average_precision",
)


@dataclass(frozen=True)
class Scoring:
    """How checkpoints are scored: where, in which batches, and how the intervals are drawn."""

    device: torch.device
    batch_size: int
    num_workers: int
    resamples: int
    seed: int


def predict_checkpoint(checkpoint: Checkpoint, samples, device, batch_size: int, num_workers: int, path=""):
    """Labels and calibrated log-odds of TB (float64) of every sample (screened_scores: the predictor, transform
    and screening rule that batch prediction and serving use); an error naming the files the screening rule
    leaves out, where every sample must be scored."""
    _, labels, scores, left_out = screened_scores(checkpoint, samples, device, batch_size, num_workers, path)
    if left_out:
        raise DataError(f"error: {len(left_out)} images cannot be scored: {left_out_listing(left_out)}")
    return labels, scores


def evaluation_report(labels, scores, thresholds: dict[str, float], resamples: int, seed: int) -> dict:
    """Every metric with a 95% interval at each stored log-odds threshold (Wilson for proportions, Newcombe
    for the AUC, bootstrap for the rest), plus the calibration of P(TB)."""
    from sklearn.metrics import brier_score_loss, confusion_matrix

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    report = {
        "n_images": int(len(labels)),
        "class_counts": class_counts(labels),
        "bootstrap_resamples": resamples,
        "intervals": "95%: Wilson (proportions), Newcombe 2006 method 5 (AUC), stratified percentile bootstrap (rest)",
        "thresholds": {},
    }
    draws = bootstrap_metrics(labels, scores, thresholds, resamples, seed)
    for name, threshold in thresholds.items():
        point = classification_metrics(labels, scores, threshold)
        called = (scores >= threshold).astype(int)
        report["thresholds"][name] = {
            "threshold_log_odds": threshold,
            "threshold_p_tb": float(probability_of(threshold)),
            "metrics": with_intervals(point, draws[name], proportion_counts(labels, called)),
            "confusion_matrix": confusion_matrix(labels, called, labels=[0, 1]).tolist(),
        }
    if "who_triage" in report["thresholds"]:
        report["who_triage"] = who_triage_verdict(report["thresholds"]["who_triage"]["metrics"])
    probs = probability_of(scores)
    report["calibration"] = {
        "brier_score": float(brier_score_loss(labels, probs)),
        "expected_calibration_error": expected_calibration_error(labels, probs),
    }
    return report


def who_triage_verdict(metrics: dict[str, dict]) -> dict:
    """Whether the WHO triage targets are met, judged on the lower 95% Wilson bounds (what the sample
    supports), with the point estimates beside them."""
    sensitivity, specificity = metrics["sensitivity"], metrics["specificity"]
    return {
        "sensitivity": sensitivity["value"],
        "sensitivity_ci_low": sensitivity["ci_low"],
        "specificity": specificity["value"],
        "specificity_ci_low": specificity["ci_low"],
        "meets_sensitivity_target": bool(sensitivity["ci_low"] >= WHO_TRIAGE_SENSITIVITY),
        "meets_minimum_specificity": bool(specificity["ci_low"] >= WHO_TRIAGE_MIN_SPECIFICITY),
        "judged_on": "lower bounds of the 95% Wilson intervals",
    }


def format_interval(entry: dict) -> str:
    """value [low, high] ("n/a" where undefined), "*" when the bootstrap behind it was degenerate."""
    degenerate = "*" if entry.get("method") == "bootstrap (degenerate)" else ""
    return f"{shown(entry['value'])} [{shown(entry['ci_low'])}, {shown(entry['ci_high'])}]{degenerate}"


def print_report(report: dict) -> None:
    names = list(report["thresholds"])
    for n in names:
        entry = report["thresholds"][n]
        print(f"{THRESHOLD_NAMES.get(n, n)}: TB when {format_threshold(entry['threshold_log_odds'])} is reached")
    print(f"{'metric (95% CI)':<20}" + "".join(f"{THRESHOLD_NAMES.get(n, n):<28}" for n in names))
    for metric in REPORT_METRICS:
        print(
            f"{metric:<20}"
            + "".join(f"{format_interval(report['thresholds'][n]['metrics'][metric]):<28}" for n in names)
        )
    print(f"Intervals {report['intervals']}; * a degenerate bootstrap (every resample gave one value)")
    if "who_triage" in report:
        who = report["who_triage"]
        print(
            f"WHO triage point: sensitivity {shown(who['sensitivity'])} (95% lower bound "
            f"{shown(who['sensitivity_ci_low'])}; target 0.90 met: {who['meets_sensitivity_target']}), specificity "
            f"{shown(who['specificity'])} (lower bound {shown(who['specificity_ci_low'])}; WHO minimum 0.70 met: "
            f"{who['meets_minimum_specificity']}), judged on the lower bounds"
        )
    calibration = report["calibration"]
    print(f"Calibration: Brier {calibration['brier_score']:.4f}, ECE {calibration['expected_calibration_error']:.4f}")


def report_metrics(report: dict) -> dict[str, float]:
    """The report as flat MLflow metrics; undefined (NaN) values and bounds are left out, never logged as 0."""
    flat = {}
    for name, entry in report["thresholds"].items():
        flat[f"{name}_threshold_log_odds"] = entry[
            "threshold_log_odds"
        ]  # every number beside the threshold that produced it
        flat[f"{name}_threshold_p_tb"] = entry["threshold_p_tb"]
        for metric, value in entry["metrics"].items():
            flat |= {
                f"{name}_{metric}": value["value"],
                f"{name}_{metric}_ci_low": value["ci_low"],
                f"{name}_{metric}_ci_high": value["ci_high"],
            }
    return {k: v for k, v in (flat | report["calibration"]).items() if np.isfinite(v)}


def score_checkpoint(checkpoint: Checkpoint, samples, scoring: Scoring, path: Path | str = ""):
    """Labels, log-odds and the full evaluation report of one checkpoint on labelled samples."""
    labels, scores = predict_checkpoint(
        checkpoint, samples, scoring.device, scoring.batch_size, scoring.num_workers, path
    )
    report = evaluation_report(labels, scores, checkpoint.state.thresholds, scoring.resamples, scoring.seed)
    return labels, scores, report | {"operating_points_chosen_on": checkpoint.operating_points_chosen_on}


def evaluation_prefix(checkpoint_path: Path, data_dir: str) -> Path:
    """Where an evaluation's files go: beside the checkpoint, named after it, the data folder's name and a
    digest of its full path, so that no run overwrites another checkpoint's, or another folder's of the
    same name. Without a data folder: the split's test side."""
    name = Path(data_dir).resolve().name if data_dir else "split_test"  # not "test": a folder may be named so
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8] if data_dir else "manifest"
    return checkpoint_path.parent / f"eval_{checkpoint_path.stem}_{name}_{digest}"


def score_screened_sample(checkpoint: Checkpoint, samples, scoring: Scoring, path: Path | str, source: str):
    """--test-only's scoring: the samples the screening rule lets through with their labels, log-odds and
    report; the ones it leaves out are listed in the report (path and reason) and counted on the console."""
    samples, labels, scores, left_out = screened_scores(
        checkpoint, samples, scoring.device, scoring.batch_size, scoring.num_workers, path
    )
    if left_out:
        print(f"Left out {len(left_out)} files that cannot be scored as a chest X-ray: {left_out_listing(left_out)}")
    if not samples:
        raise DataError(f"error: no image of {source} can be scored: {left_out_listing(left_out)}")
    report = evaluation_report(labels, scores, checkpoint.state.thresholds, scoring.resamples, scoring.seed)
    report["left_out"] = [{"path": image, "reason": reason} for image, reason in left_out.items()]
    report["operating_points_chosen_on"] = checkpoint.operating_points_chosen_on
    return samples, labels, scores, report


def run_test_only(
    checkpoint_path: Path, data_dir: str, scoring: Scoring, tracking_uri: str, *, site_prevalence: float | None = None
) -> dict:
    """--test-only: evaluate one checkpoint on one labelled folder, with intervals and figures. With a
    site_prevalence (--site-thresholds): also fit the site's own thresholds on it (tbcxr.site)."""
    checkpoint_path = Path(checkpoint_path)
    checkpoint = Checkpoint.load(checkpoint_path)
    data = discover_dataset(data_dir) if data_dir else None  # None: the split manifest's test side
    # A site's thresholds are never chosen on the split's test images: those stay for testing the refitted model.
    samples, source = held_out_samples(
        checkpoint_path, data, scoring.num_workers or 2, checkpoint=checkpoint, keep_test=site_prevalence is None
    )
    if site_prevalence is not None:
        refuse_small_sample([label for _, label in samples])  # before the slow part: scoring every image
    name = Path(data_dir).resolve().name if data_dir else "split_test"  # not "test": a folder may be named so
    print(f"Evaluating {checkpoint_path} on {len(samples)} images: {source}")
    samples, labels, scores, report = score_screened_sample(checkpoint, samples, scoring, checkpoint_path, source)
    if site_prevalence is not None and report["left_out"]:
        refuse_small_sample(labels.tolist())
    print(format_results("Test", classification_metrics(labels, scores)))
    report |= {
        "checkpoint": str(checkpoint_path),
        "data": source,
        "p_tb_calibration": asdict(checkpoint.state.calibration),  # scale and bias of the logit difference
        "training_run_id": checkpoint.mlflow_run_id,
    }
    print(f"Operating points chosen on {checkpoint.operating_points_chosen_on_text}")
    print_report(report)
    out = evaluation_prefix(checkpoint_path, data_dir)
    if site_prevalence is not None:
        sample = {"name": name, "folder": str(Path(data_dir).resolve()) if data_dir else "", "data": source}
        sample["pixel_sha1"] = sorted(pixel_hashes([path for path, _ in samples], scoring.num_workers or 2).values())
        report["site_thresholds"] = fit_site_thresholds(
            checkpoint, checkpoint_path, labels, scores, site_prevalence, out, sample
        )
    json_path = Path(f"{out}.json")
    write_json(report, json_path)
    paths = [json_path, *save_evaluation_figures(labels, scores, report, out, name)]
    # every image's score and decisions, so that each miss can be looked at
    paths.append(
        write_labelled_predictions(Path(f"{out}_predictions.csv"), samples, scores, checkpoint.state.thresholds)
    )
    paths += [Path(p) for p in report.get("site_thresholds", {}).get("files", [])]
    uri, run = checkpoint.tracking_uri, checkpoint.mlflow_run_id
    histories = metric_histories(uri, run, ("train_loss", "val_loss", "val_auc"))
    if histories is None:
        print(f"Training curves: MLflow run {run or '?'} not reachable at {uri or '?'}; skipped")
    else:
        paths.append(training_curves_figure(histories, Path(f"{out}_training_curves.png")))
    tracking_uri, _ = resolve_tracking_uri(tracking_uri, checkpoint.profile.port, recorded=uri)  # beside training
    run_id = log_evaluation_run(
        tracking_uri,
        checkpoint.experiment,
        f"eval-{name}",
        {"training_run_id": report["training_run_id"], "checkpoint": checkpoint_path, "data": source},
        report_metrics(report),
        paths,
    )
    print(f"Wrote {json_path} and {len(paths) - 1} figures and tables; MLflow evaluation run {run_id} ({tracking_uri})")
    return report
