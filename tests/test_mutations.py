"""Defects a mutation check found no test for: each test here fails when one line of the code it names is
changed the plausible wrong way (leaks left in validation, the wrong split fraction, state lost on resume,
patience never counted, the last epoch scored instead of the best, a 90% interval, a one-sided p-value),
and the data-layout errors each say their own sentence. Checked through the command line and the files
a run writes, wherever the behaviour shows there."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, learning_metrics, logits_by_hand, make_organized, write_xrays
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.utils import resample

import resnet50_tb_full as trainer
from tbcxr.comparison import paired_auc_difference
from tbcxr.evaluation import evaluation_report


def error_of(argv: list[str]) -> str:
    """The message a trainer command stops with: on stderr, exit status 1."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        trainer.main(argv)
    assert exited.value.code == 1, stderr.getvalue()
    return stderr.getvalue()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def prepare(data: Path, checkpoint_dir: Path, *flags: str) -> dict:
    trainer.main(["--prepare-only", "--data-dir", str(data), "--checkpoint-dir", str(checkpoint_dir), *TINY, *flags])
    return json.loads((checkpoint_dir / "split_manifest.json").read_text())


# --------------------------------------------------------------------------- the split
def test_copies_of_training_images_are_removed_from_validation_as_well_as_test(tmp_path):
    data = make_organized(tmp_path / "data", train=10, test=3, size=40)
    for name in ("Normal", "Tuberculosis"):  # six of each class's training images twice, under other names
        for i in range(6):
            shutil.copy(data / "train" / name / f"img_{i:03d}.png", data / "train" / name / f"copy_{i:03d}.png")
    shutil.copy(data / "train" / "Normal" / "img_007.png", data / "test" / "Normal" / "copy_of_train.png")

    manifest = prepare(data, tmp_path / "ckpt", "--val-fraction", "0.3")

    sha1 = manifest["content_sha1"]
    leaked_to = {leak["held_out_side"] for leak in manifest["leaks"] if leak["kind"] == "exact"}
    assert leaked_to == {"val", "test"}  # the split put copies of training images on both held-out sides
    training = {sha1[rel] for rel, _ in manifest["train"]}
    for side in ("val", "test"):
        assert manifest[side], side
        assert not [rel for rel, _ in manifest[side] if sha1[rel] in training], f"{side} keeps training images"
    removed = [leak[leak["held_out_side"]] for leak in manifest["leaks"]]
    assert not set(removed) & {rel for side in ("val", "test") for rel, _ in manifest[side]}


@pytest.mark.parametrize(("val_fraction", "test_fraction", "sizes"), [(0.1, 0.3, (25, 3, 12)), (0.3, 0.1, (25, 11, 4))])
def test_validation_and_test_sides_are_disjoint_and_of_their_fractions(tmp_path, val_fraction, test_fraction, sizes):
    data = tmp_path / "raw"  # no test/ folder: the test side is carved out by --test-fraction
    write_xrays(data / "Normal", 20, False, size=40)
    write_xrays(data / "Tuberculosis", 20, True, size=40)

    flags = ["--val-fraction", str(val_fraction), "--test-fraction", str(test_fraction)]
    manifest = prepare(data, tmp_path / "ckpt", *flags)

    # test: round(fraction x 40); validation: round(fraction x the 40 - test left), each stratified
    sides = {side: [rel for rel, _ in manifest[side]] for side in ("train", "val", "test")}
    assert tuple(len(sides[side]) for side in ("train", "val", "test")) == sizes
    everything = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert sorted(sides["train"] + sides["val"] + sides["test"]) == everything  # disjoint, and nothing lost
    for side in ("val", "test"):
        assert {label for _, label in manifest[side]} == {0, 1}, side
    assert [label for _, label in manifest["test"]].count(1) == sizes[2] // 2


# --------------------------------------------------------------------------- early stopping and resume
STATIC = [*TINY, *"--freeze-features --lr 1e-12 --early-stop-patience 2 --deterministic".split()]


