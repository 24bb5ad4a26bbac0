"""Site thresholds: choose operating points on a hospital's own labelled sample (WHO guidance for CAD).

A threshold table over candidate thresholds (calibrated log-odds, with their P(TB)): sensitivity and
specificity with 95% Wilson intervals, PPV and NPV at the sample's prevalence and, with intervals, at the
screening prevalence the user gives, referrals per 1,000 screened, and whether the WHO triage target holds
on the lower Wilson bounds. The operating points refitted on the sample go into a new checkpoint beside the
original, which is never modified; it records the sample by pixel content, so that evaluation and GradCAM
leave it out. A case is TB-positive when log-odds >= threshold, as everywhere in the project.
"""

from __future__ import annotations

import csv
import hashlib
from datetime import date
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .config import CLASS_NAMES, POSITIVE_CLASS
from .errors import DataError
from .metrics import (
    DEFAULT_THRESHOLD,
    THRESHOLD_NAMES,
    WHO_TRIAGE_MIN_SPECIFICITY,
    WHO_TRIAGE_SENSITIVITY,
    Calibration,
    format_threshold,
    log_odds_of,
    probability_of,
    select_thresholds,
    shown,
    wilson_interval,
)

MINIMUM_PER_CLASS = 20  # below this, a 95% interval on sensitivity spans more than about 0.35
GRID = np.round(np.arange(1, 20) * 0.05, 2)  # P(TB) 0.05, 0.10, ..., 0.95 (as log-odds in the table)
REFITTED = ("youden", "who_triage")  # the operating points fitted on the site sample ("default" is always 0.5)
COLUMNS = (
    "threshold_log_odds",
    "threshold_p_tb",
    "source",
    "tp",
    "fn",
    "tn",
    "fp",
    "sensitivity",
    "sensitivity_ci_low",
    "sensitivity_ci_high",
    "specificity",
    "specificity_ci_low",
    "specificity_ci_high",
    "ppv_sample",
    "npv_sample",
    "prevalence",
    "ppv_at_prevalence",
    "ppv_at_prevalence_ci_low",
    "ppv_at_prevalence_ci_high",
    "npv_at_prevalence",
    "npv_at_prevalence_ci_low",
    "npv_at_prevalence_ci_high",
    "referrals_per_1000",
    "meets_who_triage",
)


def refuse_small_sample(labels, minimum: int = MINIMUM_PER_CLASS) -> None:
    """Stop unless the sample holds at least `minimum` images of each class: a threshold fitted on
    fewer has intervals too wide to act on, and one class alone has no sensitivity or specificity."""
    labels = np.asarray(labels)
    counts = {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}
    if min(counts.values()) < minimum:
        found = " and ".join(f"{n} {name}" for name, n in counts.items())
        why = "one class only" if min(counts.values()) == 0 else f"fewer than {minimum} of one class"
        raise DataError(
            f"error: a site sample needs at least {minimum} {CLASS_NAMES[POSITIVE_CLASS]} and {minimum} "
            f"{CLASS_NAMES[1 - POSITIVE_CLASS]} images to fit thresholds on; found {found} ({why}). "
            "Add labelled images of the short class and run again"
        )


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV by Bayes' rule at a prevalence (NaN where nothing is called positive, or negative)."""
    positives = sensitivity * prevalence + (1 - specificity) * (1 - prevalence)
    ppv = sensitivity * prevalence / positives if positives > 0 else float("nan")
    npv = specificity * (1 - prevalence) / (1 - positives) if positives < 1 else float("nan")
    return float(ppv), float(npv)


def predictive_value_intervals(sensitivity_ci, specificity_ci, prevalence: float) -> dict[str, float]:
    """95% bounds of PPV and NPV at a known prevalence by substituting the Wilson bounds of sensitivity and
    specificity into Bayes' rule (both values increase with each): conservative, as the two intervals are
    combined at their ends (NaN where a bound is undefined)."""
    low, high = (
        predictive_values(sensitivity_ci[0], specificity_ci[0], prevalence),
        predictive_values(sensitivity_ci[1], specificity_ci[1], prevalence),
    )
    return {
        "ppv_at_prevalence_ci_low": low[0],
        "ppv_at_prevalence_ci_high": high[0],
        "npv_at_prevalence_ci_low": low[1],
        "npv_at_prevalence_ci_high": high[1],
    }


def candidate_thresholds(labels, scores, stored: dict[str, float]) -> dict[float, list[str]]:
    """log-odds threshold -> where it comes from: the P(TB) grid, the points refitted on this sample, the
    checkpoint's."""
    refitted = select_thresholds(labels, scores)
    named = [(float(t), "grid") for t in log_odds_of(GRID)]
    named += [(refitted[name], f"site {name}") for name in REFITTED]
    named += [(float(t), f"checkpoint {name}") for name, t in stored.items()]
    sources: dict[float, list[str]] = {}
    for threshold, source in sorted(named, key=lambda pair: pair[0]):  # stable: grid, site, checkpoint
        sources.setdefault(threshold, []).append(source)
    return sources


