"""Honest evaluation: bootstrap intervals, validation-chosen operating points, calibration,
external test sets and the transfer-vs-full comparison report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coloured_share, exits_with, write_xrays
from mlflow.tracking import MlflowClient
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr import figures
from tbcxr.checkpoint import Checkpoint, read_json
from tbcxr.config import MANIFEST_NAME
from tbcxr.errors import DataError
from tbcxr.evaluation import predict_checkpoint
from tbcxr.layout import discover_dataset
from tbcxr.metrics import bootstrap_metrics, classification_metrics, probability_of, select_thresholds, with_intervals
from tbcxr.split import held_out_samples, manifest_samples


def scores(n: int, seed: int = 0):
    """Labels and imperfect TB probabilities of a balanced set of n images."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    return labels, np.clip(0.5 + 0.1 * (2 * labels - 1) + rng.normal(0, 0.25, n), 0, 1)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_images():
    widths = {}
    for n in (40, 400):
        labels, probs = scores(n)
        point = classification_metrics(labels, probs, 0.5)
        draws = bootstrap_metrics(labels, probs, {"default": 0.5}, resamples=300, seed=1)["default"]
        intervals = with_intervals(point, draws)
        for metric, entry in intervals.items():
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], metric
        widths[n] = {m: e["ci_high"] - e["ci_low"] for m, e in intervals.items()}
    metrics = ("accuracy", "sensitivity", "specificity", "auc", "average_precision")
    for metric in metrics:
        assert widths[400][metric] < widths[40][metric], metric
    assert np.mean([widths[400][m] / widths[40][m] for m in metrics]) < 0.6  # about 1/sqrt(10) expected
    labels, probs = scores(40)  # seeded: the same call gives the same intervals
    again = [bootstrap_metrics(labels, probs, {"t": 0.5}, 50, seed=3)["t"] for _ in range(2)]
    assert again[0] == again[1]


def val_predictions(trained_run):
    checkpoint = Checkpoint.load(trained_run["best"])
    manifest = read_json(trained_run["best"].parent / MANIFEST_NAME)
    labels, probs = predict_checkpoint(checkpoint, manifest_samples(manifest, "val"), torch.device("cpu"), 16, 0)
    return checkpoint, labels, probs


def count_checkpoint_loads(monkeypatch) -> list:
    """The paths checkpoints are read from, in order (a ResNet50's is ~190 MB)."""
    loads, load = [], Checkpoint.load

    def counted(path):
        loads.append(Path(path))
        return load(path)

    monkeypatch.setattr(Checkpoint, "load", staticmethod(counted))
    return loads


