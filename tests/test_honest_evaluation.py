"""Issue-11 guarantees: operating points belong to their weights, exact thresholds, no training
image scored as a test image, fp32 scores for every metric, and --compare refuses unfair pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exits_with, make_organized, write_xrays
from PIL import Image
from sklearn.metrics import roc_auc_score

import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint, read_json, write_json
from tbcxr.config import MANIFEST_NAME
from tbcxr.errors import DataError
from tbcxr.evaluation import predict_checkpoint
from tbcxr.layout import discover_dataset
from tbcxr.metrics import classification_metrics, format_p_value, probability_of, select_thresholds
from tbcxr.split import held_out_samples, manifest_samples

TINY = ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--weights", "none", "--recipe", "original"]


def train(data, ckpt_dir: Path, uri: str, *extra) -> dict:
    return trainer.main(
        ["--data-dir", str(data), "--checkpoint-dir", str(ckpt_dir), "--tracking-uri", uri, *TINY, *extra]
    )


def score_test_only(checkpoint: Path, uri: str, *extra) -> dict:
    return trainer.main(
        ["--test-only", "--resume", str(checkpoint), "--bootstrap-resamples", "50", "--tracking-uri", uri, *extra]
    )


# --------------------------------------------------------------------------- exact operating points
def test_youden_threshold_lies_in_the_middle_of_the_maximising_stretch():
    # Separable: every t in (0.3, 0.7] gives J = 1; the lowest TB score (0.7) would leave no margin.
    assert select_thresholds([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9])["youden"] == pytest.approx(0.5)
    # J = 0.5 first on (0.6, 0.8]: the middle is 0.7, which still calls only the 0.8 case positive.
    assert select_thresholds([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8])["youden"] == pytest.approx(0.7)


def test_who_triage_point_is_the_highest_threshold_with_sensitivity_090():
    tb_scores, normal_scores = np.linspace(0.5, 0.95, 10), np.linspace(0.05, 0.4, 10)
    labels, probs = [1] * 10 + [0] * 10, np.r_[tb_scores, normal_scores]

    who = select_thresholds(labels, probs)["who_triage"]

    # 9 of 10 TB cases score >= 0.55: that is the highest cut reaching 0.90 (roc_curve's default drops it as
    # an intermediate point of the vertical segment and returns 0.5). The point sits midway between that TB
    # score and the next lower score (0.5), like Youden's, not on the TB score itself.
    assert who == pytest.approx(0.525)
    assert classification_metrics(labels, probs, who)["sensitivity"] == pytest.approx(0.9)
    assert classification_metrics(labels, probs, 0.56)["sensitivity"] < 0.9


def test_bootstrap_p_values_of_zero_print_as_an_upper_bound():
    assert format_p_value(0.0, 1000) == "p < 0.002"  # two-sided: the resolution is 2 / resamples
    assert format_p_value(0.0002, 10000) == "p < 0.001"
    assert format_p_value(0.0123, 1000) == "p = 0.012"


# --------------------------------------------------------------------------- per-checkpoint operating points
def test_every_checkpoint_carries_the_operating_points_of_its_own_weights(tmp_path):
    data = make_organized(tmp_path / "data", train=16, test=4, size=40)
    ckpt = tmp_path / "ckpt"
    train(data, ckpt, f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs", "3", "--save-every", "1", "--lr", "1e-2",
          "--temperature-scaling", "--val-fraction", "0.3")  # fmt: skip
    manifest = read_json(ckpt / MANIFEST_NAME)
    periodic = sorted(ckpt.glob("*_epoch*_resnet50_tb_full_trained.pth"))
    checkpoints = [Checkpoint.load(p) for p in periodic] + [Checkpoint.load(ckpt / "last.pth")]
    best_epoch = checkpoints[-1].state.best_epoch
    assert any(c.state.epoch != best_epoch for c in checkpoints)  # the case the old code got wrong

    for checkpoint in checkpoints:
        labels, probs = predict_checkpoint(checkpoint, manifest_samples(manifest, "val"), torch.device("cpu"), 16, 0)
        assert checkpoint.state.operating_points_epoch == checkpoint.state.epoch
        assert checkpoint.state.thresholds == pytest.approx(select_thresholds(labels, probs), abs=1e-6)


# --------------------------------------------------------------------------- fp32 scores and model selection
def test_model_selection_and_summary_agree_with_a_fresh_test_only_under_cpu_bf16_amp(tmp_path):
    data = make_organized(tmp_path / "data", train=16, test=6, size=40)
    ckpt, uri = tmp_path / "ckpt", f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(data, ckpt, uri, "--epochs", "3", "--amp", "--lr", "1e-2", "--val-fraction", "0.3")

    last = Checkpoint.load(ckpt / "last.pth")
    history = last.state.history
    best = max(history, key=lambda h: (h["val_auc"], -h["val_loss"]))
    assert summary["best_epoch"] == best["epoch"] == last.state.best_epoch

    # Validation under --amp scored the weights in float32: the logged loss is the fp32 loss.
    manifest = read_json(ckpt / MANIFEST_NAME)
    labels, scores = predict_checkpoint(last, manifest_samples(manifest, "val"), torch.device("cpu"), 16, 0)
    probs = probability_of(scores)
    fp32_loss = float(np.mean(-np.log(np.where(labels == 1, probs, 1 - probs))))
    assert history[-1]["val_loss"] == pytest.approx(fp32_loss, abs=1e-5)

    report = score_test_only(ckpt / "best_resnet50_tb_full_trained.pth", uri)
    fresh_auc = report["thresholds"]["default"]["metrics"]["auc"]["value"]
    assert round(summary["test_metrics"]["test_auc"], 4) == round(fresh_auc, 4)
    assert summary["test_metrics"]["test_accuracy"] == pytest.approx(
        report["thresholds"]["default"]["metrics"]["accuracy"]["value"]
    )


# --------------------------------------------------------------------------- no training image scored as a test image
@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """One epoch on a raw-layout folder (the split comes from the manifest)."""
    root = tmp_path_factory.mktemp("raw_run")
    data = root / "kaggle"
    write_xrays(data / "Normal", 15, False, size=40, seed=1)
    write_xrays(data / "Tuberculosis", 15, True, size=40, seed=1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    train(data, root / "ckpt", uri, "--epochs", "1")
    return {"root": root, "data": data, "uri": uri, "best": root / "ckpt" / "best_resnet50_tb_full_trained.pth"}


def test_without_data_dir_a_training_folder_no_longer_there_asks_for_its_new_place(raw_run, tmp_path):
    manifest = read_json(raw_run["best"].parent / MANIFEST_NAME)
    write_json(manifest | {"data_dir": str(tmp_path / "moved_away")}, tmp_path / MANIFEST_NAME)
    (tmp_path / raw_run["best"].name).symlink_to(raw_run["best"])
    with pytest.raises(DataError, match="moved_away that .* lists is gone; pass --data-dir with where it is now"):
        held_out_samples(tmp_path / raw_run["best"].name)


def test_a_moved_copy_of_the_training_folder_scores_exactly_the_manifest_test_images(raw_run, tmp_path, capsys):
    moved = shutil.copytree(raw_run["data"], tmp_path / "mounted_elsewhere" / "kaggle")
    manifest = read_json(raw_run["best"].parent / MANIFEST_NAME)

    samples, source = held_out_samples(raw_run["best"], discover_dataset(moved))
    report = score_test_only(raw_run["best"], raw_run["uri"], "--data-dir", str(moved))

    assert sorted(Path(p).relative_to(moved).as_posix() for p, _ in samples) == sorted(r for r, _ in manifest["test"])
    assert report["n_images"] == len(manifest["test"])
    assert report["class_counts"] == {
        name: count for name, count in zip(("Normal", "Tuberculosis"), np.bincount([lb for _, lb in manifest["test"]]))
    }
    left_out = len(manifest["train"]) + len(manifest["val"])
    assert f"Left out {left_out} of 30 images" in capsys.readouterr().out
    assert "less" in source


def test_exact_and_near_copies_of_training_images_in_another_folder_are_left_out(raw_run, tmp_path, capsys):
    manifest = read_json(raw_run["best"].parent / MANIFEST_NAME)
    train_rel = manifest["train"][0][0]
    external = tmp_path / "hospital_b"
    write_xrays(external / "Normal", 4, False, size=40, seed=50)
    write_xrays(external / "Tuberculosis", 4, True, size=40, seed=50)
    shutil.copy(raw_run["data"] / train_rel, external / "Normal" / "exact.png")
    Image.open(raw_run["data"] / train_rel).save(external / "Normal" / "resaved.jpg", quality=90)

    samples, source = held_out_samples(raw_run["best"], discover_dataset(external))

    assert sorted(Path(p).name for p, _ in samples if "img_" not in Path(p).name) == []
    assert len(samples) == 8
    out = capsys.readouterr().out
    assert "1 copies of its training images" in out and "1 near copies of its training images" in out


def test_a_folder_of_training_images_only_is_refused(raw_run, tmp_path, capsys):
    manifest = read_json(raw_run["best"].parent / MANIFEST_NAME)
    only_train = tmp_path / "only_train"
    for rel, _ in manifest["train"]:
        (only_train / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw_run["data"] / rel, only_train / rel)

    with exits_with(capsys, "nothing is left to test on"):
        score_test_only(raw_run["best"], raw_run["uri"], "--data-dir", str(only_train))


def test_organized_test_side_leaves_out_dedup_removed_and_unreadable_images(tmp_path, capsys):
    data = make_organized(tmp_path / "data", train=12, test=4, size=40)
    copy = data / "test" / "Tuberculosis" / "copy_of_train.png"
    shutil.copy(data / "train" / "Tuberculosis" / "img_000.png", copy)  # leaks a training image into test
    (data / "test" / "Normal" / "broken.png").write_bytes(b"not a png")
    ckpt, uri = tmp_path / "ckpt", f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(data, ckpt, uri, "--epochs", "1", "--dedup")
    manifest = read_json(ckpt / MANIFEST_NAME)
    assert "Tuberculosis/copy_of_train.png" not in {r.split("/", 1)[1] for r, _ in manifest["test"]}

    report = score_test_only(ckpt / "best_resnet50_tb_full_trained.pth", uri, "--data-dir", str(data))

    assert report["n_images"] == 8  # 4 per class; the copy and the broken file are left out
    out = capsys.readouterr().out
    assert "Left out 2 of 10 images" in out and "1 unreadable" in out


# --------------------------------------------------------------------------- --compare
def test_compare_two_different_checkpoints_and_refuse_one_trained_on_another_split(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frozen_dir = tmp_path / "frozen"
    train(
        trained_run["data"],
        frozen_dir,
        trained_run["uri"],
        "--epochs",
        "1",
        "--freeze-features",
        "--temperature-scaling",
        "--val-fraction",
        "0.3",
    )  # fmt: skip  (same data and seed: same split)
    frozen = Checkpoint.load(frozen_dir / "best_resnet50_tb_finetuned.pth")
    # --freeze-features end to end: only fc trains, in its own experiment, and BatchNorm statistics stay put.
    assert frozen.trainable_parameters == 4098 and frozen.experiment == "ResNet50_TB_FineTuning"
    for key, value in frozen.model_state.items():
        if key.endswith("running_mean"):
            assert torch.equal(value, torch.zeros_like(value)), key
        elif key.endswith("running_var"):
            assert torch.equal(value, torch.ones_like(value)), key
    full = Checkpoint.load(trained_run["best"])

    comparison = trainer.main(["--compare", str(frozen_dir / "best_resnet50_tb_finetuned.pth"),
                               str(trained_run["best"]), "--bootstrap-resamples", "200",
                               "--tracking-uri", trained_run["uri"]])  # fmt: skip

    samples = manifest_samples(read_json(trained_run["best"].parent / MANIFEST_NAME), "test")
    labels, probs_a = predict_checkpoint(frozen, samples, torch.device("cpu"), 16, 0)
    _, probs_b = predict_checkpoint(full, samples, torch.device("cpu"), 16, 0)
    expected = roc_auc_score(labels, probs_b) - roc_auc_score(labels, probs_a)
    assert comparison["auc_difference"]["difference"] == pytest.approx(expected)
    written = json.loads((tmp_path / "reports" / "comparison.json").read_text())
    assert written["auc_difference"]["difference"] == pytest.approx(expected)
    assert [t["trainable_parameters"] for t in written["training"]] == [4098, 23_512_130]
    markdown = (tmp_path / "reports" / "comparison.md").read_text()
    assert "| Trainable parameters | 4,098 | 23,512,130 |" in markdown
    assert f"ROC AUC difference (B - A): {expected:+.4f}" in markdown


def test_compare_refuses_a_checkpoint_trained_on_another_split(raw_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other_split = tmp_path / "other_split"  # raw layout: another seed draws another test side
    train(raw_run["data"], other_split, raw_run["uri"], "--epochs", "1", "--seed", "7")

    with exits_with(capsys, "trained on a different split"):
        trainer.main(["--compare", str(raw_run["best"]), str(other_split / "best_resnet50_tb_full_trained.pth"),
                      "--bootstrap-resamples", "50", "--tracking-uri", raw_run["uri"]])  # fmt: skip


def test_resuming_from_a_weights_only_best_checkpoint_is_a_clear_error(trained_run, tmp_path, capsys):
    with exits_with(capsys, "holds weights only"):
        trainer.main(["--resume", str(trained_run["best"]), "--checkpoint-dir", str(tmp_path / "ckpt")])