def threshold_row(labels: np.ndarray, scores: np.ndarray, threshold: float, prevalence: float) -> dict:
    """One log-odds threshold's confusion counts and what a site needs to choose it."""
    called = scores >= threshold
    tp, fn = int((called & (labels == 1)).sum()), int((~called & (labels == 1)).sum())
    tn, fp = int((~called & (labels == 0)).sum()), int((called & (labels == 0)).sum())
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    sensitivity_ci, specificity_ci = wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp)
    ppv_sample, npv_sample = predictive_values(sensitivity, specificity, (tp + fn) / len(labels))
    ppv, npv = predictive_values(sensitivity, specificity, prevalence)
    return {
        "threshold_log_odds": threshold,
        "threshold_p_tb": float(probability_of(threshold)),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": sensitivity,
        **dict(zip(("sensitivity_ci_low", "sensitivity_ci_high"), sensitivity_ci)),
        "specificity": specificity,
        **dict(zip(("specificity_ci_low", "specificity_ci_high"), specificity_ci)),
        "ppv_sample": ppv_sample,
        "npv_sample": npv_sample,
        "prevalence": prevalence,  # the screening prevalence the next columns are at
        "ppv_at_prevalence": ppv,
        "npv_at_prevalence": npv,
        **predictive_value_intervals(sensitivity_ci, specificity_ci, prevalence),
        "referrals_per_1000": 1000 * (sensitivity * prevalence + (1 - specificity) * (1 - prevalence)),
        # Judged on what the sample supports: the lower 95% bounds, not the point estimates.
        "meets_who_triage": sensitivity_ci[0] >= WHO_TRIAGE_SENSITIVITY
        and specificity_ci[0] >= WHO_TRIAGE_MIN_SPECIFICITY,
    }


