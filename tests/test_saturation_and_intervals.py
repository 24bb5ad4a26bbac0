"""Numbers where near-separable data puts them (issue 23): scores past float32 saturation, intervals at 0 and
1, undefined values, how many validation images the operating points rest on, and margins on both points."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exits_with, make_organized, write_xrays
from scipy.stats import norm

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr import metrics
from tbcxr.checkpoint import Checkpoint, RunState
from tbcxr.comparison import paired_auc_difference
from tbcxr.evaluation import evaluation_report, predict_checkpoint, report_metrics
from tbcxr.metrics import (
    auc_interval,
    hanley_mcneil_variance,
    ranking_metrics,
    select_thresholds,
    tb_log_odds,
    wilson_interval,
)
from tbcxr.model import build_model
from tbcxr.predict import Predictor, image_tensor, score_files
from tbcxr.site import threshold_row

Z = norm.ppf(0.975)


# --------------------------------------------------------------------------- saturation
def scaled_checkpoints(tmp_path, factor: float) -> tuple:
    """A random 32 px model's checkpoint, and the same weights with the last layer times `factor`: its logits,
    and so its logit differences, are `factor` times the first's."""
    torch.manual_seed(3)
    model = build_model("none").eval()
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.05)
        model.fc.bias.zero_()
    Checkpoint.from_model(model, {}, 32).save(tmp_path / "plain.pth")
    with torch.no_grad():
        model.fc.weight.mul_(factor)
    Checkpoint.from_model(model, {}, 32).save(tmp_path / "scaled.pth")
    return Checkpoint.load(tmp_path / "plain.pth"), Checkpoint.load(tmp_path / "scaled.pth")


def test_logits_times_50_rank_choose_decide_and_map_exactly_as_before(tmp_path):
    folder = tmp_path / "images"
    samples = [(str(p), 0) for p in write_xrays(folder / "Normal", 8, False, size=40, seed=5)]
    samples += [(str(p), 1) for p in write_xrays(folder / "Tuberculosis", 8, True, size=40, seed=5)]
    plain, scaled = scaled_checkpoints(tmp_path, 50.0)
    labels, plain_scores = predict_checkpoint(plain, samples, torch.device("cpu"), 16, 0)
    _, scaled_scores = predict_checkpoint(scaled, samples, torch.device("cpu"), 16, 0)
    # The case that matters: a float32 P(TB) of the scaled logits ties images of both classes at 0 or 1.
    float32_p = torch.sigmoid(torch.tensor(scaled_scores, dtype=torch.float32))
    saturated = labels[((float32_p == 1) | (float32_p == 0)).numpy()]
    assert len(saturated) >= 4 and len(np.unique(plain_scores)) == len(samples)

    assert np.array_equal(np.argsort(plain_scores), np.argsort(scaled_scores))
    assert ranking_metrics(labels, scaled_scores) == ranking_metrics(labels, plain_scores)
    chosen = [select_thresholds(labels, s) for s in (plain_scores, scaled_scores)]
    for name in ("youden", "who_triage"):  # the same images on each side of every chosen point
        assert ((plain_scores >= chosen[0][name]) == (scaled_scores >= chosen[1][name])).all(), name

    config = gradcam.config_from_args(["--maps", "top", "--num-images", "5", "--predictions", "p.csv"])
    chosen_maps, decisions = [], []
    for checkpoint, points in ((plain, chosen[0]), (scaled, chosen[1])):
        checkpoint.state.thresholds = points
        predictor = Predictor.for_checkpoint(checkpoint, "in memory")
        rows = [row for batch in score_files(predictor, [Path(p) for p, _ in samples], 16, 0) for row in batch]
        chosen_maps.append(gradcam.samples_to_explain(config, None, (rows, dict(samples))))  # what --maps top maps
        decisions.append(predictor.decisions(np.array([row.log_odds for row in rows])).tolist())
    assert chosen_maps[0] == chosen_maps[1] and decisions[0] == decisions[1]


