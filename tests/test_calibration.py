"""Calibration of P(TB): Platt scaling (a scale and a bias of the logit difference) undoes the prior shift of
oversampled training where a temperature cannot; the trainer stores the fit, every reader applies it; the
identity is the network's softmax; checkpoints of format 1 (a temperature) still load, unknown formats do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from tbcxr.checkpoint import CHECKPOINT_FORMAT, Checkpoint, read_json
from tbcxr.config import MANIFEST_NAME, SUMMARY_NAME
from tbcxr.data import XrayDataset, eval_transform
from tbcxr.errors import CheckpointError
from tbcxr.evaluation import predict_checkpoint
from tbcxr.metrics import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    probability_of,
    select_thresholds,
    tb_probability,
)
from tbcxr.model import predict_logits
from tbcxr.split import manifest_samples


def oversampled_logits(normal: int, tb: int, seed: int):
    """Labels and two-class logits of a model trained on 1:1 batches of a data set with `normal`:`tb` images.

    Scores s ~ N(-1, 1) for Normal and N(1, 1) for TB: the true log-odds are log(tb / normal) + 2s. Balanced
    batches teach the prior 1:1, so the model's logit difference is 2s = true log-odds + log(normal / tb)."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(normal, dtype=int), np.ones(tb, dtype=int)]
    scores = rng.normal(2 * labels - 1.0, 1.0)
    logits = np.stack([np.zeros_like(scores), 2 * scores], axis=1)
    return labels, torch.tensor(logits, dtype=torch.float32)