def site_threshold_table(labels, scores, prevalence: float, stored: dict[str, float]) -> list[dict]:
    """One row per candidate threshold, ascending: the 0.05 grid, the Youden and WHO triage points refitted
    on this sample, and the checkpoint's `stored` points; `source` names every origin of a threshold.
    The sample must hold both classes (refuse_small_sample checks that first)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    return [
        threshold_row(labels, scores, threshold, prevalence) | {"source": ", ".join(sources)}
        for threshold, sources in candidate_thresholds(labels, scores, stored).items()
    ]


def refitted_rows(rows: list[dict]) -> dict[str, dict]:
    """Operating point name -> the table row of the point refitted on the site sample."""
    return {name: row for name in REFITTED for row in rows if f"site {name}" in row["source"].split(", ")}


def write_site_tables(rows: list[dict], prefix: Path, *, prevalence: float, checkpoint: Path) -> list[Path]:
    """PREFIX_site_thresholds.csv (every number, full precision) and .md (for people: rounded, with a
    header saying what sample, which prevalence and which checkpoint the numbers belong to)."""
    csv_path, md_path = Path(f"{prefix}_site_thresholds.csv"), Path(f"{prefix}_site_thresholds.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    first = rows[0]
    positives, images = first["tp"] + first["fn"], first["tp"] + first["fn"] + first["tn"] + first["fp"]
    at = f"{prevalence:.1%}"
    lines = [
        f"# Site thresholds of {Path(checkpoint).name}",
        "",
        f"Checkpoint {checkpoint}, scored on {images} images ({positives} {CLASS_NAMES[POSITIVE_CLASS]}, "
        f"{images - positives} {CLASS_NAMES[1 - POSITIVE_CLASS]}): sample prevalence {positives / images:.1%}; "
        f"PPV, NPV and referrals also at a screening prevalence of {at}. A case is positive when its calibrated "
        "log-odds >= the threshold (P(TB) beside it; the CSV has every digit). Intervals: 95% Wilson; PPV and NPV "
        f"at {at}: the Wilson bounds put into Bayes' rule. WHO triage target: sensitivity >= "
        f"{WHO_TRIAGE_SENSITIVITY:.2f} and specificity >= {WHO_TRIAGE_MIN_SPECIFICITY:.2f}, met only where the "
        "lower 95% bounds reach them. Rows whose source is a site point were chosen on these very images: their "
        "figures are optimistic until confirmed on a second sample.",
        "",
        f"| log-odds threshold (P(TB)) | source | TP | FN | TN | FP | sensitivity (95% CI) | specificity (95% CI) "
        f"| PPV sample | NPV sample | PPV at {at} (95% CI) | NPV at {at} (95% CI) | referrals per 1,000 at {at} "
        "| WHO triage (lower bounds) |",
        "|" + "---|" * 14,
    ]
    for row in rows:
        cells = [
            f"{row['threshold_log_odds']:.4f} ({row['threshold_p_tb']:.4g})",
            ", ".join(readable_source(s) for s in row["source"].split(", ")),
            *(str(row[k]) for k in ("tp", "fn", "tn", "fp")),
            *(with_bounds(row, k) for k in ("sensitivity", "specificity")),
            *(shown(row[k], 3) for k in ("ppv_sample", "npv_sample")),
            *(with_bounds(row, k) for k in ("ppv_at_prevalence", "npv_at_prevalence")),
            f"{row['referrals_per_1000']:.0f}",
            "**met**" if row["meets_who_triage"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def with_bounds(row: dict, key: str) -> str:
    return f"{shown(row[key], 3)} [{shown(row[key + '_ci_low'], 3)}, {shown(row[key + '_ci_high'], 3)}]"


def readable_source(source: str) -> str:
    """'site who_triage' -> 'site WHO triage'."""
    where, _, name = source.partition(" ")
    return f"{where} {THRESHOLD_NAMES.get(name, name)}" if name else where


def site_checkpoint_path(checkpoint_path: Path, sample: dict) -> Path:
    """Where the refitted checkpoint goes: beside the original, named after it, the sample folder and a digest
    of the sample's pixel content, so that refitting on another folder of the same name writes a new file
    (refitting on the same images replaces the file with the same points)."""
    checkpoint_path = Path(checkpoint_path)
    content = hashlib.sha1("".join(sorted(sample["pixel_sha1"])).encode()).hexdigest()[:8]
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_site_{sample['name']}_{content}{checkpoint_path.suffix}")


def refit_checkpoint(checkpoint: Checkpoint, checkpoint_path: Path, thresholds: dict[str, float], sample: dict) -> Path:
    """Write a new checkpoint beside `checkpoint_path`: the same weights, preprocessing and calibration, its
    operating points replaced by `thresholds` (refitted on the site sample), and a record of that sample.
    The original file is only read."""
    checkpoint_path = Path(checkpoint_path)
    record = sample | {
        "date": date.today().isoformat(),
        "refitted_from": str(checkpoint_path.resolve()),
        "refitted_from_sha256": sha256_of(checkpoint_path),
    }
    path = site_checkpoint_path(checkpoint_path, sample)
    checkpoint.with_operating_points({"default": DEFAULT_THRESHOLD, **thresholds}, site=record).save(path)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()  # streamed in blocks (a ResNet50 checkpoint is about 95 MB); file_digest needs 3.11
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fit_site_thresholds(
    checkpoint: Checkpoint, checkpoint_path: Path, labels, scores, prevalence: float, prefix: Path, sample: dict
) -> dict:
    """--site-thresholds: the table (CSV, markdown), its plot and the refitted checkpoint; prints where they
    went and the refitted points. `sample`: the site sample's name (for file names), folder and description,
    recorded in the new checkpoint, with "pixel_sha1", the pixel hashes of its images. `scores`: log-odds.
    Returns what the evaluation report records."""
    from .figures import site_threshold_figure

    labels, scores = np.asarray(labels), np.asarray(scores)
    rows = site_threshold_table(labels, scores, prevalence, checkpoint.state.thresholds)
    refitted = refitted_rows(rows)
    points = {name: row["threshold_log_odds"] for name, row in refitted.items()}
    files = write_site_tables(rows, prefix, prevalence=prevalence, checkpoint=checkpoint_path)
    figure = Path(f"{prefix}_site_thresholds.png")
    files.append(site_threshold_figure(rows, points, figure, f"{sample['name']}, {len(labels)} images"))
    counts = {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}
    new_path = refit_checkpoint(checkpoint, checkpoint_path, points, sample | {"images": len(labels)} | counts)
    positives = counts[CLASS_NAMES[POSITIVE_CLASS]]
    calibration = checkpoint.state.calibration
    read_as = (
        "the network's softmax (no calibration stored)"
        if calibration == Calibration()
        else f"calibrated with scale {calibration.scale:.3f}, bias {calibration.bias:+.3f}"
    )
    print(
        f"Site thresholds fitted on {len(labels)} images ({', '.join(f'{n} {name}' for name, n in counts.items())};"
        f" sample prevalence {positives / len(labels):.1%}), P(TB) {read_as}:"
    )
    for name, row in refitted.items():
        print(
            f"  site {THRESHOLD_NAMES[name]:<11} {format_threshold(row['threshold_log_odds'])}: sensitivity "
            f"{with_bounds(row, 'sensitivity')}, specificity {with_bounds(row, 'specificity')}; at prevalence "
            f"{prevalence:.1%}: PPV {with_bounds(row, 'ppv_at_prevalence')}, NPV "
            f"{with_bounds(row, 'npv_at_prevalence')}, {row['referrals_per_1000']:.0f} referrals per 1,000; "
            "WHO triage target " + ("met" if row["meets_who_triage"] else "not met") + " on the lower 95% bounds"
        )
    print(
        "  (the site points are chosen on this very sample, so their sensitivity and specificity are optimistic: "
        "confirm them on a second labelled sample before screening)"
    )
    print(f"Site threshold table: {files[0]}, {files[1].name}, plot {files[2].name}")
    print(f"Refitted checkpoint: {new_path} (predicts at the site's Youden's J, {format_threshold(points['youden'])};"
          f" records its {len(labels)} images by pixel content, which evaluation and GradCAM leave out; "
          f"{checkpoint_path} unchanged)")  # fmt: skip
    return {
        "prevalence": prevalence,
        "operating_points": {name: {k: row[k] for k in COLUMNS if k != "source"} for name, row in refitted.items()},
        "files": [str(f) for f in files],
        "checkpoint": str(new_path),
    }
