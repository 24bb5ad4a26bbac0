"""--test-only and --compare: score checkpoints on held-out images and write reports.

Every metric is reported with a seeded, stratified 95% bootstrap interval at the operating
points stored in the checkpoint; a comparison scores both checkpoints on the same images and
tests the AUC difference with a paired bootstrap.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint, read_json, write_json
from .config import CLASS_NAMES, FULL_TRAINING, MANIFEST_NAME, SUMMARY_NAME, profile_of
from .data import XrayDataset, checkpoint_transform, discover_dataset, manifest_samples, split_digest
from .data_quality import near_pairs, scan_images
from .figures import comparison_roc_figure, gradcam_row, save_evaluation_figures, training_curves_figure
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
    tb_probability,
    with_intervals,
)
from .model import predict_logits
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


NEAR_DUPLICATE_BITS = 10  # the training-time leak check's threshold (data_quality.find_leaks)
TRAINED_ON = ("training", "validation")  # sides whose images a checkpoint has seen


def recorded_sides(manifest: dict) -> dict[str, str]:
    """Relative path -> the side its image belongs to: training, validation, test, or removed
    (an image the split left out as a duplicate of a training image)."""
    sides = {rel: "removed" for rel in manifest.get("content_sha1", {})}
    for side, name in (("test", "test"), ("val", "validation"), ("train", "training")):
        sides |= {rel: name for rel, _ in manifest[side]}
    return sides


def leave_out_known(samples, manifest: dict, workers: int) -> tuple[list, dict[str, int]]:
    """The samples that are neither exact nor near (perceptual hash within NEAR_DUPLICATE_BITS) copies of the
    checkpoint's training, validation or split-removed images, and the count left out per reason."""
    scan = scan_images([path for path, _ in samples], workers=workers)
    sides = recorded_sides(manifest)
    known = [rel for rel, side in sides.items() if side != "test"]
    exact = {manifest["content_sha1"][rel]: sides[rel] for rel in known}
    reasons = {path: "unreadable" for path in scan.unreadable}
    reasons |= {path: f"copies of its {exact[sha1]} images" for path, sha1 in scan.pixel_hash.items() if sha1 in exact}
    # The manifest's own test images stay, near copies and all: that was the split's (--dedup) decision.
    own_test = {manifest["content_sha1"][rel] for rel, side in sides.items() if side == "test"}
    readable = [path for path, _ in samples if path not in reasons and scan.pixel_hash[path] not in own_test]
    if readable and known and "content_phash" in manifest:
        known_words = np.ascontiguousarray(
            np.frombuffer(bytes.fromhex("".join(manifest["content_phash"][rel] for rel in known)), dtype=np.uint8)
            .reshape(-1, 32).view(np.uint64).T
        )  # fmt: skip
        rows, columns, _ = near_pairs(scan.hash_words(readable), known_words, NEAR_DUPLICATE_BITS)
        reasons |= {readable[i]: f"near copies of its {sides[known[j]]} images" for i, j in zip(rows, columns)}
    return split_by_reason(samples, reasons)


def split_by_reason(samples, reasons: dict[str, str]) -> tuple[list, dict[str, int]]:
    """The samples without a reason to leave them out, and how many were left out per reason."""
    left_out = Counter(reasons[path] for path, _ in samples if path in reasons)
    return [(path, label) for path, label in samples if path not in reasons], dict(left_out)


def leave_out_by_path(samples, root: Path, manifest: dict) -> tuple[list, dict[str, int]]:
    """For manifests written before image content was recorded: recognise the checkpoint's images by their
    path relative to the data folder (right for a moved copy of that folder, blind to copies elsewhere)."""
    sides = {rel: name for side, name in (("val", "validation"), ("train", "training")) for rel, _ in manifest[side]}
    relative = {path: Path(os.path.relpath(path, root)).as_posix() for path, _ in samples}
    reasons = {path: f"in its {sides[rel]} images (by path)" for path, rel in relative.items() if rel in sides}
    return split_by_reason(samples, reasons)


def manifest_beside(checkpoint_path: Path, checkpoint: dict | None = None, required: bool = False) -> dict | None:
    """The split manifest in a checkpoint's folder (None if there is none; an error if `required`), refused
    when it is not the split the checkpoint was trained on (another run or --prepare-only replaced it)."""
    path = Path(checkpoint_path).parent / MANIFEST_NAME
    if not path.is_file():
        if required:
            raise SystemExit(
                f"error: no {MANIFEST_NAME} in {path.parent}, so the split the checkpoint was trained on is unknown: "
                "pass --checkpoint-dir with the folder that holds the checkpoint and its split manifest"
            )
        return None
    manifest = read_json(path)
    if checkpoint is None:
        checkpoint = load_checkpoint(checkpoint_path)
    recorded = checkpoint.get("split_digest")
    if recorded is not None and recorded != split_digest(manifest):
        raise SystemExit(
            f"error: {path} is not the split {checkpoint_path} was trained on: a later run or --prepare-only "
            "in the same --checkpoint-dir replaced it, so its test images are unknown"
        )
    return manifest


