"""Render GradCAM overlays that show where the trained TB ResNet50 looks.

    python resnet50_gradcam_tb_full.py                      # best full-training checkpoint, its test images
    python resnet50_gradcam_tb_full.py --images xray.png scans/ --method gradcam++
    python resnet50_gradcam_tb_full.py --compare-checkpoint checkpoints/resnet50_tb/best_resnet50_tb_finetuned.pth
    python resnet50_gradcam_tb_full.py --images new_site/ --predictions new_site.csv   # P(TB) of every file

The model, image size, normalisation and class names come from the checkpoint. CAMs come
from pytorch-grad-cam on model.layer4; each map's faithfulness is scored with ROAD
(remove-and-debias: confidence change when the least vs the most relevant pixels are
removed; higher means the map points at what the model really uses), seeded by --seed so
that a rerun prints the same scores. Captions give P(TB) against the operating threshold.
Each map's lung share (the share of its mass inside the lung fields that the shipped lung model
finds on the full picture; a shortcut meter) is in its caption, the index, the console and MLflow.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch

from tbcxr.checkpoint import Checkpoint, write_json
from tbcxr.config import (
    CLASS_NAMES,
    FULL_TRAINING,
    Profile,
    add_dataclass_arguments,
    best_checkpoint_path,
    flag,
    non_negative_int,
    positive_int,
    refuse_inside,
)
from tbcxr.errors import DataError, exits_on_error
from tbcxr.explain import (
    UNLABELLED,
    class_slug,
    explain,
    label_name,
    mean_road_per_class,
    provenance,
    render_comparison,
    render_explanation,
    render_grid,
)
from tbcxr.layout import discover_dataset, find_class_dirs, labelled_images, list_images
from tbcxr.lung_share import lung_share_line, lung_share_metrics, lung_share_summary, with_lung_shares
from tbcxr.lungs import load_lung_model
from tbcxr.predict import (
    OK,
    Predictor,
    Scored,
    checkpoint_digest,
    find_files,
    left_out_listing,
    left_out_reason,
    predict_to_csv,
    score_files,
    screen_samples,
    summary_line,
)
from tbcxr.runtime import resolve_device
from tbcxr.split import held_out_samples, leave_out_site_sample, manifest_beside
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
    predictions: str = flag(
        "", "write P(TB) and the decision of every file under --images (recursively), or of every test image, "
        "to this CSV; an unreadable file is a row saying why"
    )  # fmt: skip
    maps: str = flag(
        "auto", "which images get a map: none, top (the --num-images highest P(TB)), all; auto: none with "
        "--predictions, else all", choices=["auto", "none", "top", "all"]
    )  # fmt: skip
    operating_point: str = flag("", "stored operating point deciding TB (youden, who_triage, ...); default: "
                                "the one the checkpoint recommends")  # fmt: skip
    num_workers: int = flag(min(4, os.cpu_count() or 1), "processes decoding images for --predictions",
                            type=non_negative_int)  # fmt: skip

    @property
    def chosen_maps(self) -> str:
        return self.maps if self.maps != "auto" else "none" if self.predictions else "all"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, GradCamConfig)
    return parser


def config_from_args(argv: list[str] | None = None) -> GradCamConfig:
    parser = get_args_parser()
    config = GradCamConfig(**vars(parser.parse_args(argv)))
    if config.chosen_maps == "none" and not config.predictions:
        parser.error("--maps none writes nothing without --predictions FILE")
    return config


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


def test_samples(config: GradCamConfig, checkpoint_path: Path, checkpoint: Checkpoint) -> list[tuple[str, int]]:
    """The images the checkpoint may be scored on: --data-dir's less its training images, else its test side."""
    data = discover_dataset(config.data_dir) if config.data_dir else None  # None: the manifest's test side
    return held_out_samples(checkpoint_path, data, checkpoint=checkpoint)[0]


# --------------------------------------------------------------------------- stages
@dataclass
class Subject:
    """A checkpoint to explain: its file and a predictor at the chosen operating point."""

    path: Path
    predictor: Predictor

    @property
    def checkpoint(self) -> Checkpoint:
        return self.predictor.checkpoint

    @property
    def profile(self) -> Profile:
        return self.checkpoint.profile


def load_subjects(config: GradCamConfig, checkpoint: Checkpoint, device: torch.device) -> list[Subject]:
    """The checkpoint and, with --compare-checkpoint, the second one, each at the --operating-point."""
    subjects = [Subject(Path(config.checkpoint), Predictor.for_checkpoint(
        checkpoint, config.checkpoint, device, config.operating_point or None, checkpoint_digest(config.checkpoint)
    ))]  # fmt: skip
    if config.compare_checkpoint:
        other = Predictor.from_checkpoint(config.compare_checkpoint, device, config.operating_point or None)
        subjects.append(Subject(Path(config.compare_checkpoint), other))
    return subjects


