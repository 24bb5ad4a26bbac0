"""Flags no other test ran, each checked for its effect in the files and console of a real run.

Trainer: --selection auc3, --backbone-lr-mult, --balance none, a plateau drop, the default MLflow store,
--no-amp, --clahe and --intensity-augment on their own, worker processes, --lr-scale under torchrun,
--compare with --data-dir. GradCAM: --target, --batch-size, --seed, every --method, --images DIR.
Runs that several tests read are made once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, copied_store, learning_metrics, logits_by_hand, make_organized, write_xrays
from mlflow.tracking import MlflowClient

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr.tracking import server_answers


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_quietly(main, argv: list[str]) -> tuple[dict, str]:
    """A script's result and console output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(argv)
    return result, out.getvalue()


# --------------------------------------------------------------------------- one full-training run, many flags
SELECTION_RUN = "--epochs 4 --selection auc3 --balance none --backbone-lr-mult 0.5 --scheduler-patience 0".split()


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory):
    """4 epochs of full training on imbalanced data (16 Normal, 8 TB), started from its own folder with
    no --tracking-uri and no MLFLOW_TRACKING_URI: the default store, unless a server answers on 5003."""
    root = tmp_path_factory.mktemp("selection_run")
    data = root / "data"
    write_xrays(data / "train" / "Normal", 16, False, size=40)
    write_xrays(data / "train" / "Tuberculosis", 8, True, size=40)
    write_xrays(data / "test" / "Normal", 4, False, size=40, seed=1)
    write_xrays(data / "test" / "Tuberculosis", 4, True, size=40, seed=1)
    default_store = not server_answers("http://127.0.0.1:5003")  # never log tests into someone's server
    tracking = [] if default_store else ["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    argv = ["--data-dir", str(data), "--checkpoint-dir", str(root / "ckpt"), *TINY, *SELECTION_RUN, "--deterministic"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary, out = run_quietly(trainer.main, [*argv, *tracking])
    last = load(root / "ckpt" / "last.pth")
    return {"root": root, "summary": summary, "out": out, "last": last, "default_store": default_store}


def test_auc3_selection_keeps_the_epoch_ending_the_best_3_epoch_mean(selection_run):
    last, summary = selection_run["last"], selection_run["summary"]
    history = last["history"]
    auc, loss = [h["val_auc"] for h in history], [h["val_loss"] for h in history]
    windows = {end: [float(np.mean(auc[end - 3 : end])), -float(np.mean(loss[end - 3 : end]))] for end in (3, 4)}
    best = max(windows, key=lambda end: windows[end])
    assert summary["best_epoch"] == best == last["best_epoch"]  # never epoch 1 or 2: their windows are not full
    assert last["best_score"] == pytest.approx(windows[best])
    assert windows[best][0] != pytest.approx(auc[best - 1]) or windows[best][1] != pytest.approx(-loss[best - 1])
    assert load(selection_run["root"] / "ckpt" / "best_resnet50_tb_full_trained.pth")["epoch"] == best


def test_backbone_lr_mult_sets_the_backbone_rate_against_the_classifier_rate(selection_run):
    last = selection_run["last"]
    first = last["history"][0]
    assert (first["lr_backbone"], first["lr_classifier"]) == pytest.approx((0.5e-4, 1e-4))
    for epoch in last["history"]:  # the schedule lowers both alike
        assert epoch["lr_backbone"] == pytest.approx(0.5 * epoch["lr_classifier"])
    rates = {group["name"]: group["lr"] for group in last["optimizer"]["param_groups"]}
    assert rates["backbone"] == pytest.approx(0.5 * rates["classifier"])
    assert "Backbone 5.00e-05, Classifier 1.00e-04" in selection_run["out"]


def test_balance_none_trains_on_the_training_side_as_it_is(selection_run):
    last = selection_run["last"]
    manifest = json.loads((selection_run["root"] / "ckpt" / "split_manifest.json").read_text())
    train_labels = [label for _, label in manifest["train"]]
    batches = len(train_labels) // 8  # batch size 8, last partial batch dropped
    oversampled = 2 * max(train_labels.count(0), train_labels.count(1)) // 8
    assert batches != oversampled  # the premise: oversampling would take more steps
    steps = {int(state["step"]) for state in last["optimizer"]["state"].values()}
    assert steps == {4 * batches}
    assert last["config"]["balance"] == "none"


def test_the_plateau_schedule_divides_the_rates_by_ten_after_each_epoch_without_a_better_loss(selection_run):
    last = selection_run["last"]
    history = last["history"]
    rates = [h["lr_classifier"] for h in history] + [
        next(g["lr"] for g in last["optimizer"]["param_groups"] if g["name"] == "classifier")
    ]
    # ReduceLROnPlateau, patience 0: better means lower than the best loss so far by a relative 1e-4.
    best, expected = float("inf"), [1e-4]
    for epoch in history:
        better = epoch["val_loss"] < best * (1 - 1e-4)
        best = epoch["val_loss"] if better else best
        expected.append(expected[-1] * (1 if better else 0.1))
    assert rates == pytest.approx(expected, rel=1e-9)
    assert rates[-1] < rates[0]  # the premise: the rate dropped during the run


def test_without_tracking_uri_a_run_logs_to_mlflow_db_in_its_working_folder(selection_run):
    if not selection_run["default_store"]:
        pytest.skip("an MLflow server answers on 127.0.0.1:5003: the default choice is that server")
    root, summary = selection_run["root"], selection_run["summary"]
    assert "no MLflow server on port 5003; logging to mlflow.db in this folder" in selection_run["out"]
    assert summary["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}"  # absolute: --resume finds it anywhere
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4]
    assert run.info.artifact_uri.startswith((root / "mlruns").as_uri())


# --------------------------------------------------------------------------- one-epoch runs that differ in one flag
BEST = "best_resnet50_tb_finetuned.pth"
VARIANTS = {
    "default": [],
    "amp": ["--amp"],
    "no_amp": ["--no-amp"],
    "clahe": ["--clahe"],
    "intensity": ["--intensity-augment"],
    "per_image": ["--no-fast-data"],
    "per_image_workers": ["--no-fast-data", "--num-workers", "2"],
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """One final-layer epoch per variant, all else equal and deterministic."""
    root = tmp_path_factory.mktemp("variants")
    data = make_organized(root / "data", train=12, test=4, size=40)
    common = ["--data-dir", str(data), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", *TINY]
    common += "--freeze-features --epochs 1 --deterministic".split()
    runs = {}
    for name, flags in VARIANTS.items():
        trainer.main([*common, "--checkpoint-dir", str(root / name), *flags])
        runs[name] = {"last": load(root / name / "last.pth"), "best": load(root / name / BEST)}
    return runs


def history(run: dict) -> list[dict]:
    return learning_metrics(run["last"]["history"])


def test_no_amp_trains_in_float32_and_amp_does_not(variants):
    assert history(variants["no_amp"]) == history(variants["default"])  # the CPU default is float32
    assert history(variants["amp"])[0]["train_loss"] != history(variants["default"])[0]["train_loss"]
    assert variants["no_amp"]["best"]["config"]["amp"] is False and variants["amp"]["best"]["config"]["amp"] is True


def test_clahe_on_its_own_equalises_validation_and_test_images_and_is_recorded(variants):
    clahe, default = variants["clahe"], variants["default"]
    settings = clahe["best"]["preprocessing"]["clahe"]
    assert (settings["clip_limit"], tuple(settings["tile_grid"])) == (2.0, (8, 8))
    assert clahe["best"]["config"]["intensity_augment"] is False and clahe["best"]["config"]["recipe"] == "original"
    assert history(clahe)[0]["val_loss"] != history(default)[0]["val_loss"]
    assert default["best"]["preprocessing"] == {}


def test_intensity_augment_on_its_own_changes_training_images_only(variants):
    intensity, default = variants["intensity"], variants["default"]
    assert history(intensity)[0]["train_loss"] != history(default)[0]["train_loss"]
    assert intensity["best"]["preprocessing"] == {}  # evaluation and GradCAM see the images unchanged
    assert intensity["best"]["config"]["clahe"] is False and intensity["best"]["config"]["intensity_augment"] is True


def test_training_with_worker_processes_sees_the_same_batches_as_without(variants):
    with_workers, without = variants["per_image_workers"], variants["per_image"]
    assert with_workers["best"]["config"]["num_workers"] == 2
    assert history(with_workers) == history(without)
    assert with_workers["last"]["model"]["fc.weight"].equal(without["last"]["model"]["fc.weight"])


# --------------------------------------------------------------------------- torchrun
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_organized(tmp_path_factory.mktemp("lr_scale") / "data", train=8, test=2, size=40)


@pytest.mark.parametrize(("scale", "factor", "shown"), [("linear", 2.0, "x 2"), ("sqrt", 2**0.5, "x 1.41421")])
def test_lr_scale_multiplies_the_rates_by_the_process_count_or_its_root(
    small_data, tmp_path, migrated_store, scale, factor, shown
):
    uri = copied_store(tmp_path, migrated_store)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "train_without_model_logging.py"), "--data-dir", str(small_data), "--checkpoint-dir",
         str(tmp_path / "ckpt"), "--tracking-uri", uri, *TINY, "--freeze-features", "--epochs", "1",
         "--lr-scale", scale],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"learning rates {shown} (--lr-scale {scale})" in result.stdout
    last = load(tmp_path / "ckpt" / "last.pth")
    assert [group["lr"] for group in last["optimizer"]["param_groups"]] == pytest.approx([1e-3 * factor])
    assert last["history"][0]["lr_classifier"] == pytest.approx(1e-3 * factor)


# --------------------------------------------------------------------------- --compare on another folder
def test_compare_with_data_dir_scores_both_checkpoints_on_that_folder(stopped_early_run, tmp_path, monkeypatch):
    external = tmp_path / "hospital_b"  # raw layout: every image of it is scored
    write_xrays(external / "Normal", 5, False, size=48, seed=9)
    write_xrays(external / "Tuberculosis", 5, True, size=48, seed=9)
    monkeypatch.chdir(tmp_path)  # reports/ goes to the working folder

    comparison, out = run_quietly(trainer.main, [
        "--compare", str(stopped_early_run["best"]), str(stopped_early_run["last"]), "--data-dir", str(external),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--num-workers", "0", "--bootstrap-resamples", "50",
    ])  # fmt: skip

    assert comparison["data"].startswith(f"all of {external}")
    assert f"on 10 images: all of {external}" in out
    reports = comparison["reports"]
    assert [r["n_images"] for r in reports] == [10, 10]
    assert reports[0]["class_counts"] == {"Normal": 5, "Tuberculosis": 5}
    aucs = [r["thresholds"]["default"]["metrics"]["auc"]["value"] for r in reports]
    assert comparison["auc_difference"]["difference"] == pytest.approx(aucs[1] - aucs[0])
    assert json.loads((tmp_path / "reports" / "comparison.json").read_text())["data"] == comparison["data"]
    assert str(external) in (tmp_path / "reports" / "comparison.md").read_text()


# --------------------------------------------------------------------------- GradCAM
@pytest.fixture(scope="module")
def cam_setup(stopped_early_run, tmp_path_factory):
    """The stopped-early best checkpoint made to answer in P(TB) between 0.1 and 0.9 (its head scaled down), with
    a calibration of P(TB) (scale and bias) and a threshold between the P(TB) of two new images, one per class
    folder; no MLflow run named, so the files stay local."""
    root = tmp_path_factory.mktemp("gradcam")
    images = root / "images"
    write_xrays(images / "Normal", 1, False, size=48, seed=5)
    write_xrays(images / "Tuberculosis", 1, True, size=48, seed=5)
    paths = sorted(images.rglob("*.png"))
    saved = load(stopped_early_run["best"])
    logits = logits_by_hand(stopped_early_run["best"], paths)
    scale = max(1.0, float((logits[:, 1] - logits[:, 0]).abs().max()) / 2)  # logit differences within 2
    saved["model"]["fc.weight"] /= scale
    saved["model"]["fc.bias"] /= scale
    saved["calibration"], saved["mlflow_run_id"] = {"scale": 0.6, "bias": 0.3}, ""  # P(TB) = sigmoid(0.6 d + 0.3)
    checkpoint = root / "best.pth"
    torch.save(saved, checkpoint)
    logits = logits_by_hand(checkpoint, paths)
    probs = torch.sigmoid(0.6 * (logits[:, 1] - logits[:, 0]) + 0.3).numpy()
    assert abs(probs[0] - probs[1]) > 1e-3 and 0.1 < probs.min() and probs.max() < 0.9
    mean = float(probs.mean())
    saved["thresholds"] = {**saved["thresholds"], "youden": math.log(mean / (1 - mean))}  # stored as log-odds
    torch.save(saved, checkpoint)
    return {"root": root, "checkpoint": checkpoint, "images": images,
            "probs": dict(zip(map(str, paths), probs.tolist())), "threshold": float(probs.mean())}  # fmt: skip


def explain(cam_setup, name: str, *flags: str, images: Path | None = None) -> tuple[dict, str]:
    argv = ["--checkpoint", str(cam_setup["checkpoint"]), "--images", str(images or cam_setup["images"]),
            "--output-dir", str(cam_setup["root"] / name), *flags]  # fmt: skip
    return run_quietly(gradcam.main, argv)


@pytest.fixture(scope="module")
def predicted(cam_setup):
    return explain(cam_setup, "predicted", "--target", "predicted")


def test_gradcam_explains_the_predicted_class_with_the_checkpoint_calibration_and_threshold(cam_setup, predicted):
    result, _ = predicted
    rows = result["images"]
    assert sorted(row["image"] for row in rows) == sorted(cam_setup["probs"])
    for row in rows:
        assert row["probability_tuberculosis"] == pytest.approx(cam_setup["probs"][row["image"]], abs=2e-6)
        tb = cam_setup["probs"][row["image"]] >= cam_setup["threshold"]
        assert row["predicted_label"] == ("Tuberculosis" if tb else "Normal")
        threshold = cam_setup["threshold"]
        assert row["threshold_log_odds"] == pytest.approx(math.log(threshold / (1 - threshold)), abs=1e-9)
        assert row["cam_target"] == row["predicted_label"]
        assert row["true_label"] == Path(row["image"]).parent.name  # from the class folders of --images DIR
    assert {row["predicted_label"] for row in rows} == {"Normal", "Tuberculosis"}
    index = json.loads((cam_setup["root"] / "predicted" / "gradcam_index_transfer_learning.json").read_text())
    assert index["target"] == "predicted" and index["images"] == rows


@pytest.mark.parametrize("target", ["Normal", "Tuberculosis"])
def test_gradcam_target_names_the_class_every_map_explains(cam_setup, predicted, target):
    [other] = [row for row in predicted[0]["images"] if row["predicted_label"] != target]  # predicted otherwise
    result, _ = explain(cam_setup, target, "--target", target.lower(), images=Path(other["image"]))
    [row] = result["images"]
    assert row["cam_target"] == target and row["predicted_label"] == other["predicted_label"]


@pytest.fixture(scope="module")
def one_at_a_time(cam_setup):
    return explain(cam_setup, "one_at_a_time_seed_1", "--batch-size", "1", "--seed", "1")


def test_gradcam_batch_size_and_seed_change_the_batches_and_the_road_noise_only(predicted, one_at_a_time):
    result, out = one_at_a_time
    assert "gradcam: 2 batches" in out and "gradcam: 1 batches" in predicted[1]
    assert result["config"]["seed"] == 1 and result["config"]["batch_size"] == 1
    for row, seed_0 in zip(result["images"], predicted[0]["images"], strict=True):
        for key in ("image", "predicted_label", "cam_target", "threshold_log_odds"):
            assert row[key] == seed_0[key], key
        assert row["probability_tuberculosis"] == pytest.approx(seed_0["probability_tuberculosis"], abs=2e-6)
        assert row["road_score"] != pytest.approx(seed_0["road_score"], abs=1e-6)  # other imputation noise


@pytest.mark.parametrize("method", ["hirescam", "layercam", "eigencam", "scorecam"])
def test_gradcam_methods_run_on_a_folder_of_unlabelled_images(cam_setup, one_at_a_time, tmp_path, monkeypatch, method):
    from pytorch_grad_cam import ScoreCAM

    # ScoreCAM scores the image masked by each of layer4's 2048 channels, 16 at a time unless told: on a CPU
    # batches of 256 take a fifth of the time for the same scores.
    monkeypatch.setattr(ScoreCAM, "batch_size", 256, raising=False)
    folder = tmp_path / "scans"  # a flat folder: no class names, so no true label
    folder.mkdir()
    shutil.copy(cam_setup["images"] / "Normal" / "img_000.png", folder / "scan.png")

    result, out = explain(cam_setup, method, "--method", method, "--seed", "1", images=folder)

    assert f"GradCAM ({method})" in out and result["method"] == method
    [row] = result["images"]
    assert row["image"] == str(folder / "scan.png") and row["true_label"] == "unknown"
    # GradCAM's row for the same image, also alone in its batch and scored with seed 1
    [gradcam_row] = [r for r in one_at_a_time[0]["images"] if r["true_label"] == "Normal"]
    assert row["probability_tuberculosis"] == gradcam_row["probability_tuberculosis"]
    if method == "hirescam":  # equal to GradCAM where layer4 is averaged before a linear head, as in ResNet50
        assert row["road_score"] == pytest.approx(gradcam_row["road_score"], abs=1e-9)
    else:  # another map: other pixels removed first
        assert row["road_score"] != pytest.approx(gradcam_row["road_score"], abs=1e-9)
    assert (cam_setup["root"] / method / "gradcam_summary_transfer_learning.png").is_file()
