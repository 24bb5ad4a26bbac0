"""End-to-end training runs against real MLflow stores, resume, and CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import ROOT, coloured_share, exits_with, rescored_test_accuracy, shared_data
from mlflow.tracking import MlflowClient

import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint, read_json
from tbcxr.demo import make_demo_dataset
from tbcxr.evaluation import predict_checkpoint
from tbcxr.metrics import classification_metrics
from tbcxr.split import manifest_samples
from tbcxr.tracking import experiment_id, resolve_tracking_uri

TINY = ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--weights", "none", "--recipe", "original"]


def train(tmp_path, data_dir, tracking_uri, *extra):
    argv = [
        "--data-dir",
        str(data_dir),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--tracking-uri",
        tracking_uri,
        *TINY,
        *extra,
    ]
    return trainer.main(argv)


def metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.real_log_model  # the one test of the model MLflow logs (torch.export); the others skip it
def test_two_epochs_write_every_checkpoint_summary_and_mlflow_run(tmp_path, organized_data, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(tmp_path, organized_data, uri, "--epochs", "2", "--save-every", "1")
    out = capsys.readouterr().out

    for line in (
        "Training ResNet50 for TB classification - FULL NETWORK TRAINING",
        "Device: cpu",
        "ALL LAYERS TRAINABLE - Full network training enabled",
        "Model has 23,512,130 trainable parameters",
        "Using different learning rates: Backbone 1.00e-05, Classifier 1.00e-04",
        "Epoch 1: Loss=",
        "Epoch 2: Loss=",
        "Val Results - Accuracy: ",
        "Test Results - Accuracy: ",
    ):
        assert line in out
    ckpt_dir = tmp_path / "ckpt"
    periodic = sorted(ckpt_dir.glob("*_epoch*_resnet50_tb_full_trained.pth"))
    assert [p.name.split("_")[1] for p in periodic] == ["epoch1", "epoch2"]
    for name in (
        "best_resnet50_tb_full_trained.pth",
        "last.pth",
        "split_manifest.json",
        "summary.json",
        "confusion_matrix.png",
        "roc_curve.png",
        "classification_report.txt",
    ):
        assert (ckpt_dir / name).is_file(), name
    # Drawn, not just titled: matrix cells fill about half of their figure, a curve about 1% of its.
    assert coloured_share(ckpt_dir / "confusion_matrix.png") > 0.2
    assert coloured_share(ckpt_dir / "roc_curve.png") > 0.002

    best = torch.load(ckpt_dir / "best_resnet50_tb_full_trained.pth", map_location="cpu", weights_only=True)
    last = torch.load(ckpt_dir / "last.pth", map_location="cpu", weights_only=True)
    assert best["class_names"] == ["Normal", "Tuberculosis"] and best["image_size"] == 32
    assert best["config"]["epochs"] == 2 and best["mlflow_run_id"] == summary["mlflow_run_id"]
    assert last["epoch"] == 2 and {"optimizer", "scheduler", "scaler"} <= last.keys()
    model_checkpoint = Checkpoint.load(ckpt_dir / "best_resnet50_tb_full_trained.pth")
    model = model_checkpoint.model()
    assert torch.equal(model.fc.weight, best["model"]["fc.weight"])

    # Beside 0.5, the test results at the operating point the checkpoint recommends, chosen on validation:
    # the numbers of that threshold on the best checkpoint's test scores, printed and in summary.json.
    threshold = model_checkpoint.operating_threshold
    samples = manifest_samples(read_json(ckpt_dir / "split_manifest.json"), "test")
    labels, probs = predict_checkpoint(model_checkpoint, samples, torch.device("cpu"), 16, 0)
    at_point = classification_metrics(labels, probs, threshold)
    assert model_checkpoint.recommended_operating_point == "youden" and threshold != 0.0  # log-odds 0: P(TB) 0.5
    p_tb = 1 / (1 + math.exp(-threshold))
    chosen_on = model_checkpoint.operating_points_chosen_on_text
    assert chosen_on.startswith("validation (") and "Tuberculosis)" in chosen_on
    assert (
        f"Test Results at Youden's J (log-odds {threshold!r} (P(TB) {p_tb:.6g}), chosen on {chosen_on}) - "
        f"Accuracy: {at_point['accuracy']:.4f}, F1: {at_point['f1']:.4f}, Sensitivity: {at_point['sensitivity']:.4f}, "
        f"Specificity: {at_point['specificity']:.4f}, AUC: {at_point['auc']:.4f}"
    ) in out.splitlines()
    assert out.index("Test Results - ") < out.index("Test Results at Youden's J")
    written = json.loads((ckpt_dir / "summary.json").read_text())
    recorded = written["test_metrics_at_operating_point"]
    assert recorded["name"] == "youden" and recorded["threshold_log_odds"] == threshold
    assert recorded["threshold_p_tb"] == pytest.approx(p_tb, rel=1e-12)
    assert recorded["validation_counts"] == model_checkpoint.state.validation_counts
    assert (
        recorded["intervals"]["sensitivity"]["method"] == "wilson"
        and recorded["intervals"]["auc"]["method"] == "newcombe"
    )
    for key in ("accuracy", "f1", "sensitivity", "specificity", "auc"):
        assert recorded[f"test_{key}"] == pytest.approx(at_point[key], abs=1e-6), key
    assert set(written["test_metrics"]) >= {
        "test_accuracy",
        "test_f1",
        "test_sensitivity",
        "test_specificity",
        "test_auc",
    }
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["backbone_lr_mult"] == "0.1"
    assert metric_steps(client, run.info.run_id, "val_loss") == [1, 2]
    assert metric_steps(client, run.info.run_id, "lr_backbone") == [1, 2]
    assert "test_auc" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"split_manifest.json", "summary.json", "test"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "test")} == {
        "test/confusion_matrix.png",
        "test/roc_curve.png",
        "test/classification_report.txt",
    }
    assert client.search_logged_models([run.info.experiment_id])[0].source_run_id == run.info.run_id
    # Artifacts and the logged model sit beside the sqlite file, not in the folder pytest started in.
    artifacts_root = (tmp_path / "mlruns" / "ResNet50_TB_FullTraining").as_uri()
    assert run.info.artifact_uri.startswith(artifacts_root)
    assert client.search_logged_models([run.info.experiment_id])[0].artifact_location.startswith(artifacts_root)

    # Going back to a periodic checkpoint of the same run is refused: it would log epoch 2 twice.
    with exits_with(capsys, "is epoch 1 of a run that .*last.pth has carried on to epoch 2: going back would log"):
        trainer.main(["--resume", str(periodic[0]), "--epochs", "3"])

    # --resume continues the same run from the saved epoch.
    trainer.main(["--resume", str(ckpt_dir / "last.pth"), "--epochs", "3"])
    out = capsys.readouterr().out
    assert "Resumed from" in out and "Epoch 3: Loss=" in out and "Epoch 1: Loss=" not in out
    assert metric_steps(client, run.info.run_id, "val_loss") == [1, 2, 3]
    assert torch.load(ckpt_dir / "last.pth", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize(
    ("uri", "name", "folder"),
    [
        ("sqlite:///mlflow.db", "ResNet50_TB_FullTraining", "ResNet50_TB_FullTraining"),  # relative to the cwd
        ("sqlite:///store/m.db?timeout=5", "/Users/me/tb run", "Users_me_tb_run"),  # MLflow's path-like names
        ("sqlite:///store/m.db", "../..", "experiment"),
    ],
)
def test_a_new_sqlite_experiment_keeps_artifacts_in_one_folder_beside_the_database(
    tmp_path, monkeypatch, uri, name, folder
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri)
    experiment = client.get_experiment(experiment_id(client, name, uri))
    database_folder = tmp_path / "store" if "store" in uri else tmp_path
    assert experiment.name == name
    assert experiment.artifact_location == (database_folder / "mlruns" / folder).as_uri()


def test_run_against_a_real_mlflow_server(tmp_path, organized_data, mlflow_server):
    summary = train(tmp_path, organized_data, mlflow_server, "--epochs", "1", "--experiment", "server-test")
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "val_auc") == [1]
    assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def run_cli(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "resnet50_tb_full.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_explicit_tracking_uri_that_does_not_answer_stops_before_training(tmp_path, organized_data):
    from conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        "--data-dir",
        str(organized_data),
        "--tracking-uri",
        dead,
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert f"the MLflow tracking server {dead} does not answer" in result.stderr
    assert "Epoch 1" not in result.stdout


def test_resume_without_the_split_manifest_says_the_split_is_unknown(tmp_path, trained_run, capsys):
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "last.pth").symlink_to(trained_run["best"].parent / "last.pth")
    with exits_with(capsys, "no split_manifest.json in .*moved, so the split the checkpoint was trained on is unknown"):
        trainer.main(["--resume", str(moved / "last.pth"), "--checkpoint-dir", str(moved), "--epochs", "3"])


@pytest.mark.parametrize("script", ["resnet50_tb_full.py", "resnet50_gradcam_tb_full.py"])
def test_help_lists_every_flag_with_its_default(script):
    import dataclasses

    import resnet50_gradcam_tb_full as gradcam

    config_cls = trainer.TrainConfig if script == "resnet50_tb_full.py" else gradcam.GradCamConfig
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for f in dataclasses.fields(config_cls):
        assert "--" + f.name.replace("_", "-") in result.stdout
    assert result.stdout.count("(default:") == len(dataclasses.fields(config_cls))


def test_missing_data_dir_explains_layout_and_demo(tmp_path):
    result = run_cli("--data-dir", str(tmp_path / "missing"), *TINY, cwd=tmp_path)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "DIR/test/Tuberculosis" in result.stderr
    assert "--demo" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("dataset", ["tb-cxr-mini", "tb-kaggle-sample"])
def test_real_data_smoke(tmp_path, dataset):
    summary = train(tmp_path, shared_data(dataset), f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs", "1")
    manifest = json.loads((tmp_path / "ckpt" / "split_manifest.json").read_text())
    assert manifest["layout"] == ("organized" if dataset == "tb-cxr-mini" else "raw")
    expected_total = 402 if dataset == "tb-cxr-mini" else 10
    assert sum(len(manifest[side]) for side in ("train", "val", "test")) == expected_total
    assert summary["test_metrics"]["test_accuracy"] == pytest.approx(rescored_test_accuracy(tmp_path / "ckpt"))


def test_demo_runs_end_to_end_on_marked_synthetic_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # demo_data/ is written to the working directory
    # A smaller synthetic set than the demo's 250 images keeps the suite fast; the rest is the real demo.
    monkeypatch.setattr(trainer, "make_demo_dataset", partial(make_demo_dataset, train_per_class=30, test_per_class=8))
    ckpt_dir = tmp_path / "ckpt"

    summary = trainer.main(
        ["--demo", "--epochs", "1", "--checkpoint-dir", str(ckpt_dir), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )

    assert "Demo: SYNTHETIC chest X-rays in demo_data/ (not real data)" in capsys.readouterr().out
    assert "SYNTHETIC" in (tmp_path / "demo_data" / "SYNTHETIC_DATA.txt").read_text()
    assert json.loads((ckpt_dir / "summary.json").read_text())["mlflow_run_id"] == summary["mlflow_run_id"]
    manifest = json.loads((ckpt_dir / "split_manifest.json").read_text())
    assert manifest["data_dir"].endswith("demo_data") and len(manifest["test"]) == 16
    best = torch.load(ckpt_dir / "best_resnet50_tb_full_trained.pth", map_location="cpu", weights_only=True)
    assert best["image_size"] == 64 and best["config"]["image_size"] == 64
    assert best["config"]["weights"] == "none" and best["config"]["demo"] and best["config"]["epochs"] == 1


def test_class_weight_balance_weights_the_loss_of_the_run(tmp_path, monkeypatch):
    from conftest import write_xrays

    from tbcxr.training import loss_function

    # sklearn's "balanced" weights, n / (classes x count): 8 / (2 x 6) for Normal, 8 / (2 x 2) for TB.
    assert loss_function("class-weight", [0] * 6 + [1] * 2, torch.device("cpu")).weight.tolist() == pytest.approx(
        [8 / 12, 2.0]
    )
    assert loss_function("oversample", [0] * 6 + [1] * 2, torch.device("cpu")).weight is None

    data = tmp_path / "data"
    write_xrays(data / "train" / "Normal", 12, False)
    write_xrays(data / "train" / "Tuberculosis", 4, True)
    write_xrays(data / "test" / "Normal", 3, False, seed=1)
    write_xrays(data / "test" / "Tuberculosis", 3, True, seed=1)
    losses = []
    monkeypatch.setattr(trainer, "loss_function", lambda *args: losses.append(loss_function(*args)) or losses[-1])

    run_flags = ["--epochs", "1", "--balance", "class-weight", "--val-fraction", "0.25"]  # 0.25: a TB image in val
    train(tmp_path, data, f"sqlite:///{tmp_path}/m.db", *run_flags)

    labels = [label for _, label in json.loads((tmp_path / "ckpt" / "split_manifest.json").read_text())["train"]]
    normal, tb = labels.count(0), labels.count(1)
    assert tb < normal  # the run's training side is imbalanced
    assert losses[0].weight.tolist() == pytest.approx([len(labels) / (2 * normal), len(labels) / (2 * tb)])
    best = torch.load(tmp_path / "ckpt" / "best_resnet50_tb_full_trained.pth", map_location="cpu", weights_only=True)
    assert best["config"]["balance"] == "class-weight"


# --------------------------------------------------------------------------- CUDA-only branches, run on the CPU
def test_channels_last_layout_runs_on_the_cpu_and_matches_the_default_layout(tmp_path, organized_data, monkeypatch):
    import tbcxr.data
    import tbcxr.runtime

    common = ["--epochs", "1", "--deterministic", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    default = trainer.main(["--data-dir", str(organized_data), "--checkpoint-dir", str(tmp_path / "a"), *TINY, *common])
    asked = []
    for module in (tbcxr.runtime, tbcxr.data):
        monkeypatch.setattr(module, "use_channels_last", lambda device: asked.append(device.type) or True)
    channels_last = trainer.main(
        ["--data-dir", str(organized_data), "--checkpoint-dir", str(tmp_path / "b"), *TINY, *common]
    )

    assert asked and set(asked) == {"cpu"}
    for key in ("test_loss", "test_auc"):
        assert channels_last["test_metrics"][key] == pytest.approx(default["test_metrics"][key], abs=1e-4)


def test_compile_runs_on_the_cpu_and_checkpoints_keep_the_plain_model_keys(tmp_path, organized_data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(tmp_path, organized_data, uri, "--epochs", "1", "--compile")

    best = torch.load(tmp_path / "ckpt" / "best_resnet50_tb_full_trained.pth", map_location="cpu", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in best["model"])
    model = Checkpoint.load(tmp_path / "ckpt" / "best_resnet50_tb_full_trained.pth").model()  # strictly: plain keys
    assert torch.equal(model.fc.bias, best["model"]["fc.bias"])
    assert summary["best_epoch"] == 1


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("--scheduler-patience", "5", "the scheduler's saved state holds it"),
        ("--schedule", "cosine", "the scheduler's saved state holds it"),
        ("--freeze-features", None, "the optimizer's saved state holds the trained layers"),
        ("--recipe", "from-scratch", "the run goes on with its saved settings"),
    ],
)
def test_resuming_a_plateau_run_refuses_settings_its_saved_state_holds(trained_run, capsys, flag, value, reason):
    last = trained_run["best"].parent / "last.pth"
    with pytest.raises(SystemExit):
        trainer.config_from_args(["--resume", str(last), flag, *([value] if value else [])])
    assert f"{flag} cannot change on resume: {reason}" in capsys.readouterr().err
    assert trainer.config_from_args(["--resume", str(last), "--epochs", "5", "--scheduler-patience", "3"]).epochs == 5


def test_a_relative_sqlite_store_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints keep the URI: --resume and --test-only run from other folders
    assert resolve_tracking_uri("sqlite:///runs/m.db?timeout=5", 5003)[0] == f"sqlite:///{tmp_path}/runs/m.db?timeout=5"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///m.db")
    assert resolve_tracking_uri("", 5003)[0] == f"sqlite:///{tmp_path}/m.db"