def output_folder(config: GradCamConfig, profile: Profile, manifest: dict | None) -> Path:
    """Where maps go (created when maps are asked for); it and the CSV never inside a data folder."""
    output_dir = Path(config.output_dir or profile.gradcam_dir)
    trained_on = manifest["data_dir"] if manifest else ""
    image_folders = [p for p in config.images if Path(p).is_dir()] if config.predictions else []
    for data_dir in {config.data_dir, trained_on, *image_folders} - {""}:
        refuse_inside(output_dir, data_dir, "--output-dir")
        if config.predictions:
            refuse_inside(config.predictions, data_dir, "--predictions")
    if config.chosen_maps != "none":
        output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def predict_images(config: GradCamConfig, subject: Subject) -> tuple[list[Scored], dict[str, int]]:
    """P(TB) of every file under --images (or every test image), into the --predictions CSV when asked
    for; and the true label of each file (from its class folder or the split)."""
    if config.images:
        files, base = find_files(config.images)
        kept = leave_out_site_sample([(str(f), 0) for f in files], subject.checkpoint, config.num_workers, "--images")
        files = [Path(path) for path, _ in kept]  # a site checkpoint never scores the sample it was fitted on
        labels = {str(f): label_from_folder(f) for f in files}
    else:
        labels = dict(test_samples(config, subject.path, subject.checkpoint))
        files = [Path(p) for p in labels]
        base = Path(os.path.commonpath([str(p.parent.resolve()) for p in files]))
    predictor = subject.predictor
    if not config.predictions:
        return list(chain.from_iterable(score_files(predictor, files, config.batch_size, config.num_workers))), labels
    rows = predict_to_csv(predictor, files, base, Path(config.predictions), config.batch_size, config.num_workers)
    print(summary_line(rows, predictor, Path(config.predictions)))
    return rows, labels


def samples_to_explain(config: GradCamConfig, subject: Subject, scored) -> tuple[list[tuple[str, int]], dict]:
    """--maps all: every readable predicted image, or (without --predictions) --images or --num-images per
    class of the test images; top: the --num-images of highest P(TB); none: no image. And {path: reason} of
    the files the screening rule prediction applies left out (colour, strip-shaped, multi-frame)."""
    if config.chosen_maps == "none":
        return [], {}
    if scored is None:
        samples = samples_from_paths(config.images) if config.images else None
        if samples:
            samples = leave_out_site_sample(samples, subject.checkpoint, config.num_workers, "--images")
        samples = samples or first_per_class(test_samples(config, subject.path, subject.checkpoint), config.num_images)
        return screen_samples(samples, subject.predictor.transform)
    rows, labels = scored
    readable = [row for row in rows if row.status == OK]
    left_out = {str(row.path): left_out_reason(row.status) for row in rows if row.status != OK}
    if config.chosen_maps == "top":
        readable = sorted(readable, key=lambda row: -row.log_odds)[: config.num_images]  # P(TB) ties past ~37
    return [(str(row.path), labels[str(row.path)]) for row in readable], left_out


def explain_subject(config: GradCamConfig, subject: Subject, samples) -> list:
    model = subject.predictor.model
    return explain(
        model, model.layer4, samples, subject.checkpoint, subject.predictor.device, config.method, config.target,
        config.batch_size, seed=config.seed, threshold=subject.predictor.threshold,
    )  # fmt: skip


def render_maps(config: GradCamConfig, subjects: list[Subject], explained: list[list], output_dir: Path):
    """One figure per image (and per image pair with --compare-checkpoint); the paths and index rows."""
    label = subjects[0].profile.gradcam_label
    written, rows, counters = [], [], {}
    for e in explained[0]:
        counters[e.true_label] = counters.get(e.true_label, 0) + 1
        path = output_dir / f"gradcam_{class_slug(e.true_label)}_{counters[e.true_label]}_{label}.png"
        render_explanation(e, config.method, label, path)
        written.append(path)
        rows.append({
            "image": e.path, "true_label": label_name(e.true_label), "predicted_label": CLASS_NAMES[e.predicted],
            "probability_tuberculosis": e.prob_tb, "log_odds": e.log_odds, "threshold_log_odds": e.threshold,
            "correct": "" if e.true_label == UNLABELLED else not e.wrong, "cam_target": CLASS_NAMES[e.target],
            "road_score": round(e.road, 6), "file": path.name,
            "lung_share": None if e.lung_share is None else round(e.lung_share, 4), "lung_fields": e.lung_fields,
            "lung_area": None if e.lung_area is None else round(e.lung_area, 4),
        })  # fmt: skip
    counters = {}
    labels = tuple(s.profile.gradcam_label for s in subjects)
    for pair in zip(*explained) if len(subjects) > 1 else ():
        true_label = pair[0].true_label
        counters[true_label] = counters.get(true_label, 0) + 1
        path = output_dir / f"gradcam_compare_{class_slug(true_label)}_{counters[true_label]}.png"
        render_comparison(pair, labels, config.method, path)
        written.append(path)
    return written, rows