def test_thresholds_chosen_on_validation_are_stored_and_applied(trained_run, capsys, monkeypatch, tmp_path):
    checkpoint, labels, probs = val_predictions(trained_run)
    stored = checkpoint.state.thresholds
    assert stored == pytest.approx(select_thresholds(labels, probs))
    # The WHO triage point reaches the sensitivity floor on the validation set it was chosen on.
    assert classification_metrics(labels, probs, stored["who_triage"])["sensitivity"] >= 0.90
    youden = classification_metrics(labels, probs, stored["youden"])
    assert youden["sensitivity"] + youden["specificity"] - 1 == pytest.approx(
        max(
            m["sensitivity"] + m["specificity"] - 1
            for m in (classification_metrics(labels, probs, t) for t in np.r_[probs, np.inf])
        )
    )

    loads = count_checkpoint_loads(monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = trainer.main(["--test-only", "--resume", str(trained_run["best"]), "--bootstrap-resamples", "50"])
    assert {name: entry["threshold_log_odds"] for name, entry in report["thresholds"].items()} == stored
    assert loads == [trained_run["best"]]  # the split check uses the checkpoint already in memory
    # No --tracking-uri: the evaluation run goes to the training run's store, named for the manifest's test side.
    client = MlflowClient(trained_run["uri"])
    (evaluation_run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="attributes.run_name = 'eval-split_test'"
    )
    assert evaluation_run.data.tags["training_run_id"] == report["training_run_id"]
    assert (trained_run["best"].parent / f"eval_{trained_run['best'].stem}_split_test_manifest.json").is_file()
    # MLFLOW_TRACKING_URI comes before the training run's store.
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    trainer.main(["--test-only", "--resume", str(trained_run["best"]), "--bootstrap-resamples", "10"])
    client = MlflowClient(elsewhere)
    assert [
        run.info.run_name for run in client.search_runs([e.experiment_id for e in client.search_experiments()])
    ] == ["eval-split_test"]
    test_samples = held_out_samples(trained_run["best"], discover_dataset(trained_run["data"]))[0]
    test_labels, test_probs = predict_checkpoint(checkpoint, test_samples, torch.device("cpu"), 16, 0)
    applied = classification_metrics(test_labels, test_probs, stored["youden"])
    assert report["thresholds"]["youden"]["metrics"]["sensitivity"]["value"] == applied["sensitivity"]
    assert "Test Results - Accuracy: " in capsys.readouterr().out

    # GradCAM labels its predictions with the same stored operating threshold (and calibration).
    model = checkpoint.model()
    samples = held_out_samples(trained_run["best"])[0]
    explanations = gradcam.explain(
        model,
        model.layer4,
        samples,
        checkpoint,
        torch.device("cpu"),
        "gradcam",
        "predicted",
        16,
        score_faithfulness=False,
    )
    assert stored["youden"] != 0.0  # log-odds: not P(TB) 0.5
    assert [e.log_odds for e in explanations] == pytest.approx(list(test_probs), abs=1e-5)
    assert [e.predicted for e in explanations] == [int(s >= stored["youden"]) for s in test_probs]


def test_external_flat_folder_is_used_whole_with_figures_and_mlflow_run(trained_run, tmp_path, monkeypatch):
    external = tmp_path / "hospital_b"
    samples = [(str(path), 0) for path in write_xrays(external / "normal", 5, False, seed=7)]
    samples += [(str(path), 1) for path in write_xrays(external / "TUBERCULOSIS", 4, True, seed=7)]
    drawn, save = {}, figures.save_figure

    def recording(fig, path, dpi=110):
        drawn[path.name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(figures, "save_figure", recording)

    report = trainer.main(
        [
            "--test-only",
            "--resume",
            str(trained_run["best"]),
            "--data-dir",
            str(external),
            "--bootstrap-resamples",
            "50",
            "--tracking-uri",
            trained_run["uri"],
        ]
    )

    assert report["n_images"] == 9 and report["class_counts"] == {"Normal": 5, "Tuberculosis": 4}
    assert "external test set" in report["data"]
    ckpt_dir = trained_run["best"].parent
    (json_path,) = ckpt_dir.glob(f"eval_{trained_run['best'].stem}_hospital_b_*.json")  # checkpoint, folder, digest
    prefix = json_path.stem
    written = json.loads(json_path.read_text())
    assert (
        written["thresholds"]["default"]["metrics"]["auc"]["ci_low"]
        <= written["thresholds"]["default"]["metrics"]["auc"]["value"]
    )
    assert set(written["calibration"]) == {"brier_score", "expected_calibration_error"}
    # Drawn, not just titled (an empty titled figure has no coloured pixel): curves colour about 1% of
    # their figure, matrix cells half. The matrices and the reliability curve are these predictions'.
    for kind in ("roc", "pr", "confusion", "training_curves"):
        assert coloured_share(ckpt_dir / f"{prefix}_{kind}.png") > (0.2 if kind == "confusion" else 0.002), kind
    labels, probs = predict_checkpoint(Checkpoint.load(trained_run["best"]), samples, torch.device("cpu"), 16, 0)
    matrices = drawn[f"{prefix}_confusion.png"].axes
    assert len(matrices) == len(report["thresholds"])
    for ax, entry in zip(matrices, report["thresholds"].values()):
        counts = confusion_matrix(labels, probs >= entry["threshold_log_odds"], labels=[0, 1]).ravel()
        assert [t.get_text() for t in ax.texts] == [str(n) for n in counts]
    reliability = drawn[f"{prefix}_reliability.png"].axes[0]
    (curve,) = [line for line in reliability.lines if line.get_label() == "ResNet50"]
    fraction_tb, mean_probability = calibration_curve(labels, probability_of(probs), n_bins=10)
    np.testing.assert_allclose(curve.get_xydata(), np.c_[mean_probability, fraction_tb], atol=1e-6)
    client = MlflowClient(trained_run["uri"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.data LIKE '%hospital_b%'"
    )
    assert len(runs) == 1 and runs[0].data.tags["training_run_id"] == report["training_run_id"]
    assert "default_auc_ci_low" in runs[0].data.metrics
    for name, entry in report["thresholds"].items():  # each operating point's metrics beside its threshold
        assert runs[0].data.metrics[f"{name}_threshold_log_odds"] == pytest.approx(entry["threshold_log_odds"])


def test_comparing_a_checkpoint_with_itself(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best = str(trained_run["best"])
    loads = count_checkpoint_loads(monkeypatch)

    comparison = trainer.main(
        ["--compare", best, best, "--bootstrap-resamples", "100", "--tracking-uri", trained_run["uri"]]
    )

    assert loads == [trained_run["best"]] * 2  # each once: the split checks use them
    a, b = comparison["reports"]
    assert json.dumps(a["thresholds"]) == json.dumps(b["thresholds"])  # NaN (undefined) equal as written
    assert comparison["auc_difference"]["difference"] == 0.0 and comparison["auc_difference"]["p_value"] == 1.0
    markdown = (tmp_path / "reports" / "comparison.md").read_text()
    for row in (
        "Trainable parameters | 23,512,130 | 23,512,130",
        "Training time (wall clock)",
        "Epochs to best",
        "Peak memory",
        "auc threshold-free (95% CI)",
        "paired bootstrap p = 1.000",
    ):
        assert row in markdown
    assert coloured_share(tmp_path / "reports" / "comparison_roc.png") > 0.002  # the curves, not just a title


def test_a_split_manifest_replaced_after_training_is_refused_and_prepare_only_keeps_off_a_trained_run(
    trained_run, tmp_path, capsys
):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in (trained_run["best"].name, "last.pth", MANIFEST_NAME):
        (ckpt / name).write_bytes((trained_run["best"].parent / name).read_bytes())
    best = ckpt / trained_run["best"].name
    assert held_out_samples(best)[0] == manifest_samples(read_json(ckpt / MANIFEST_NAME), "test")  # the control

    with exits_with(capsys, "holds a training run's checkpoints"):
        trainer.main(["--data-dir", str(trained_run["data"]), "--checkpoint-dir", str(ckpt), "--prepare-only"])
    manifest = read_json(ckpt / MANIFEST_NAME)
    manifest["train"], manifest["test"] = manifest["test"], manifest["train"]  # what another split would write
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="is not the split"):
        held_out_samples(best)
    for evaluate in (
        lambda: gradcam.main(["--checkpoint", str(best), "--output-dir", str(tmp_path / "cams")]),
        lambda: trainer.main(["--resume", str(ckpt / "last.pth"), "--checkpoint-dir", str(ckpt), "--device", "cpu"]),
    ):
        with exits_with(capsys, "is not the split"):
            evaluate()