def test_prediction_rows_never_contradict_their_decision_one_ulp_from_the_threshold(tmp_path):
    folder = tmp_path / "images"
    paths = write_xrays(folder, 4, True, size=40, seed=9)
    checkpoint, _ = scaled_checkpoints(tmp_path, 1.0)
    predictor = Predictor.for_checkpoint(checkpoint, "in memory")
    batch = torch.stack([image_tensor(p, predictor.transform) for p in paths])  # one batch, as the CSV's
    on_edge = float(predictor.log_odds(batch)[0])
    checkpoint.state.thresholds = {"default": 0.0, "youden": float(np.nextafter(on_edge, np.inf))}
    checkpoint.save(tmp_path / "edge.pth")

    gradcam.main(["--checkpoint", str(tmp_path / "edge.pth"), "--images", str(folder), "--predictions",
                  str(tmp_path / "p.csv"), "--device", "cpu", "--num-workers", "0"])  # fmt: skip

    with open(tmp_path / "p.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    edge = rows[paths[0].name]
    assert edge["decision"] == "Normal" and float(edge["log_odds"]) == on_edge  # the score, digit for digit
    for row in rows.values():  # what a reader compares decides as the program did
        assert (float(row["log_odds"]) >= float(row["threshold_log_odds"])) == (row["decision"] == "Tuberculosis")
        assert float(row["p_tb"]) == pytest.approx(1 / (1 + math.exp(-float(row["log_odds"]))), rel=1e-12)


def test_tb_log_odds_are_the_calibrated_logit_difference_in_float64_past_float32_saturation():
    logits = torch.tensor([[0.0, 40.0], [0.0, 41.0], [3.0, -30.0]])  # float32 softmax: 1.0, 1.0, 0.0
    scores = tb_log_odds(logits, metrics.Calibration(scale=0.5, bias=-1.0))
    assert scores.dtype == np.float64 and scores.tolist() == [19.0, 19.5, -17.5]  # TB minus Normal, not reversed


def test_the_who_triage_point_sits_midway_below_the_tb_score_it_keeps_not_on_it():
    # 10 TB images: the 9th highest TB score is 3.0, the next lower score (a Normal) 1.0; all saturated in float32.
    labels = np.r_[np.ones(10), np.zeros(10)]
    scores = np.r_[[40.0, 39.0, 38.0, 37.0, 36.0, 35.0, 34.0, 33.0, 3.0, -5.0], [1.0] + [-20.0] * 9]
    points = select_thresholds(labels, scores)
    assert points["who_triage"] == 2.0  # (3.0 + 1.0) / 2
    assert points["youden"] == 2.0 and points["default"] == 0.0


# --------------------------------------------------------------------------- intervals
def test_the_auc_interval_is_newcombes_method_5_and_hanley_mcneils_published_example_holds():
    # Hanley & McNeil 1982 (Radiology 143:29), table 1: CT ratings 1-5 of 58 normal and 51 abnormal patients;
    # published A = 0.893, SE = 0.032.
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    labels = np.r_[np.zeros(58), np.ones(51)]
    ratings = np.r_[np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]
    auc = ranking_metrics(labels, ratings)["auc"]
    assert round(auc, 3) == 0.893 and round(math.sqrt(hanley_mcneil_variance(auc, 51, 58)), 3) == 0.032

    def newcombe_roots(a: float, m: int, n: int) -> list[float]:
        """Newcombe's method 5 as the quartic of the auRoc R package (getAUCCImwu), solved independently."""
        star = (m + n) / 2 - 1
        p, q, r = -1 - 2 * star, 1 + 2 * star, 2 + star
        z2, mn = Z**2, m * n
        coefficients = [-mn + z2 * p, mn * (1 + 2 * a) - z2 * (p - q), mn * (2 - 2 * a - a * a) - z2 * (q - r),
                        mn * (a * a - 4 * a) - z2 * r, mn * 2 * a * a]  # fmt: skip
        roots = np.roots(coefficients)
        real = roots[np.abs(roots.imag) < 1e-9].real
        return sorted(float(x) for x in real if 0 < x < 1)

    for a, m, n in ((auc, 51, 58), (0.7, 10, 30), (0.95, 7, 40)):
        assert auc_interval(a, m, n) == pytest.approx(tuple(newcombe_roots(a, m, n)), abs=1e-9)
    low, high = auc_interval(1.0, 25, 25)  # separable: one root below 1, and 1 itself
    assert high == 1.0 and low == pytest.approx(newcombe_roots(1.0, 25, 25)[0], abs=1e-9) and low < 0.93
    assert auc_interval(1.0, 5, 5)[0] < auc_interval(1.0, 25, 25)[0]  # fewer images, a wider interval


def separable_report(resamples: int = 40) -> dict:
    labels = np.repeat([1, 0], 25)
    scores = np.r_[np.linspace(30, 60, 25), np.linspace(-60, -30, 25)]  # every float32 P(TB) is 1 or 0
    return evaluation_report(labels, scores, {"default": 0.0, "nobody": 100.0}, resamples, seed=0)


def test_proportions_of_1_and_0_get_wilson_intervals_and_the_auc_of_1_a_real_one():
    report = separable_report()
    default, nobody = report["thresholds"]["default"]["metrics"], report["thresholds"]["nobody"]["metrics"]
    n_over = 25 / (25 + Z**2)  # the Wilson interval of 25/25 is [n / (n + z^2), 1]
    for metric in ("sensitivity", "specificity", "precision", "npv"):
        assert default[metric]["value"] == 1.0 and default[metric]["ci_high"] == pytest.approx(1.0)
        assert default[metric]["ci_low"] == pytest.approx(n_over, abs=1e-12), metric
        assert default[metric]["method"] == "wilson" and default[metric]["trials"] == 25
    assert default["accuracy"]["ci_low"] == pytest.approx(50 / (50 + Z**2), abs=1e-12)  # over all 50 images
    assert nobody["sensitivity"]["value"] == 0.0 and nobody["sensitivity"]["ci_low"] == pytest.approx(0.0, abs=1e-12)
    assert nobody["sensitivity"]["ci_high"] == pytest.approx(Z**2 / (25 + Z**2), abs=1e-12)
    assert default["auc"]["value"] == 1.0 and default["auc"]["ci_low"] == pytest.approx(auc_interval(1.0, 25, 25)[0])
    assert default["auc"]["ci_low"] < 0.95 and default["auc"]["method"] == "newcombe"
    assert wilson_interval(18, 20) == pytest.approx((0.6990, 0.9721), abs=1e-4)  # the 18/20


def test_undefined_values_are_nan_and_never_logged_as_zero(capsys):
    report = separable_report()
    precision = report["thresholds"]["nobody"]["metrics"]["precision"]  # nobody called TB
    assert math.isnan(precision["value"]) and math.isnan(precision["ci_low"]) and precision["trials"] == 0
    flat = report_metrics(report)
    assert "nobody_precision" not in flat and "nobody_precision_ci_low" not in flat
    assert flat["nobody_npv"] == 0.5 and flat["default_precision"] == 1.0
    from tbcxr.evaluation import print_report

    print_report(report)
    precision_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("precision"))
    assert "n/a [n/a, n/a]" in precision_line and "0.0000 [" not in precision_line