def write_index(config: GradCamConfig, subject: Subject, manifest, explained, output_dir: Path):
    """The summary grid, and the index of every map as CSV and JSON (with the mean ROAD per class and the files
    left out, each with its reason)."""
    explanations, rows, left_out = explained
    label = subject.profile.gradcam_label
    grid_path = output_dir / f"gradcam_summary_{label}.png"
    render_grid(explanations, config.method, f"{label}\n{provenance(subject.checkpoint, manifest)}", grid_path)
    summary = {
        "checkpoint": str(subject.path),
        "method": config.method,
        "target": config.target,
        "label": label,
        "mean_road_per_class": mean_road_per_class(explanations),
        "left_out": [{"image": image, "reason": reason} for image, reason in left_out.items()],
        "lung_share": lung_share_summary(explanations),
        "config": asdict(config),
    }
    csv_path, json_path = output_dir / f"gradcam_index_{label}.csv", output_dir / f"gradcam_index_{label}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json({**summary, "images": rows}, json_path)
    return summary, [grid_path, csv_path, json_path]


def write_outputs(
    config: GradCamConfig, subjects: list[Subject], manifest, explained, left_out: dict, output_dir: Path
) -> dict:
    written, rows = render_maps(config, subjects, explained, output_dir)
    summary, index_files = write_index(config, subjects[0], manifest, (explained[0], rows, left_out), output_dir)
    written += index_files
    road = summary["mean_road_per_class"]
    print("Faithfulness (ROAD combined, higher is better): " + ", ".join(f"{n} {s:+.4f}" for n, s in road.items()))
    print(lung_share_line(summary["lung_share"]))
    wrong = sum(e.wrong for e in explained[0])
    print(f"Wrote {len(written)} files to {output_dir}/ ({wrong} wrong predictions marked)")
    checkpoint = subjects[0].checkpoint
    print(log_to_training_run(checkpoint.mlflow_run_id, checkpoint.tracking_uri, written,
                              lung_share_metrics(summary["lung_share"])))  # fmt: skip
    return {**summary, "files": [str(p) for p in written], "images": rows}


# --------------------------------------------------------------------------- main
@exits_on_error(get_args_parser)
def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    checkpoint = Checkpoint.load(config.checkpoint)
    if config.demo:
        print("Demo: explaining the --demo checkpoint on its SYNTHETIC test images (not real data)")
    device = resolve_device(config.device)
    subjects = load_subjects(config, checkpoint, device)
    manifest = manifest_beside(subjects[0].path, checkpoint)
    output_dir = output_folder(config, subjects[0].profile, manifest)
    predicting = config.predictions or config.chosen_maps == "top"
    scored = predict_images(config, subjects[0]) if predicting else None
    samples, left_out = samples_to_explain(config, subjects[0], scored)
    if left_out:
        print(f"GradCAM leaves out {len(left_out)} files that cannot be scored as a chest X-ray: "
              f"{left_out_listing(left_out)}")  # fmt: skip
    result = {"predictions": config.predictions} if config.predictions else {}
    if not samples and left_out and not config.predictions:
        raise DataError(f"error: no map to draw: no image given can be scored as a chest X-ray: "
                        f"{left_out_listing(left_out)}")  # fmt: skip
    if not samples:
        return result | {"left_out": [{"image": image, "reason": reason} for image, reason in left_out.items()]}
    label = subjects[0].profile.gradcam_label
    print(f"GradCAM ({config.method}) for {subjects[0].path} [{label}] on {len(samples)} images, device {device}")
    explained = [explain_subject(config, subject, samples) for subject in subjects]
    explained = with_lung_shares(load_lung_model(), explained, config.batch_size)
    return result | write_outputs(config, subjects, manifest, explained, left_out, output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