def fitted_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Temperature scaling: the T minimising the NLL of softmax(logits / T)."""
    targets = torch.as_tensor(labels)

    def nll(temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits.double() / temperature, targets))

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def test_platt_scaling_undoes_the_prior_shift_of_oversampling_where_a_temperature_cannot():
    val_labels, val_logits = oversampled_logits(5000, 1000, seed=0)
    test_labels, test_logits = oversampled_logits(5000, 1000, seed=1)
    prevalence = 1 / 6

    def ece_and_mean(calibration: Calibration) -> tuple[float, float]:
        probs = tb_probability(test_logits, calibration)
        return expected_calibration_error(test_labels, probs), float(probs.mean())

    before = ece_and_mean(Calibration())
    temperature = ece_and_mean(Calibration(scale=1 / fitted_temperature(val_logits, val_labels)))
    platt = fit_calibration(val_logits.numpy(), val_labels)
    after = ece_and_mean(platt)

    assert before[0] > 0.08 and before[1] > prevalence + 0.08  # 1:1 batches inflate P(TB)
    assert temperature[0] > 0.08 and temperature[1] > prevalence + 0.08  # a scale alone cannot remove the offset
    assert after[0] < 0.03 and abs(after[1] - prevalence) < 0.02
    assert platt.bias == pytest.approx(-np.log(5), abs=0.15) and platt.scale == pytest.approx(1.0, abs=0.1)


def test_platt_scaling_stays_finite_and_keeps_the_ranking_on_separable_validation():
    logits = np.array([[0.0, -3.0], [0.0, -2.0], [0.0, 4.0], [0.0, 5.0]])
    calibration = fit_calibration(logits, np.array([0, 0, 1, 1]))
    probs = tb_probability(torch.tensor(logits), calibration)
    assert 0 < calibration.scale < 5  # unpenalised 0/1 targets would push it towards infinity
    assert np.all(np.diff(probs) >= 0) and 0 < probs.min() and probs.max() < 1  # ranked, not saturated
    assert len(np.unique(probs)) == 4


def test_a_validation_set_ranked_the_wrong_way_round_never_reverses_the_scores():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    d = np.where(labels == 1, -1.5, 1.5) + rng.normal(0, 1, 80)  # TB scored lower: AUC well below 0.5
    logits = np.stack([np.zeros(80), d], axis=1)
    calibration = fit_calibration(logits, labels)
    assert calibration.scale > 0
    probs = tb_probability(torch.as_tensor(logits), calibration)
    assert np.array_equal(np.argsort(probs, kind="stable"), np.argsort(d, kind="stable"))


def test_identity_calibration_gives_the_softmax():
    logits = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 8
    softmax = logits.double().softmax(dim=1)[:, 1].numpy()
    assert tb_probability(logits, Calibration()) == pytest.approx(softmax, rel=1e-12, abs=1e-300)
    assert Checkpoint({}, {}, 32, 0).state.calibration == Calibration(scale=1.0, bias=0.0)


def format_1_file(path, temperature: float):
    """A checkpoint as format 1 wrote it: the same keys, with a softmax temperature instead of a calibration."""
    plain = Checkpoint({"w": torch.ones(3)}, {}, 32, 3).to_dict()
    del plain["calibration"], plain["validation_counts"]
    thresholds = {"default": 0.5, "youden": 0.3}  # P(TB) thresholds, as formats 1 and 2 stored them
    torch.save(plain | {"format": 1, "temperature": temperature, "thresholds": thresholds}, path)
    return path


def test_a_format_1_checkpoint_loads_its_temperature_as_a_scale_without_bias(tmp_path):
    assert CHECKPOINT_FORMAT == 3
    loaded = Checkpoint.load(format_1_file(tmp_path / "old.pth", temperature=2.5))

    assert loaded.state.calibration == Calibration(scale=0.4, bias=0.0)
    assert loaded.operating_threshold == pytest.approx(math.log(0.3 / 0.7)) and torch.equal(
        loaded.model_state["w"], torch.ones(3)
    )
    logits = torch.tensor([[0.3, 2.0], [1.0, -1.5]])
    assert tb_probability(logits, loaded.state.calibration).tolist() == pytest.approx(
        (logits / 2.5).softmax(dim=1)[:, 1].tolist(), abs=1e-7
    )  # the P(TB) format 1 gave
    untempered = Checkpoint.load(format_1_file(tmp_path / "plain.pth", temperature=1.0))
    assert untempered.state.calibration == Calibration()  # exactly the softmax


def test_a_checkpoint_of_an_unknown_format_is_refused_saying_which_formats_are_read(tmp_path):
    path = tmp_path / "future.pth"
    torch.save(Checkpoint({"w": torch.ones(3)}, {}, 32, 3).to_dict() | {"format": 7}, path)

    with pytest.raises(CheckpointError) as error:
        Checkpoint.load(path)

    assert f"cannot use checkpoint {path}: it is in checkpoint format 7, which this version does not read " in str(
        error.value
    )
    assert "(it reads formats 1, 2, 3;" in str(error.value)


def test_the_trainer_stores_the_platt_calibration_fitted_on_validation_and_predictions_use_it(trained_run):
    """trained_run trains with --temperature-scaling."""
    best = Checkpoint.load(trained_run["best"])
    manifest = read_json(trained_run["best"].parent / MANIFEST_NAME)
    val = manifest_samples(manifest, "val")
    loader = torch.utils.data.DataLoader(XrayDataset(val, eval_transform(32)), batch_size=16)
    labels, logits, _ = predict_logits(best.model(), loader, torch.device("cpu"))

    calibration = best.state.calibration
    expected = fit_calibration(logits.numpy(), labels)
    assert calibration.scale == pytest.approx(expected.scale, rel=1e-3, abs=1e-4)
    assert calibration.bias == pytest.approx(expected.bias, rel=1e-3, abs=1e-4)
    assert calibration != Calibration()

    # Every reader of the checkpoint gives sigmoid(scale * d + bias), not the network's softmax.
    d = (logits[:, 1] - logits[:, 0]).double()
    calibrated = torch.sigmoid(calibration.scale * d + calibration.bias).numpy()
    _, scores = predict_checkpoint(best, val, torch.device("cpu"), 16, 0)
    probs = probability_of(scores)
    assert probs == pytest.approx(calibrated, abs=1e-5)
    assert np.abs(probs - logits.softmax(dim=1)[:, 1].numpy()).max() > 1e-3  # the calibration changed P(TB)
    # The stored operating points are thresholds on the calibrated log-odds.
    log_odds = (calibration.scale * d + calibration.bias).numpy()
    assert best.state.thresholds == pytest.approx(select_thresholds(labels, log_odds), abs=1e-5)

    # summary.json's test metrics at 0.5 are those of the calibrated P(TB), as --test-only reports them.
    test = manifest_samples(manifest, "test")
    test_labels, test_scores = predict_checkpoint(best, test, torch.device("cpu"), 16, 0)
    summary = read_json(trained_run["best"].parent / SUMMARY_NAME)
    accuracy = float(np.mean((test_scores >= 0.0) == test_labels))
    assert summary["test_metrics"]["test_accuracy"] == pytest.approx(accuracy)