def test_who_triage_is_judged_on_the_lower_wilson_bounds():
    labels = np.repeat([1, 0], 20)
    scores = np.r_[[5.0] * 18, [-5.0] * 2, [-5.0] * 20]  # sensitivity 18/20 = 0.90, specificity 20/20
    report = evaluation_report(labels, scores, {"default": 0.0, "who_triage": 0.0}, 20, seed=0)
    who = report["who_triage"]
    assert who["sensitivity"] == 0.9 and who["sensitivity_ci_low"] == pytest.approx(0.6990, abs=1e-4)
    assert who["meets_sensitivity_target"] is False and who["meets_minimum_specificity"] is True  # 0.839 >= 0.70

    row = threshold_row(labels, scores, 0.0, prevalence=0.05)
    assert row["sensitivity"] == 0.9 and row["meets_who_triage"] is False
    # PPV and NPV at the screening prevalence: Bayes' rule at the Wilson bounds, bracketing the point value.
    sensitivity_low, sensitivity_high = wilson_interval(18, 20)
    specificity_low, specificity_high = wilson_interval(20, 20)
    ppv_low = sensitivity_low * 0.05 / (sensitivity_low * 0.05 + (1 - specificity_low) * 0.95)
    npv_high = specificity_high * 0.95 / (specificity_high * 0.95 + (1 - sensitivity_high) * 0.05)
    assert row["ppv_at_prevalence_ci_low"] == pytest.approx(ppv_low) and row["ppv_at_prevalence"] == 1.0
    assert row["npv_at_prevalence_ci_high"] == pytest.approx(npv_high)
    assert row["npv_at_prevalence_ci_low"] < row["npv_at_prevalence"] < row["npv_at_prevalence_ci_high"]


