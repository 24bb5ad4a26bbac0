"""Numbers that are stored must hold when checked: a Youden threshold applied with p >= t gives the J it was
chosen for, found by brute force over every threshold; a bootstrap p-value below the test's resolution is
stored as the bound the report prints, in comparison.json and in MLflow."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import write_xrays
from mlflow.tracking import MlflowClient

import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint
from tbcxr.comparison import paired_auc_difference
from tbcxr.evaluation import predict_checkpoint
from tbcxr.metrics import classification_metrics, format_p_value, select_thresholds


# --------------------------------------------------------------------------- Youden's J by brute force
def youden_at(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    """Sensitivity + specificity - 1 of calling p >= threshold TB, counted directly."""
    called = probs >= threshold
    return called[labels == 1].mean() + (~called[labels == 0]).mean() - 1


def best_youden(labels: np.ndarray, probs: np.ndarray) -> float:
    """The highest J of any threshold: p >= t for each score, and a t above every score (nobody is TB)."""
    return max(youden_at(labels, probs, t) for t in [*np.unique(probs), np.inf])


def test_youden_threshold_applied_with_p_ge_t_reaches_the_best_j_of_every_threshold():
    rng = np.random.default_rng(19)
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0], dtype=np.float32)  # ties, and scores saturated at 0 and 1
    checked = 0
    for _ in range(400):
        count = int(rng.integers(2, 9))
        labels = rng.integers(0, 2, count)
        if len(np.unique(labels)) < 2:
            continue
        probs = rng.choice(grid, count)
        threshold = select_thresholds(labels, probs)["youden"]
        assert youden_at(labels, probs, threshold) == pytest.approx(best_youden(labels, probs)), (labels, probs)
        checked += 1
    assert checked > 300


def test_youden_keeps_nobody_tb_when_that_end_wins_above_scores_of_exactly_one():
    # J is 0 for "nobody is TB", -1 at t = 1.0 (the Normal case scoring 1.0 called TB), 0 again at t = 0.5.
    labels, probs = np.array([0, 1]), np.array([1.0, 0.5], dtype=np.float32)
    threshold = select_thresholds(labels, probs)["youden"]
    assert threshold > 1.0
    metrics = classification_metrics(labels, probs, threshold)
    assert (metrics["sensitivity"], metrics["specificity"]) == (0.0, 1.0)
    assert not (torch.tensor(probs) >= threshold).any()  # float32 tensors, as GradCAM compares them


def test_a_youden_stretch_one_double_step_wide_keeps_the_normal_case_normal():
    # Scores are float64 log-odds now; the middle of two adjacent doubles rounds onto one of them. Landing on
    # the Normal score would call it TB (scores >= t): the threshold must stay above it.
    low = 12.5
    high = np.nextafter(low, np.inf)
    labels, scores = np.array([0, 0, 1, 1]), np.array([-3.0, low, high, high])
    threshold = select_thresholds(labels, scores)["youden"]
    assert youden_at(labels, scores, threshold) == 1.0
    assert (scores >= threshold).tolist() == [False, False, True, True]


# --------------------------------------------------------------------------- a p-value at the test's resolution
def test_a_p_value_beyond_the_resolution_is_stored_as_the_bound_the_report_prints():
    labels = np.repeat([0, 1], 10)
    perfect, reversed_ = labels + np.linspace(0, 0.5, 20), 1 - labels + np.linspace(0, 0.5, 20)
    test = paired_auc_difference(labels, reversed_, perfect, resamples=100, seed=0)
    assert test["difference"] == 1.0  # every resample: AUC 1 against AUC 0
    assert test["p_value"] == 2 / 100 and test["p_value_is_upper_bound"]  # once stored as 0
    assert format_p_value(test["p_value"], 100, test["p_value_is_upper_bound"]) == "p < 0.02"

    same = paired_auc_difference(labels, perfect, perfect, resamples=100, seed=0)
    assert same["p_value"] == 1.0 and not same["p_value_is_upper_bound"]
    assert format_p_value(same["p_value"], 100, same["p_value_is_upper_bound"]) == "p = 1.000"


def test_compare_stores_the_p_value_bound_in_comparison_json_and_mlflow(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best = Checkpoint.load(trained_run["best"])
    # An external folder labelled by A's own ranking (A's AUC 1), scored against A with its output negated
    # (AUC 0): every resample favours A, so the bootstrap p-value is below its resolution.
    staged = write_xrays(tmp_path / "staged", 6, False, seed=11) + write_xrays(tmp_path / "staged2", 6, True, seed=11)
    _, probs = predict_checkpoint(best, [(str(p), 0) for p in staged], torch.device("cpu"), 16, 0)
    assert len(np.unique(probs)) == len(probs)  # no ties: the ranking is strict
    external = tmp_path / "hospital_c"
    for rank, index in enumerate(np.argsort(probs)):
        folder = external / ("Normal" if rank < len(probs) // 2 else "Tuberculosis")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(staged[index], folder / f"x{rank:02d}.png")
    negated_dir = tmp_path / "negated"
    negated_dir.mkdir()
    for path in trained_run["best"].parent.glob("*.json"):  # the split manifest and summary beside it
        shutil.copy(path, negated_dir / path.name)
    saved = torch.load(trained_run["best"], weights_only=True)
    saved["model"] = {k: -v if k.startswith("fc.") else v for k, v in saved["model"].items()}
    torch.save(saved, negated_dir / "negated.pth")

    comparison = trainer.main(
        ["--compare", str(negated_dir / "negated.pth"), str(trained_run["best"]), "--data-dir", str(external),
         "--bootstrap-resamples", "200", "--tracking-uri", trained_run["uri"]]
    )  # fmt: skip

    stored = json.loads((tmp_path / "reports" / "comparison.json").read_text())["auc_difference"]
    assert comparison["auc_difference"]["difference"] == stored["difference"] == 1.0
    assert stored["p_value"] == 0.01 and stored["p_value_is_upper_bound"] is True  # 2 / 200, not 0
    assert "paired bootstrap p < 0.01" in (tmp_path / "reports" / "comparison.md").read_text()
    client = MlflowClient(trained_run["uri"])
    experiment = client.get_experiment_by_name("ResNet50_TB_Comparison").experiment_id
    run = client.search_runs([experiment], order_by=["attribute.start_time DESC"], max_results=1)[0]  # this one
    assert run.data.metrics["auc_difference_p_value"] == 0.01
    assert run.data.metrics["auc_difference_p_value_is_upper_bound"] == 1.0