def held_out_samples(
    checkpoint_path: Path, data_dir: str = "", workers: int = 2, *, checkpoint: dict | None = None
) -> tuple[list, str]:
    """The labelled images to test a checkpoint on, and where they come from.

    Without DIR: the test side of the split manifest beside the checkpoint. With DIR: its test/
    side (organized layout) or all of it (raw layout: the folder the checkpoint was trained on, or
    another hospital's), minus every exact or near copy of an image the manifest records as training,
    validation or split-removed content. Content, not paths: a moved or copied folder is still
    recognised. The console says how many images were left out and why. Pass the loaded checkpoint
    when you hold it: it is read from disk otherwise."""
    manifest_path = Path(checkpoint_path).parent / MANIFEST_NAME
    manifest = manifest_beside(checkpoint_path, checkpoint)
    if not data_dir:
        if manifest is None:
            raise SystemExit(
                f"error: no {MANIFEST_NAME} beside {checkpoint_path}; pass --data-dir with a "
                "train/test layout or a labelled Normal/Tuberculosis folder"
            )
        if not Path(manifest["data_dir"]).is_dir():
            raise SystemExit(
                f"error: the data folder {manifest['data_dir']} that {manifest_path} lists is gone; pass --data-dir "
                "with where it is now (its training and validation images are still left out)"
            )
        return manifest_samples(manifest, "test"), f"test side of {manifest_path}"
    data = discover_dataset(data_dir)
    candidates, source = (data.test, f"test/ side of {data.root}") if data.test else (data.train, f"all of {data.root}")
    if manifest is None:
        print(f"WARNING: no {MANIFEST_NAME} beside {checkpoint_path}: {source} cannot be checked against the "
              "checkpoint's training images; all of it is scored", file=sys.stderr)  # fmt: skip
        return candidates, source + " (not checked against training images: no split manifest)"
    if "content_sha1" in manifest:
        samples, left_out = leave_out_known(candidates, manifest, workers)
    else:
        print(f"WARNING: {manifest_path} predates image content records: training images are recognised by "
              "their path in the data folder only", file=sys.stderr)  # fmt: skip
        samples, left_out = leave_out_by_path(candidates, data.root, manifest)
    if left_out:
        reasons = ", ".join(f"{count} {reason}" for reason, count in left_out.items())
        print(f"Left out {sum(left_out.values())} of {len(candidates)} images of {source}: {reasons}")
        source += f" less {sum(left_out.values())} images the checkpoint trained on, validated on or could not read"
    elif data.test is None:
        source += " (external test set: no exact or near copy of the checkpoint's training or validation images)"
    if not samples:
        raise SystemExit(
            f"error: every image of {source} is one the checkpoint trained or validated on, or "
            "cannot be read: nothing is left to test on"
        )
    return samples, source


def refuse_trained_on(samples, checkpoint_path: Path, workers: int, *, checkpoint: dict) -> None:
    """--compare: stop when the second checkpoint trained or validated on any of the evaluated images."""
    manifest = manifest_beside(checkpoint_path, checkpoint) or {}
    if "content_sha1" not in manifest:
        raise SystemExit(
            f"error: {checkpoint_path} has no split manifest recording image content beside it, so "
            "its training images cannot be told apart from the evaluated ones; refusing to compare"
        )
    _, left_out = leave_out_known(samples, manifest, workers)
    overlap = {reason: n for reason, n in left_out.items() if any(side in reason for side in TRAINED_ON)}
    if overlap:
        reasons = ", ".join(f"{count} {reason}" for reason, count in overlap.items())
        raise SystemExit(
            f"error: {checkpoint_path} was trained on a different split: of the {len(samples)} evaluated images, "
            f"{reasons}. A paired test on them would favour it. Compare on images neither model saw: pass "
            "--data-dir with an external labelled folder"
        )


def predict_checkpoint(checkpoint: dict, samples, device, batch_size: int, num_workers: int):
    """Labels and (temperature-scaled) TB probabilities of a checkpoint on labelled samples."""
    model = model_from_checkpoint(checkpoint).to(device)
    transform = checkpoint_transform(checkpoint)
    loader = torch.utils.data.DataLoader(
        XrayDataset(samples, transform), batch_size=batch_size, num_workers=num_workers
    )
    labels, logits, _ = predict_logits(model, loader, device)
    return labels, tb_probability(logits, checkpoint.get("temperature", 1.0)).numpy()


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


def score_checkpoint(checkpoint: dict, samples, scoring: Scoring):
    """Labels, probabilities and the full evaluation report of one checkpoint on labelled samples."""
    labels, probs = predict_checkpoint(checkpoint, samples, scoring.device, scoring.batch_size, scoring.num_workers)
    thresholds = {"default": 0.5, **checkpoint.get("thresholds", {})}
    return labels, probs, evaluation_report(labels, probs, thresholds, scoring.resamples, scoring.seed)


