"""--test-only and --compare: score checkpoints on held-out images and write reports.

Every metric is reported with a seeded, stratified 95% bootstrap interval at the operating
points stored in the checkpoint; a comparison scores both checkpoints on the same images and
tests the AUC difference with a paired bootstrap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, read_json, write_json
from .config import CLASS_NAMES, FULL_TRAINING, SUMMARY_NAME
from .errors import DataError
from .figures import comparison_roc_figure, gradcam_row, save_evaluation_figures, training_curves_figure
from .layout import discover_dataset
from .metrics import (
    THRESHOLD_FREE_METRICS,
    THRESHOLD_NAMES,
    WHO_TRIAGE_MIN_SPECIFICITY,
    WHO_TRIAGE_SENSITIVITY,
    bootstrap_indices,
    bootstrap_metrics,
    classification_metrics,
    expected_calibration_error,
    format_p_value,
    format_results,
    with_intervals,
)
from .predict import left_out_listing, screened_scores, write_labelled_predictions
from .site import fit_site_thresholds, refuse_small_sample
from .split import held_out_samples, refuse_trained_on
from .tracking import log_evaluation_run, metric_histories, resolve_tracking_uri

REPORT_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "precision",
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
    """Labels and (calibrated) TB probabilities of every sample (screened_scores); an error naming the files the
    screening rule leaves out, where every sample must be scored."""
    _, labels, probs, left_out = screened_scores(checkpoint, samples, device, batch_size, num_workers, path)
    if left_out:
        raise DataError(f"error: {len(left_out)} images cannot be scored: {left_out_listing(left_out)}")
    return labels, probs


def evaluation_report(labels, probs, thresholds: dict[str, float], resamples: int, seed: int) -> dict:
    """Every metric with a 95% bootstrap CI at each stored threshold, plus calibration."""
    from sklearn.metrics import brier_score_loss, confusion_matrix

    report = {
        "n_images": int(len(labels)),
        "class_counts": {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        "bootstrap_resamples": resamples,
        "thresholds": {},
    }
    draws = bootstrap_metrics(labels, probs, thresholds, resamples, seed)
    for name, threshold in thresholds.items():
        point = classification_metrics(labels, probs, threshold)
        matrix = confusion_matrix(labels, (probs >= threshold).astype(int), labels=[0, 1])
        report["thresholds"][name] = {
            "threshold": threshold,
            "metrics": with_intervals(point, draws[name]),
            "confusion_matrix": matrix.tolist(),
        }
    if "who_triage" in report["thresholds"]:
        metrics = report["thresholds"]["who_triage"]["metrics"]
        report["who_triage"] = {
            "sensitivity": metrics["sensitivity"]["value"],
            "specificity": metrics["specificity"]["value"],
            "meets_sensitivity_target": metrics["sensitivity"]["value"] >= WHO_TRIAGE_SENSITIVITY,
            "meets_minimum_specificity": metrics["specificity"]["value"] >= WHO_TRIAGE_MIN_SPECIFICITY,
        }
    report["calibration"] = {
        "brier_score": float(brier_score_loss(labels, probs)),
        "expected_calibration_error": expected_calibration_error(labels, probs),
    }
    return report


def format_interval(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def print_report(report: dict) -> None:
    names = list(report["thresholds"])
    print(
        f"{'metric (95% CI)':<20}"
        + "".join(
            f"{THRESHOLD_NAMES.get(n, n) + ' t=' + format(report['thresholds'][n]['threshold'], '.3f'):<28}"
            for n in names
        )
    )
    for metric in REPORT_METRICS:
        print(
            f"{metric:<20}"
            + "".join(f"{format_interval(report['thresholds'][n]['metrics'][metric]):<28}" for n in names)
        )
    if "who_triage" in report:
        who = report["who_triage"]
        print(
            f"WHO triage point: sensitivity {who['sensitivity']:.4f} "
            f"(target 0.90 met: {who['meets_sensitivity_target']}), "
            f"specificity {who['specificity']:.4f} (WHO minimum 0.70 met: {who['meets_minimum_specificity']})"
        )
    calibration = report["calibration"]
    print(f"Calibration: Brier {calibration['brier_score']:.4f}, ECE {calibration['expected_calibration_error']:.4f}")


def report_metrics(report: dict) -> dict[str, float]:
    flat = {}
    for name, entry in report["thresholds"].items():
        flat[f"{name}_threshold"] = entry["threshold"]  # every number beside the threshold that produced it
        for metric, value in entry["metrics"].items():
            flat |= {
                f"{name}_{metric}": value["value"],
                f"{name}_{metric}_ci_low": value["ci_low"],
                f"{name}_{metric}_ci_high": value["ci_high"],
            }
    return flat | report["calibration"]


def score_checkpoint(checkpoint: Checkpoint, samples, scoring: Scoring, path: Path | str = ""):
    """Labels, probabilities and the full evaluation report of one checkpoint on labelled samples."""
    labels, probs = predict_checkpoint(
        checkpoint, samples, scoring.device, scoring.batch_size, scoring.num_workers, path
    )
    return labels, probs, evaluation_report(labels, probs, checkpoint.state.thresholds, scoring.resamples, scoring.seed)


def score_screened_sample(checkpoint: Checkpoint, samples, scoring: Scoring, path: Path | str, source: str):
    """--test-only's scoring: the samples the screening rule lets through with their labels, probabilities and
    report; the ones it leaves out are listed in the report (path and reason) and counted on the console."""
    samples, labels, probs, left_out = screened_scores(
        checkpoint, samples, scoring.device, scoring.batch_size, scoring.num_workers, path
    )
    if left_out:
        print(f"Left out {len(left_out)} files that cannot be scored as a chest X-ray: {left_out_listing(left_out)}")
    if not samples:
        raise DataError(f"error: no image of {source} can be scored: {left_out_listing(left_out)}")
    report = evaluation_report(labels, probs, checkpoint.state.thresholds, scoring.resamples, scoring.seed)
    report["left_out"] = [{"path": image, "reason": reason} for image, reason in left_out.items()]
    return samples, labels, probs, report


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
    samples, labels, probs, report = score_screened_sample(checkpoint, samples, scoring, checkpoint_path, source)
    if site_prevalence is not None and report["left_out"]:
        refuse_small_sample(labels.tolist())
    print(format_results("Test", classification_metrics(labels, probs)))
    report |= {
        "checkpoint": str(checkpoint_path),
        "data": source,
        "p_tb_calibration": asdict(checkpoint.state.calibration),  # scale and bias of the logit difference
        "training_run_id": checkpoint.mlflow_run_id,
    }
    print_report(report)
    out = checkpoint_path.parent / f"eval_{name}"
    if site_prevalence is not None:
        sample = {"name": name, "folder": str(Path(data_dir).resolve()) if data_dir else "", "data": source}
        report["site_thresholds"] = fit_site_thresholds(
            checkpoint, checkpoint_path, labels, probs, site_prevalence, out, sample
        )
    json_path = Path(f"{out}.json")
    write_json(report, json_path)
    paths = [json_path, *save_evaluation_figures(labels, probs, report, out, name)]
    # every image's score and decisions, so that each miss can be looked at
    paths.append(
        write_labelled_predictions(Path(f"{out}_predictions.csv"), samples, probs, checkpoint.state.thresholds)
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


def paired_auc_difference(labels, probs_a, probs_b, resamples: int, seed: int) -> dict[str, float]:
    """AUC(B) - AUC(A) on the same images, with a paired stratified bootstrap CI and two-sided p-value
    (DeLong's test is in no maintained Python library we depend on)."""
    from sklearn.metrics import roc_auc_score

    differences = np.asarray(
        [
            roc_auc_score(labels[i], probs_b[i]) - roc_auc_score(labels[i], probs_a[i])
            for i in bootstrap_indices(labels, resamples, seed)
        ]
    )
    low, high = np.percentile(differences, [2.5, 97.5])
    far_side = min((differences <= 0).mean(), (differences >= 0).mean())
    # No resample on the far side: the test can only say p < 2 / resamples, and that bound is what is stored.
    upper_bound = bool(far_side == 0)
    return {
        "difference": float(roc_auc_score(labels, probs_b) - roc_auc_score(labels, probs_a)),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": 2 / resamples if upper_bound else float(min(1.0, 2 * far_side)),
        "p_value_is_upper_bound": upper_bound,
    }


def training_facts(checkpoint_path: Path, checkpoint: Checkpoint) -> dict:
    """Time, epochs and memory of the whole training run (summary.json beside it, when present)."""
    summary_path = checkpoint_path.parent / SUMMARY_NAME
    summary = read_json(summary_path) if summary_path.is_file() else {}
    state = checkpoint.state
    return {
        "trainable_parameters": checkpoint.trainable_parameters,
        "train_seconds": summary.get("train_seconds", state.train_seconds),
        "epochs_trained": summary.get("epochs_trained", state.epoch),
        "best_epoch": state.best_epoch,
        "peak_memory_mb": summary.get("peak_memory_mb", state.peak_memory_mb),
    }


def comparison_rows(results: list[dict], facts: list[dict]) -> list[tuple[str, list[str]]]:
    """The comparison table: what each training cost, then every metric with its interval."""
    rows = [
        ("Trainable parameters", [f"{f['trainable_parameters']:,}" for f in facts]),
        ("Training time (wall clock)", [f"{f['train_seconds']:.1f} s" for f in facts]),
        ("Epochs to best (of trained)", [f"{f['best_epoch']} of {f['epochs_trained']}" for f in facts]),
        ("Peak memory (GPU allocated on CUDA, else process RSS)", [f"{f['peak_memory_mb']:.0f} MB" for f in facts]),
    ]
    for metric in REPORT_METRICS:
        where = "threshold-free" if metric in THRESHOLD_FREE_METRICS else "at 0.5"
        rows.append(
            (
                f"{metric} {where} (95% CI)",
                [format_interval(r["report"]["thresholds"]["default"]["metrics"][metric]) for r in results],
            )
        )
    for title, threshold in (("Youden's J", "youden"), ("WHO triage", "who_triage")):
        if all(threshold in r["report"]["thresholds"] for r in results):
            entries = [r["report"]["thresholds"][threshold] for r in results]
            rows.append(
                (
                    f"sensitivity / specificity at {title} (validation-chosen t)",
                    [
                        f"{e['metrics']['sensitivity']['value']:.4f} / {e['metrics']['specificity']['value']:.4f} "
                        f"(t={e['threshold']:.3f})"
                        for e in entries
                    ],
                )
            )
    rows.append(
        (
            "Brier score / ECE",
            [
                f"{r['report']['calibration']['brier_score']:.4f} / "
                f"{r['report']['calibration']['expected_calibration_error']:.4f}"
                for r in results
            ],
        )
    )
    return rows


def compare_checkpoints(
    paths: list[Path], data_dir: str, scoring: Scoring, tracking_uri: str, report_dir: Path = Path("reports")
) -> dict:
    """--compare A B: both checkpoints on the same images; comparison.md plus figures in report_dir."""
    paths = [Path(p) for p in paths]
    checkpoints = [Checkpoint.load(p) for p in paths]
    data = discover_dataset(data_dir) if data_dir else None  # None: the split manifest's test side
    samples, source = held_out_samples(paths[0], data, scoring.num_workers or 2, checkpoint=checkpoints[0])
    refuse_trained_on(samples, paths[1], scoring.num_workers or 2, checkpoint=checkpoints[1])
    labels_of = [c.profile.gradcam_label for c in checkpoints]
    names = [f"{label} ({path.name})" for label, path in zip(labels_of, paths)]
    print(f"Comparing {names[0]} and {names[1]} on {len(samples)} images: {source}")
    results = []
    for path, checkpoint in zip(paths, checkpoints):
        labels, probs, report = score_checkpoint(checkpoint, samples, scoring, path)
        results.append({"probs": probs, "report": report})
    auc_test = paired_auc_difference(labels, results[0]["probs"], results[1]["probs"], scoring.resamples, scoring.seed)
    p_value = format_p_value(auc_test["p_value"], scoring.resamples, auc_test["p_value_is_upper_bound"])
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        comparison_roc_figure(
            labels, {name: r["probs"] for name, r in zip(names, results)}, p_value, report_dir / "comparison_roc.png"
        )
    ]
    cams = gradcam_row(labels_of, paths, report_dir / "comparison_gradcam.png")
    figures += [cams] if cams else []

    facts = [training_facts(p, c) for p, c in zip(paths, checkpoints)]
    table = [f"| Aspect | {names[0]} | {names[1]} |", "|---|---|---|"]
    table += [f"| {aspect} | {a} | {b} |" for aspect, (a, b) in comparison_rows(results, facts)]
    table += [
        "",
        f"ROC AUC difference (B - A): {auc_test['difference']:+.4f} "
        f"[{auc_test['ci_low']:+.4f}, {auc_test['ci_high']:+.4f}], paired bootstrap {p_value}",
    ]
    lines = [
        f"# {'Transfer learning vs full training' if labels_of[0] != labels_of[1] else 'Comparison'}: "
        f"{names[0]} vs {names[1]}",
        "",
        f"Evaluated on the same {len(labels)} images ({source}); "
        f"{scoring.resamples} stratified bootstrap resamples, seed {scoring.seed}.",
        "",
        *table,
        "",
        "![ROC curves](comparison_roc.png)",
    ]
    if cams:
        lines += ["", "![GradCAM summaries side by side](comparison_gradcam.png)"]
    report_path = report_dir / "comparison.md"
    report_path.write_text("\n".join(lines) + "\n")
    print("\n".join(table))
    comparison = {
        "checkpoints": [str(p) for p in paths],
        "data": source,
        "auc_difference": auc_test,
        "reports": [r["report"] for r in results],
        "training": facts,
    }
    write_json(comparison, report_dir / "comparison.json")
    tracking_uri, _ = resolve_tracking_uri(tracking_uri, FULL_TRAINING.port)
    run_id = log_evaluation_run(
        tracking_uri,
        "ResNet50_TB_Comparison",
        "comparison",
        {"run_a": checkpoints[0].mlflow_run_id, "run_b": checkpoints[1].mlflow_run_id},
        {
            "auc_difference": auc_test["difference"],
            "auc_difference_p_value": auc_test["p_value"],
            "auc_difference_p_value_is_upper_bound": float(auc_test["p_value_is_upper_bound"]),
        },
        [report_path, report_dir / "comparison.json", *figures],
    )
    print(f"Wrote {report_path}; MLflow run {run_id} ({tracking_uri})")
    return comparison
