"""Metrics against values worked out by hand: calibrated probabilities (the function, and what
--test-only and GradCAM report for a checkpoint with a stored calibration) and the ECE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import write_xrays

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint, RunState
from tbcxr.data import eval_transform
from tbcxr.decoding import load_xray
from tbcxr.metrics import Calibration, expected_calibration_error, tb_probability
from tbcxr.model import build_model


def test_tb_probability_is_the_sigmoid_of_the_scaled_and_shifted_logit_difference():
    logits = torch.tensor([[1.0, 3.0], [2.0, 0.0], [0.5, 0.5]])
    # P(TB) = sigmoid(scale * (l_tb - l_normal) + bias); d = 2, -2, 0.
    scaled = [1 / (1 + math.exp(-(0.5 * d - 1.0))) for d in (2, -2, 0)]
    identity = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.5]
    assert tb_probability(logits, Calibration(scale=0.5, bias=-1.0)).tolist() == pytest.approx(scaled, abs=1e-6)
    assert tb_probability(logits, Calibration()).tolist() == pytest.approx(identity, abs=1e-6)


def test_expected_calibration_error_by_hand():
    labels = [0, 0, 1, 1, 1]
    probs = [0.05, 0.15, 0.12, 0.85, 0.95]
    # Ten bins of width 0.1 hold {0.05}, {0.15, 0.12}, {0.85}, {0.95}; ECE = sum of (share of images)
    # x |mean label - mean probability| = 0.2 x 0.05 + 0.4 x |0.5 - 0.135| + 0.2 x 0.15 + 0.2 x 0.05.
    assert expected_calibration_error(labels, probs) == pytest.approx(0.196)
    # Two bins: {0.05, 0.15, 0.12} (labels 0, 0, 1) and {0.85, 0.95}: 0.6 x |1/3 - 0.32/3| + 0.4 x 0.1.
    assert expected_calibration_error(labels, probs, bins=2) == pytest.approx(0.176)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0  # a probability of 1 is in the last bin


def test_stored_calibration_is_applied_by_test_only_and_gradcam(tmp_path):
    calibration = Calibration(scale=0.4, bias=-0.8)
    torch.manual_seed(0)
    model = build_model("none").eval()
    path = tmp_path / "ckpt" / "best.pth"
    Checkpoint.from_model(model, {"image_size": 32}, 32, state=RunState(calibration=calibration)).save(path)
    folder = tmp_path / "hospital"
    samples = [(str(p), 0) for p in write_xrays(folder / "Normal", 4, False)]
    samples += [(str(p), 1) for p in write_xrays(folder / "Tuberculosis", 4, True)]
    labels = np.array([label for _, label in samples])
    checkpoint = Checkpoint.load(path)
    with torch.no_grad():
        logits = model(torch.stack([eval_transform(32)(load_xray(p)) for p, _ in samples])).double()
    expected = torch.sigmoid(0.4 * (logits[:, 1] - logits[:, 0]) - 0.8).numpy()
    assert np.abs(expected - torch.softmax(logits, dim=1)[:, 1].numpy()).min() > 1e-3  # the calibration matters here

    fresh = checkpoint.model()
    explained = gradcam.explain(
        fresh, fresh.layer4, samples, checkpoint, torch.device("cpu"), "gradcam", "predicted", 8, False
    )
    assert [e.prob_tb for e in explained] == pytest.approx(list(expected), abs=1e-5)

    report = trainer.main(
        [
            "--test-only",
            "--resume",
            str(path),
            "--data-dir",
            str(folder),
            "--num-workers",
            "0",
            "--bootstrap-resamples",
            "20",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    assert report["p_tb_calibration"] == {"scale": 0.4, "bias": -0.8} and report["n_images"] == len(samples)
    # The Brier score is the mean squared error of the probabilities: it sees any other calibration.
    assert report["calibration"]["brier_score"] == pytest.approx(np.mean((expected - labels) ** 2), abs=1e-6)