def run_test_only(checkpoint_path: Path, data_dir: str, scoring: Scoring, tracking_uri: str) -> dict:
    """--test-only: evaluate one checkpoint on one labelled folder, with intervals and figures."""
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    samples, source = held_out_samples(checkpoint_path, data_dir, scoring.num_workers or 2, checkpoint=checkpoint)
    name = Path(data_dir).resolve().name if data_dir else "split_test"  # not "test": a folder may be named so
    print(f"Evaluating {checkpoint_path} on {len(samples)} images: {source}")
    labels, probs, report = score_checkpoint(checkpoint, samples, scoring)
    print(format_results("Test", classification_metrics(labels, probs)))
    report |= {
        "checkpoint": str(checkpoint_path),
        "data": source,
        "temperature": checkpoint.get("temperature", 1.0),
        "training_run_id": checkpoint.get("mlflow_run_id", ""),
    }
    print_report(report)
    out = checkpoint_path.parent / f"eval_{name}"
    json_path = Path(f"{out}.json")
    write_json(report, json_path)
    paths = [json_path, *save_evaluation_figures(labels, probs, report, out, name)]
    uri, run = checkpoint.get("tracking_uri", ""), checkpoint.get("mlflow_run_id", "")
    histories = metric_histories(uri, run, ("train_loss", "val_loss", "val_auc"))
    if histories is None:
        print(f"Training curves: MLflow run {run or '?'} not reachable at {uri or '?'}; skipped")
    else:
        paths.append(training_curves_figure(histories, Path(f"{out}_training_curves.png")))
    profile = profile_of(checkpoint)
    tracking_uri, _ = resolve_tracking_uri(tracking_uri, profile.port, recorded=uri)  # beside the training run
    run_id = log_evaluation_run(
        tracking_uri,
        checkpoint["config"].get("experiment", profile.experiment),
        f"eval-{name}",
        {"training_run_id": report["training_run_id"], "checkpoint": checkpoint_path, "data": source},
        report_metrics(report),
        paths,
    )
    print(f"Wrote {json_path} and {len(paths) - 1} figures; MLflow evaluation run {run_id} ({tracking_uri})")
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
    p_value = min(1.0, 2 * min((differences <= 0).mean(), (differences >= 0).mean()))
    return {
        "difference": float(roc_auc_score(labels, probs_b) - roc_auc_score(labels, probs_a)),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": float(p_value),
    }


def training_facts(checkpoint_path: Path, checkpoint: dict) -> dict:
    """Time, epochs and memory of the whole training run (summary.json beside it, when present)."""
    summary_path = checkpoint_path.parent / SUMMARY_NAME
    summary = read_json(summary_path) if summary_path.is_file() else {}
    return {
        "trainable_parameters": checkpoint.get("trainable_parameters", 0),
        "train_seconds": summary.get("train_seconds", checkpoint.get("train_seconds", float("nan"))),
        "epochs_trained": summary.get("epochs_trained", checkpoint.get("epoch", 0)),
        "best_epoch": checkpoint.get("best_epoch", 0),
        "peak_memory_mb": summary.get("peak_memory_mb", checkpoint.get("peak_memory_mb", float("nan"))),
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


def compare_checkpoints(paths: list[Path], data_dir: str, scoring: Scoring, tracking_uri: str) -> dict:
    """--compare A B: both checkpoints on the same images; reports/comparison.md plus figures."""
    paths = [Path(p) for p in paths]
    checkpoints = [load_checkpoint(p) for p in paths]
    samples, source = held_out_samples(paths[0], data_dir, scoring.num_workers or 2, checkpoint=checkpoints[0])
    refuse_trained_on(samples, paths[1], scoring.num_workers or 2, checkpoint=checkpoints[1])
    labels_of = [profile_of(c).gradcam_label for c in checkpoints]
    names = [f"{label} ({path.name})" for label, path in zip(labels_of, paths)]
    print(f"Comparing {names[0]} and {names[1]} on {len(samples)} images: {source}")
    results = []
    for checkpoint in checkpoints:
        labels, probs, report = score_checkpoint(checkpoint, samples, scoring)
        results.append({"probs": probs, "report": report})
    auc_test = paired_auc_difference(labels, results[0]["probs"], results[1]["probs"], scoring.resamples, scoring.seed)
    p_value = format_p_value(auc_test["p_value"], scoring.resamples)
    report_dir = Path("reports")
    report_dir.mkdir(exist_ok=True)
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
        {"run_a": checkpoints[0].get("mlflow_run_id", ""), "run_b": checkpoints[1].get("mlflow_run_id", "")},
        {"auc_difference": auc_test["difference"], "auc_difference_p_value": auc_test["p_value"]},
        [report_path, report_dir / "comparison.json", *figures],
    )
    print(f"Wrote {report_path}; MLflow run {run_id} ({tracking_uri})")
    return comparison