def test_a_degenerate_paired_bootstrap_says_so():
    labels = np.repeat([1, 0], 10)
    perfect, also_perfect = np.r_[np.ones(10), np.zeros(10)] * 40, np.r_[np.ones(10), np.zeros(10)] * 7
    assert paired_auc_difference(labels, perfect, also_perfect, 30, seed=0)["degenerate"] is True
    noisy = np.r_[np.linspace(0, 1, 10), np.linspace(0.5, 1.5, 10)]
    assert paired_auc_difference(labels, perfect, noisy, 30, seed=0)["degenerate"] is False


# --------------------------------------------------------------------------- how many images the points rest on
def test_temperature_scaling_is_refused_before_training_on_a_small_validation_side(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "MINIMUM_VALIDATION_PER_CLASS", 20)  # the real minimum (conftest lowers it)
    data = make_organized(tmp_path / "data", train=8, test=2, size=40)
    ckpt = tmp_path / "ckpt"
    flags = ["--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
             "--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
             "--recipe", "original", "--val-fraction", "0.25", "--epochs", "1"]  # fmt: skip
    with exits_with(capsys, r"--temperature-scaling refused: validation holds only 2 Normal and 2 Tuberculosis"):
        trainer.main([*flags, "--temperature-scaling"])
    assert not list(ckpt.glob("*.pth"))  # refused before any training

    summary = trainer.main(flags)
    out = capsys.readouterr().out
    warning = "WARNING: validation holds only 2 Normal and 2 Tuberculosis image(s) (fewer than 20 of a class)"
    assert warning in out and out.index(warning) < out.index("Epoch 1:")  # said at start, before training
    best = Checkpoint.load(ckpt / "best_resnet50_tb_full_trained.pth")
    assert best.state.validation_counts == {"Normal": 2, "Tuberculosis": 2}
    assert summary["test_metrics_at_operating_point"]["validation_counts"] == {"Normal": 2, "Tuberculosis": 2}
    assert "chosen on validation (2 Normal and 2 Tuberculosis)" in out
    intervals = summary["test_metrics_at_operating_point"]["intervals"]
    assert intervals["sensitivity"]["method"] == "wilson" and intervals["sensitivity"]["trials"] == 2


def test_a_checkpoint_names_the_images_its_operating_points_came_from():
    counts = {"Normal": 31, "Tuberculosis": 7}
    checkpoint = Checkpoint({}, {}, 32, 0, RunState(validation_counts=counts))
    assert checkpoint.operating_points_chosen_on_text == "validation (31 Normal and 7 Tuberculosis)"
    site = Checkpoint({}, {}, 32, 0, RunState(validation_counts=counts), site={"name": "x", "Normal": 40,
                                                                              "Tuberculosis": 22})  # fmt: skip
    assert site.operating_points_chosen_on_text == "site sample x (40 Normal and 22 Tuberculosis)"
