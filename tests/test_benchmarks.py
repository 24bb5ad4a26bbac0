"""The generalisation benchmark's arithmetic: paired differences of mean AUCs, the epoch each selection
rule picks, and --merge refusing results that are not comparable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_generalisation as bench  # noqa: E402


def scored(labels: np.ndarray, probs: np.ndarray) -> dict:
    return {"internal": (labels, probs), "external": (labels, probs)}


def test_mean_difference_is_the_difference_of_mean_aucs_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    weak = [labels + rng.normal(0, 2.0, 80) for _ in range(2)]
    strong = [labels + rng.normal(0, 0.5, 80) for _ in range(3)]
    runs = {"naive": [scored(labels, p) for p in weak], "project": [scored(labels, p) for p in strong]}
    entry = bench.mean_difference(runs, "project", "naive", "external", resamples=200)
    expected = np.mean([roc_auc_score(labels, p) for p in strong]) - np.mean([roc_auc_score(labels, p) for p in weak])
    assert entry["difference"] == pytest.approx(expected)
    assert 0 < entry["ci_low"] < expected < entry["ci_high"]
    assert entry["seeds_ci_low"] < expected < entry["seeds_ci_high"]
    same = bench.mean_difference({"naive": runs["naive"], "copy": runs["naive"]}, "copy", "naive", "internal", 50)
    assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    assert same["seeds_ci_low"] < 0 < same["seeds_ci_high"]  # two seeds, drawn apart: the seed spread shows


def test_selection_rules_pick_epochs_from_the_validation_history_alone():
    history = [{"val_auc": auc, "val_loss": loss} for auc, loss in [(0.6, 0.9), (0.9, 0.7), (0.5, 0.5), (0.7, 0.6)]]
    per_epoch = [{"internal": 0.1 * e, "external": 0.2 * e} for e in range(1, 5)]
    picks = bench.selection_rules({"history": history, "per_epoch": per_epoch})
    assert {rule: pick["epoch"] for rule, pick in picks.items()} == {
        "last epoch": 4,
        "lowest validation loss": 3,
        "best validation AUC, window 1": 2,
        "best validation AUC, window 3": 4,  # means 0.667 (epochs 1-3) < 0.700 (epochs 2-4)
    }
    assert picks["lowest validation loss"]["external"] == pytest.approx(0.6)


def test_merge_refuses_other_budgets_and_the_same_run_twice(tmp_path):
    def saved(name: str, epochs: int, seed: int = 0) -> Path:
        args = {"train_dir": "a", "external_dir": "b", "epochs": epochs, "image_size": 128, "batch_size": 16}
        run = {"seed": seed, "internal": [[0, 1], [0.2, 0.8]], "external": [[0, 1], [0.4, 0.6]]}
        path = tmp_path / f"{name}_{epochs}_{seed}.json"
        path.write_text(json.dumps({"args": args, "seconds": 1.0, "scores": {name: [run]}}))
        return path

    with pytest.raises(SystemExit, match="differs .* in epochs"):
        bench.main(["--merge", str(saved("naive", 15)), str(saved("project", 3))])
    with pytest.raises(SystemExit, match="project, seed 0 is in more than one file"):
        bench.main(["--merge", str(saved("project", 15)), str(saved("project", 15))])
