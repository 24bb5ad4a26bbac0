"""The benchmarks: the generalisation benchmark's arithmetic (paired differences of mean AUCs, the epoch each
selection rule picks, --merge refusing results that are not comparable), and every script run end to end
with its smallest arguments, so that none breaks unnoticed when the trainer changes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_organized, write_xrays
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


# --------------------------------------------------------------------------- every script, end to end
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TESTED_END_TO_END = ("bench_generalisation.py", "bench_predict.py", "bench_prepare.py", "bench_train.py")  # below


def run_benchmark(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_every_benchmark_script_is_run_end_to_end_by_a_test():
    assert sorted(path.name for path in BENCHMARKS.glob("*.py")) == sorted(TESTED_END_TO_END)


def test_bench_train_measures_both_pipelines_and_compute_only(tmp_path):
    run_benchmark(
        "bench_train.py", "--device", "cpu", "--images", "12", "--source-size", "32", "--image-size", "32",
        "--batch-size", "4", "--workers", "0", "--loop-batches", "1", "--data-root", str(tmp_path / "data"),
        "--json", str(tmp_path / "train.json"), cwd=tmp_path,
    )  # fmt: skip
    results = json.loads((tmp_path / "train.json").read_text())
    rates = [*results["data_only"].values(), *results["full_loop"].values(), results["compute_only"]["eager"]]
    assert len(rates) == 5 and all(rate > 0 for rate in rates)


def test_bench_predict_prints_both_throughputs_and_their_ratio(tmp_path):
    result = run_benchmark(
        "bench_predict.py", "--images", "24", "--image-size", "32", "--batch-size", "8", "--workers", "1",
        "--device", "cpu", "--data-root", str(tmp_path / "data"), "--json", str(tmp_path / "predict.json"),
        cwd=tmp_path,
    )  # fmt: skip
    results = json.loads((tmp_path / "predict.json").read_text())
    rates = results["images_per_second"]
    assert results["images"] == 24 and rates["prediction"] > 0 and rates["forward_only"] > 0
    assert results["prediction_over_forward_only"] == pytest.approx(rates["prediction"] / rates["forward_only"])
    printed = dict(re.findall(r"^(prediction|forward only) \(.*\)\s+([\d.]+) images/s$", result.stdout, re.MULTILINE))
    assert float(printed["prediction"]) == pytest.approx(rates["prediction"], abs=0.01)
    assert float(printed["forward only"]) == pytest.approx(rates["forward_only"], abs=0.01)
    ratio = re.search(r"^prediction / forward only\s+([\d.]+)$", result.stdout, re.MULTILINE)
    assert float(ratio.group(1)) == pytest.approx(rates["prediction"] / rates["forward_only"], abs=1e-3)
    assert all(mb > 0 for mb in results["peak_rss_mb"].values())


def test_bench_prepare_times_a_first_and_a_second_preparation(tmp_path):
    result = run_benchmark(
        "bench_prepare.py", "--sizes", "30", "--source-size", "32", "--image-size", "32",
        "--data-root", str(tmp_path / "data"), cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(result.stdout[result.stdout.index("{\n") :])
    (size,) = report["results"]
    assert size["images"] == 30 and size["first"]["stages"][0]["stage"] == "Checking images"
    assert size["second"]["seconds"] > 0 and size["second"]["peak_rss_mb"] > 0


def test_bench_generalisation_per_epoch_runs_again_on_its_finished_runs(tmp_path, capsys):
    train = make_organized(tmp_path / "train", train=10, test=4, size=40)
    external = tmp_path / "external"
    for name, tuberculosis in (("Normal", False), ("Tuberculosis", True)):
        write_xrays(external / name, 4, tuberculosis, size=40, seed=9)
    common = ["--train-dir", str(train), "--external-dir", str(external), "--seeds", "0", "--epochs", "2",
              "--image-size", "32", "--batch-size", "8", "--resamples", "20", "--per-epoch", "--reuse",
              "--work-dir", str(tmp_path / "work")]  # fmt: skip
    project = ["--project-args", "--num-workers", "0"]

    # In this process, where the trainer skips logging its model to MLflow (torch.export: slow).
    first = bench.main([*common, "--out", str(tmp_path / "a.json"), *project])
    first_console = capsys.readouterr().out
    # --reuse scores the finished run again; its epoch checkpoints were deleted once scored the first time.
    again = bench.main([*common, "--only", "project", *project])
    again_console = capsys.readouterr().out

    assert "Epoch 1" in first_console and "Epoch 1" not in again_console  # trained once, reused after
    assert not list((tmp_path / "work").rglob("*_epoch*_resnet50_tb_full_trained.pth"))
    assert set(first["runs"]) == {"naive", "project"} and "project - naive" in first["differences"]
    assert len(first["runs"]["project"][0]["per_epoch"]) == 2
    assert again["runs"]["project"][0]["per_epoch"] == first["runs"]["project"][0]["per_epoch"]
    assert "best validation AUC, window 3" in again_console  # the selection table needs every epoch's AUCs
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["scores"]["project"][0]["per_epoch"] == first["runs"]["project"][0]["per_epoch"]