def train_quietly(argv: list[str]) -> tuple[dict, str]:
    """The trainer's summary and console output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = trainer.main(argv)
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def static_runs(tmp_path_factory):
    """Final-layer runs whose weights cannot move (learning rate 1e-12, frozen BatchNorm): every epoch's
    validation is the first one's, so no epoch after the first is better. One runs uninterrupted; the
    other trains 2 epochs, finishes, and is resumed with the same limit of 5 epochs."""
    root = tmp_path_factory.mktemp("static_runs")
    data = make_organized(root / "data", train=12, test=4, size=40)
    common = ["--data-dir", str(data), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", *STATIC]
    uninterrupted = train_quietly([*common, "--checkpoint-dir", str(root / "whole"), "--epochs", "5"])
    first_part = train_quietly([*common, "--checkpoint-dir", str(root / "parts"), "--epochs", "2"])
    resumed = train_quietly(["--resume", str(root / "parts" / "last.pth"), "--epochs", "5"])
    return {"root": root, "whole": uninterrupted, "first_part": first_part, "resumed": resumed}


def test_early_stopping_ends_a_run_whose_validation_cannot_improve(static_runs):
    summary, out = static_runs["whole"]
    last = load(static_runs["root"] / "whole" / "last.pth")

    validation = {(h["val_loss"], h["val_auc"]) for h in last["history"]}
    assert len(validation) == 1  # the premise: every epoch validates alike
    assert summary["best_epoch"] == 1 and summary["epochs_trained"] == 3  # epoch 1, then 2 epochs of patience
    assert [h["epoch"] for h in last["history"]] == [1, 2, 3] and last["stale_epochs"] == 2
    assert "Early stopping: no better validation AUC for 2 epochs" in out and "Epoch 4:" not in out
    assert load(static_runs["root"] / "whole" / "best_resnet50_tb_finetuned.pth")["epoch"] == 1


def test_resume_restores_the_scheduler_the_best_score_and_the_patience_count(static_runs):
    root = static_runs["root"]
    (first, _), (resumed, out) = static_runs["first_part"], static_runs["resumed"]
    assert first["epochs_trained"] == 2 and "Resumed from" in out and "Epoch 3:" in out

    whole, parts = load(root / "whole" / "last.pth"), load(root / "parts" / "last.pth")
    # As if never interrupted: the resumed epoch 3 is not better than epoch 1 and is the second stale one.
    assert resumed["best_epoch"] == 1 and resumed["epochs_trained"] == 3
    assert "Early stopping: no better validation AUC for 2 epochs" in out
    for key in ("best_score", "best_epoch", "stale_epochs", "epoch"):
        assert parts[key] == whole[key], key
    assert parts["scheduler"] == whole["scheduler"]  # ReduceLROnPlateau's epoch count, best loss, bad epochs
    assert parts["scheduler"]["last_epoch"] == 3 and parts["scheduler"]["num_bad_epochs"] == 2
    assert learning_metrics(parts["history"]) == learning_metrics(whole["history"])
    assert load(root / "parts" / "best_resnet50_tb_finetuned.pth")["epoch"] == 1


# --------------------------------------------------------------------------- the final test
def cross_entropy(logits: torch.Tensor, labels: list[int]) -> float:
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels)))


def test_the_final_test_scores_the_best_checkpoint_not_the_last_epoch(stopped_early_run, tmp_path, monkeypatch):
    summary, ckpt = stopped_early_run["summary"], stopped_early_run["ckpt"]
    best, last = load(stopped_early_run["best"]), load(stopped_early_run["last"])
    assert best["epoch"] == summary["best_epoch"] < last["epoch"] == summary["epochs_trained"]  # the premise

    manifest = json.loads((ckpt / "split_manifest.json").read_text())
    images = [Path(manifest["data_dir"]) / rel for rel, _ in manifest["test"]]
    labels = [label for _, label in manifest["test"]]
    best_logits = logits_by_hand(stopped_early_run["best"], images)
    last_loss = cross_entropy(logits_by_hand(stopped_early_run["last"], images), labels)
    best_loss = cross_entropy(best_logits, labels)
    assert abs(last_loss - best_loss) > 1e-3 * best_loss  # the premise: the two weights score differently
    metrics = summary["test_metrics"]
    assert metrics["test_loss"] == pytest.approx(best_loss, rel=1e-4)
    probs = best_logits.softmax(dim=1)[:, 1].numpy()
    assert metrics["test_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(labels, probs >= 0.5))
    assert json.loads((ckpt / "summary.json").read_text())["test_metrics"] == metrics

    # --test-only of the best file, beside links to it and its split manifest, reports the same numbers.
    for name in (stopped_early_run["best"].name, "split_manifest.json"):
        (tmp_path / name).symlink_to(ckpt / name)
    monkeypatch.chdir(tmp_path)
    trainer.main(["--test-only", "--resume", str(tmp_path / stopped_early_run["best"].name), "--num-workers", "0",
                  "--bootstrap-resamples", "50"])  # fmt: skip
    (evaluated,) = tmp_path.glob(f"eval_{stopped_early_run['best'].stem}_split_test_*.json")
    rescored = json.loads(evaluated.read_text())["thresholds"]["default"]["metrics"]
    for name in ("accuracy", "sensitivity", "specificity", "auc", "average_precision"):
        assert metrics[f"test_{name}"] == pytest.approx(rescored[name]["value"]), name


# --------------------------------------------------------------------------- statistics against hand-made cases
def test_every_bootstrapped_interval_is_the_2_5_to_97_5_percentile_of_the_seeded_stratified_bootstrap():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], [30, 20])
    probs = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.2, len(labels)), 0, 1)

    report = evaluation_report(labels, probs, {"default": 0.5}, resamples=100, seed=11)

    # The resamples by hand: stratified by class, drawn from one RandomState(seed) in turn.
    state, index = np.random.RandomState(11), np.arange(len(labels))
    draws = [resample(index, stratify=labels, random_state=state) for _ in range(100)]
    by_hand = {  # proportions have Wilson intervals and the AUC Newcombe's (tests/test_saturation_and_intervals.py)
        "average_precision": [average_precision_score(labels[i], probs[i]) for i in draws],
        "balanced_accuracy": [balanced_accuracy_score(labels[i], probs[i] >= 0.5) for i in draws],
        "f1": [f1_score(labels[i], probs[i] >= 0.5) for i in draws],
    }
    metrics = report["thresholds"]["default"]["metrics"]
    for name, values in by_hand.items():
        low, high = np.percentile(values, [2.5, 97.5])
        assert (metrics[name]["ci_low"], metrics[name]["ci_high"]) == pytest.approx((low, high)), name
        assert metrics[name]["ci_low"] < metrics[name]["value"] < metrics[name]["ci_high"], name
        assert metrics[name]["method"] == "bootstrap", name
    # A 90% interval would be strictly narrower on this case.
    narrower = np.percentile(by_hand["average_precision"], [5, 95])
    assert metrics["average_precision"]["ci_high"] - metrics["average_precision"]["ci_low"] > narrower[1] - narrower[0]


def test_the_paired_p_value_is_two_sided_on_a_case_computed_by_hand():
    # Normal n1, n2 and TB t1, t2. B ranks every pair right; A ranks n2 above t1. A stratified resample
    # draws 2 Normal and 2 TB images with replacement: it holds n2 with probability 3/4, t1 likewise, so
    # AUC(B) - AUC(A) > 0 in 9/16 of the resamples and = 0 in the other 7/16, never < 0. Two-sided:
    # p = 2 x min(P(d <= 0), P(d >= 0)) = 2 x 7/16 = 0.875 (one-sided: 7/16 one way, 1 the other).
    labels = np.array([0, 0, 1, 1])
    probs_a = np.array([0.1, 0.6, 0.5, 0.9])
    probs_b = np.array([0.1, 0.4, 0.5, 0.9])

    forward = paired_auc_difference(labels, probs_a, probs_b, resamples=300, seed=0)
    backward = paired_auc_difference(labels, probs_b, probs_a, resamples=300, seed=0)

    assert forward["difference"] == pytest.approx(0.25)  # AUC 1 against 3/4
    assert forward["p_value"] == pytest.approx(0.875, abs=0.15)  # 300 resamples: standard error 0.04
    assert backward["p_value"] == forward["p_value"]  # the same test whichever model is A
    assert backward["difference"] == pytest.approx(-0.25)


# --------------------------------------------------------------------------- data-layout errors
def unreadable_tuberculosis(root: Path) -> None:
    for path in (root / "train" / "Tuberculosis").glob("*.png"):
        path.write_bytes(b"not a png")


@pytest.mark.parametrize(
    ("breakage", "sentence"),
    [
        (shutil.rmtree, "error: data folder '{given}' does not exist (set --data-dir or TB_DATA_DIR)"),
        (lambda root: shutil.rmtree(root / "test"),
         "{root} has a train folder but not train/ and test/ each with Normal and Tuberculosis"),
        (lambda root: shutil.rmtree(root / "train" / "Tuberculosis"),
         "{root} has a train folder but not train/ and test/ each with Normal and Tuberculosis"),
        (lambda root: (root / "train").rename(root / "training"), "no Normal and Tuberculosis folders found in {root}"),
        (lambda root: [p.unlink() for p in (root / "test" / "Normal").glob("*.png")],
         "class folder {root}/test/Normal holds no images"),
        (unreadable_tuberculosis, "no Tuberculosis images left on the train side once unreadable files were skipped"),
    ],
    ids=["missing", "no-test", "no-class-folder", "no-layout", "empty-class", "unreadable-class"],
)  # fmt: skip
def test_each_data_layout_error_says_its_own_sentence(tmp_path, breakage, sentence):
    root = make_organized(tmp_path / "data", train=3, test=2, size=40)
    breakage(root)

    message = error_of(["--prepare-only", "--data-dir", str(root), "--checkpoint-dir", str(tmp_path / "ckpt"), *TINY])

    assert sentence.format(given=root, root=root.resolve()) in message
    assert "Expected one of these layouts" in message and "--demo" in message
    assert not (tmp_path / "ckpt" / "split_manifest.json").exists()


def test_strict_stops_on_an_unreadable_file_that_a_default_run_skips(tmp_path):
    root = make_organized(tmp_path / "data", train=3, test=2, size=40)
    broken = root / "train" / "Normal" / "img_001.png"
    broken.write_bytes(b"not a png")

    message = error_of(["--prepare-only", "--strict", "--data-dir", str(root), "--checkpoint-dir",
                        str(tmp_path / "strict"), *TINY])  # fmt: skip
    assert "1 image files cannot be read (--strict)" in message and str(broken) in message
    assert not (tmp_path / "strict" / "split_manifest.json").exists()

    manifest = prepare(root, tmp_path / "default")
    assert manifest["unreadable"] == [["train/Normal/img_001.png", manifest["unreadable"][0][1]]]
    kept = {rel for side in ("train", "val", "test") for rel, _ in manifest[side]}
    assert "train/Normal/img_001.png" not in kept and "train/Normal/img_002.png" in kept
