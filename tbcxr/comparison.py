"""--compare: two checkpoints scored on the same held-out images, a comparison.md report with figures.

Each checkpoint's metrics come with the intervals of tbcxr.evaluation; the AUC difference is tested with
a paired stratified bootstrap (the same resamples for both), which says so when it is degenerate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, read_json, write_json
from .config import FULL_TRAINING, SUMMARY_NAME
from .evaluation import REPORT_METRICS, Scoring, format_interval, score_checkpoint
from .figures import comparison_roc_figure, gradcam_row
from .layout import discover_dataset
from .metrics import THRESHOLD_FREE_METRICS, bootstrap_indices, format_p_value
from .split import held_out_samples, leave_out_site_sample, refuse_trained_on
from .tracking import log_evaluation_run, resolve_tracking_uri


def paired_auc_difference(labels, scores_a, scores_b, resamples: int, seed: int) -> dict[str, float]:
    """AUC(B) - AUC(A) on the same images (log-odds scores), with a paired stratified bootstrap CI and two-sided
    p-value (DeLong's test is in no maintained Python library we depend on). `degenerate`: every resample
    gave one difference (both AUCs 1.0 on every resample, say), so the interval says nothing."""
    from sklearn.metrics import roc_auc_score

    differences = np.asarray(
        [
            roc_auc_score(labels[i], scores_b[i]) - roc_auc_score(labels[i], scores_a[i])
            for i in bootstrap_indices(labels, resamples, seed)
        ]
    )
    low, high = np.percentile(differences, [2.5, 97.5])
    far_side = min((differences <= 0).mean(), (differences >= 0).mean())
    # No resample on the far side: the test can only say p < 2 / resamples, and that bound is what is stored.
    upper_bound = bool(far_side == 0)
    return {
        "difference": float(roc_auc_score(labels, scores_b) - roc_auc_score(labels, scores_a)),
        "degenerate": bool(differences.min() == differences.max()),
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
        where = "threshold-free" if metric in THRESHOLD_FREE_METRICS else "at P(TB) 0.5"
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
                        f"{format_interval(e['metrics']['sensitivity'])} / "
                        f"{format_interval(e['metrics']['specificity'])}"
                        f" (log-odds t={e['threshold_log_odds']:.4g})"
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
    # held_out_samples left out A's site sample; B's, if B is a site checkpoint, goes too: both score alike.
    samples = leave_out_site_sample(samples, checkpoints[1], scoring.num_workers or 2, source)
    labels_of = [c.profile.gradcam_label for c in checkpoints]
    names = [f"{label} ({path.name})" for label, path in zip(labels_of, paths)]
    print(f"Comparing {names[0]} and {names[1]} on {len(samples)} images: {source}")
    results = []
    for path, checkpoint in zip(paths, checkpoints):
        labels, scores, report = score_checkpoint(checkpoint, samples, scoring, path)
        results.append({"scores": scores, "report": report})
    auc_test = paired_auc_difference(
        labels, results[0]["scores"], results[1]["scores"], scoring.resamples, scoring.seed
    )
    p_value = format_p_value(auc_test["p_value"], scoring.resamples, auc_test["p_value_is_upper_bound"])
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        comparison_roc_figure(
            labels, {name: r["scores"] for name, r in zip(names, results)}, p_value, report_dir / "comparison_roc.png"
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
        f"[{auc_test['ci_low']:+.4f}, {auc_test['ci_high']:+.4f}], paired bootstrap {p_value}"
        + (
            " (degenerate: every resample gave the same difference, so this interval and p-value say nothing)"
            if auc_test["degenerate"]
            else ""
        ),
    ]
    lines = [
        f"# {'Transfer learning vs full training' if labels_of[0] != labels_of[1] else 'Comparison'}: "
        f"{names[0]} vs {names[1]}",
        "",
        f"Evaluated on the same {len(labels)} images ({source}); "
        f"95% intervals: Wilson for proportions, Newcombe's for the AUC, {scoring.resamples} stratified bootstrap "
        f"resamples (seed {scoring.seed}) for the rest and the AUC difference; n/a: undefined (precision with "
        "nobody called TB); * a degenerate bootstrap. Operating points chosen on "
        + "; ".join(c.operating_points_chosen_on_text for c in checkpoints)
        + ".",
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
            "auc_difference_bootstrap_degenerate": float(auc_test["degenerate"]),
        },
        [report_path, report_dir / "comparison.json", *figures],
    )
    print(f"Wrote {report_path}; MLflow run {run_id} ({tracking_uri})")
    return comparison
