"""Site thresholds: a hospital fits its own operating points on a labelled local sample, reads them
off a threshold table, and gets a new checkpoint that predicts with them (the original untouched)."""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coloured_share, exits_with, write_xrays
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy.stats import binomtest

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr import site
from tbcxr.checkpoint import Checkpoint
from tbcxr.config import MANIFEST_NAME
from tbcxr.errors import DataError
from tbcxr.evaluation import predict_checkpoint
from tbcxr.figures import site_threshold_figure
from tbcxr.metrics import Calibration, select_thresholds

# 20 TB and 20 Normal images with four distinct scores, so every count below is worked out by hand. Scores and
# thresholds are log-odds; the table is keyed here by P(TB) (rounded) for readability.
HAND_LABELS = np.repeat([1, 0], 20)
HAND_PROBS = np.r_[[0.8] * 17, [0.35] * 3, [0.1] * 16, [0.55] * 4]
HAND_SCORES = np.log(HAND_PROBS / (1 - HAND_PROBS))
STORED = {name: math.log(p / (1 - p)) for name, p in {"default": 0.5, "youden": 0.42, "who_triage": 0.2}.items()}
YOUDEN = (math.log(0.55 / 0.45) + math.log(0.8 / 0.2)) / 2  # the middle of (0.55, 0.8] in log-odds
WHO = (math.log(0.1 / 0.9) + math.log(0.35 / 0.65)) / 2  # midway between the lowest TB score and the next lower


def p_of(log_odds: float) -> float:
    return round(1 / (1 + math.exp(-log_odds)), 6)


def hand_table(prevalence: float = 0.05) -> dict[float, dict]:
    rows = site.site_threshold_table(HAND_LABELS, HAND_SCORES, prevalence, STORED)
    return {p_of(row["threshold_log_odds"]): row for row in rows}


def test_a_threshold_row_holds_the_hand_computed_counts_rates_and_predictive_values():
    row = hand_table(prevalence=0.05)[0.5]  # TB: 17 at 0.8 called, 3 at 0.35 missed; Normal: 4 at 0.55 called
    assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (17, 3, 16, 4)
    assert row["sensitivity"] == pytest.approx(0.85) and row["specificity"] == pytest.approx(0.80)
    assert row["ppv_sample"] == pytest.approx(17 / 21) and row["npv_sample"] == pytest.approx(16 / 19)
    # Bayes at 5%: PPV = 0.85*0.05 / (0.85*0.05 + 0.20*0.95), NPV = 0.80*0.95 / (0.80*0.95 + 0.15*0.05)
    assert row["ppv_at_prevalence"] == pytest.approx(0.0425 / 0.2325)
    assert row["npv_at_prevalence"] == pytest.approx(0.76 / 0.7675)
    assert row["referrals_per_1000"] == pytest.approx(232.5)  # 1000 * (0.0425 + 0.19)
    assert row["prevalence"] == 0.05  # the CSV names the prevalence its PPV, NPV and referrals are at
    assert row["source"] == "grid, checkpoint default"
    at_one_percent = hand_table(prevalence=0.01)[0.5]  # the user's prevalence moves PPV, not the sample's
    assert at_one_percent["ppv_at_prevalence"] == pytest.approx(0.0085 / (0.0085 + 0.198))
    assert at_one_percent["ppv_sample"] == row["ppv_sample"]


def test_candidates_are_the_grid_the_refitted_and_the_stored_points_sorted_once_each():
    table = hand_table()
    thresholds = list(table)
    assert thresholds == sorted(set(thresholds))
    grid = [round(0.05 * k, 2) for k in range(1, 20)]
    assert set(grid) <= set(thresholds)
    # Youden's J is maximal (0.85) on (0.55, 0.8]: its middle in log-odds. The highest threshold reaching
    # sensitivity 0.90 keeps the lowest TB score, 0.35: the point lies midway between it and the next lower, 0.1.
    assert table[p_of(YOUDEN)]["source"] == "site youden"
    assert table[p_of(WHO)]["source"] == "site who_triage" and table[0.35]["source"] == "grid"
    assert table[0.42]["source"] == "checkpoint youden"
    assert table[0.2]["source"] == "grid, checkpoint who_triage"
    assert set(thresholds) == set(grid) | {p_of(YOUDEN), p_of(WHO), 0.42}
    refitted = site.refitted_rows(list(table.values()))
    assert {name: row["threshold_log_odds"] for name, row in refitted.items()} == pytest.approx(
        {"youden": YOUDEN, "who_triage": WHO}
    )


def wilson_by_formula(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = successes / trials
    centre = (p + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z / (1 + z**2 / trials) * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2))
    return centre - half, centre + half


def test_intervals_are_95_percent_wilson_intervals():
    for row in hand_table().values():
        for metric, (k, n) in (
            ("sensitivity", (row["tp"], row["tp"] + row["fn"])),
            ("specificity", (row["tn"], row["tn"] + row["fp"])),
        ):
            expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert (row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]) == pytest.approx((expected.low, expected.high))
            assert row[f"{metric}_ci_low"] == pytest.approx(max(0.0, wilson_by_formula(k, n)[0]), abs=1e-9)
            assert row[f"{metric}_ci_low"] <= row[metric] <= row[f"{metric}_ci_high"]


def test_who_triage_is_marked_exactly_where_both_lower_bounds_reach_the_targets():
    table = hand_table()
    # 0.15 to 0.35: all 20 TB called (sensitivity 1.0), but 20/20 has a lower Wilson bound of 0.839 < 0.90:
    # 20 TB images cannot show the target is met, so no row is marked.
    assert not any(row["meets_who_triage"] for row in table.values())
    assert table[0.35]["sensitivity"] == 1.0 and table[0.35]["specificity"] == 0.8
    # 40 TB all called (lower bound 40 / (40 + z^2) = 0.912) and 36 of 40 Normal cleared (lower bound 0.769).
    labels, scores = np.repeat([1, 0], 40), np.r_[[2.0] * 40, [-2.0] * 36, [2.0] * 4]
    rows = {row["threshold_log_odds"]: row for row in site.site_threshold_table(labels, scores, 0.05, {})}
    met = {t for t, row in rows.items() if row["meets_who_triage"]}
    assert met == {t for t in rows if -2.0 < t <= 2.0}
    for row in [*table.values(), *rows.values()]:
        assert row["meets_who_triage"] == (row["sensitivity_ci_low"] >= 0.90 and row["specificity_ci_low"] >= 0.70)


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ([1] * 40, "found 0 Normal and 40 Tuberculosis (one class only)"),
        ([1] * 19 + [0] * 30, "found 30 Normal and 19 Tuberculosis (fewer than 20 of one class)"),
        ([0] * 5 + [1] * 25, "found 5 Normal and 25 Tuberculosis (fewer than 20 of one class)"),
    ],
)
def test_a_sample_with_one_class_or_too_few_of_one_is_refused_with_the_reason(labels, reason):
    with pytest.raises(DataError, match="at least 20 Tuberculosis and 20 Normal") as refused:
        site.refuse_small_sample(labels)
    assert reason in str(refused.value)
    site.refuse_small_sample([1] * 20 + [0] * 20)  # 20 of each is enough


def test_tables_and_plot_say_what_they_show(tmp_path):
    rows = site.site_threshold_table(HAND_LABELS, HAND_SCORES, 0.02, STORED)
    csv_path, md_path = site.write_site_tables(rows, tmp_path / "eval_x", prevalence=0.02, checkpoint=Path("a/b.pth"))
    with open(csv_path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [float(r["threshold_log_odds"]) for r in written] == [r["threshold_log_odds"] for r in rows]
    assert [int(r["tp"]) for r in written] == [r["tp"] for r in rows]
    markdown = md_path.read_text()
    assert "40 images (20 Tuberculosis, 20 Normal): sample prevalence 50.0%" in markdown
    assert "screening prevalence of 2.0%" in markdown and "a/b.pth" in markdown
    lines = markdown.splitlines()
    table_lines = lines[lines.index(next(line for line in lines if line.startswith("|---"))) + 1 :]
    assert len(table_lines) == len(rows)
    cells = table_lines[0].split(" | ")  # at P(TB) 0.05 every image is called TB: no NPV, not NPV 0 or 1
    assert cells[0] == "| -2.9444 (0.05)" and cells[9] == "n/a" and cells[11].startswith("n/a [")
    assert [line.endswith("| **met** |") for line in table_lines] == [r["meets_who_triage"] for r in rows]
    assert f"| {YOUDEN:.4f} ({p_of(YOUDEN):.4g}) | site Youden's J |" in markdown

    assert_both_curves_and_bands(
        site_threshold_figure(
            rows,
            {name: row["threshold_log_odds"] for name, row in site.refitted_rows(rows).items()},
            tmp_path / "site.png",
            "hand",
        )
    )


def assert_both_curves_and_bands(png: Path) -> None:
    """Sensitivity (tab:red) and specificity (tab:blue) are drawn, each with its 95% band (the colour at
    alpha 0.2 on white): an empty titled figure, or one without the bands, fails."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    for colour in ((214, 39, 40), (31, 119, 180)):
        assert (np.abs(pixels - colour).sum(axis=-1) < 30).mean() > 0.002, colour
        band = 255 - 0.2 * (255 - np.asarray(colour))
        assert (np.abs(pixels - band).sum(axis=-1) < 15).mean() > 0.01, colour
    assert coloured_share(png) > 0.005


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def checkpoint_copy(trained_run, tmp_path) -> Path:
    """The shared run's best checkpoint and its split manifest, copied: site files go beside the checkpoint."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in (trained_run["best"].name, MANIFEST_NAME):
        shutil.copy(trained_run["best"].parent / name, folder / name)
    return folder / trained_run["best"].name


def labelled_sample(folder: Path, normal: int, tuberculosis: int) -> list[tuple[str, int]]:
    """A hospital's labelled folder of synthetic X-rays none of the shared run trained on (another seed)."""
    samples = [(str(p), 0) for p in write_xrays(folder / "Normal", normal, False, size=40, seed=11)]
    return samples + [(str(p), 1) for p in write_xrays(folder / "Tuberculosis", tuberculosis, True, size=40, seed=11)]


def test_site_thresholds_write_the_table_plot_and_a_refitted_checkpoint_leaving_the_original(
    checkpoint_copy, trained_run, tmp_path, capsys
):
    sample = tmp_path / "hospital_c"
    samples = labelled_sample(sample, normal=26, tuberculosis=24)
    original_sha = sha256(checkpoint_copy)
    original = Checkpoint.load(checkpoint_copy)

    report = trainer.main(
        ["--test-only", "--resume", str(checkpoint_copy), "--data-dir", str(sample), "--site-thresholds",
         "--prevalence", "0.02", "--bootstrap-resamples", "20", "--num-workers", "0",
         "--tracking-uri", trained_run["uri"]]
    )  # fmt: skip

    assert report["class_counts"] == {"Normal": 26, "Tuberculosis": 24}  # nothing left out: all scored
    out = capsys.readouterr().out
    assert "Site thresholds fitted on 50 images (26 Normal, 24 Tuberculosis; sample prevalence 48.0%)" in out
    calibration = original.state.calibration  # Platt's fit, or the identity where validation ranked it backwards
    said = "the network's softmax (no calibration stored)" if calibration == Calibration() else (
        f"calibrated with scale {calibration.scale:.3f}, bias {calibration.bias:+.3f}")  # fmt: skip
    assert f"sample prevalence 48.0%), P(TB) {said}:" in out
    (new_path,) = checkpoint_copy.parent.glob(f"{checkpoint_copy.stem}_site_hospital_c_*.pth")
    assert f"Refitted checkpoint: {new_path}" in out and f"{checkpoint_copy} unchanged" in out
    assert sha256(checkpoint_copy) == original_sha

    (table,) = checkpoint_copy.parent.glob(f"eval_{checkpoint_copy.stem}_hospital_c_*_site_thresholds.csv")
    prefix = Path(str(table).removesuffix(".csv"))
    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(int(r["tp"]) + int(r["fn"]) == 24 and int(r["tn"]) + int(r["fp"]) == 26 for r in rows)
    assert {r["prevalence"] for r in rows} == {"0.02"}
    assert "screening prevalence of 2.0%" in Path(f"{prefix}.md").read_text()
    assert_both_curves_and_bands(Path(f"{prefix}.png"))

    # The new checkpoint's points are the ones this sample's scores give, and the table lists them.
    labels, scores = predict_checkpoint(original, samples, torch.device("cpu"), 16, 0)
    expected = select_thresholds(labels, scores)
    refitted = Checkpoint.load(new_path)
    assert refitted.state.thresholds == pytest.approx(expected)
    for name in ("youden", "who_triage"):
        (row,) = [r for r in rows if f"site {name}" in r["source"]]
        assert float(row["threshold_log_odds"]) == refitted.state.thresholds[name]
        assert refitted.state.thresholds[name] != original.state.thresholds[name]  # the sample moved them
    assert refitted.operating_threshold == refitted.state.thresholds["youden"]  # prediction uses the site's point
    assert refitted.state.calibration == original.state.calibration
    assert all(torch.equal(refitted.model_state[k], v) for k, v in original.model_state.items())
    assert refitted.site["folder"] == str(sample.resolve()) and refitted.site["date"] == date.today().isoformat()
    assert (refitted.site["images"], refitted.site["Tuberculosis"], refitted.site["Normal"]) == (50, 24, 26)
    assert refitted.site["refitted_from_sha256"] == original_sha and original.site is None
    assert report["site_thresholds"]["checkpoint"] == str(new_path)
    assert sorted(refitted.site["pixel_sha1"]) == sorted(split_hashes(samples))  # the sample, by content

    client = MlflowClient(trained_run["uri"])
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.data LIKE '%hospital_c%'"
    )
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {f"{prefix.name}.csv", f"{prefix.name}.md", f"{prefix.name}.png"} <= logged


def test_the_splits_test_images_are_never_part_of_a_sites_sample(checkpoint_copy, trained_run, tmp_path, capsys):
    # Thresholds chosen on the split's test images would make a later --test-only of the refitted checkpoint
    # score the very images its thresholds were fitted on.
    sample = tmp_path / "hospital_e"
    labelled_sample(sample, normal=21, tuberculosis=20)
    split_test = sorted((trained_run["data"] / "test").rglob("*.png"))
    for path in split_test:
        shutil.copy(path, sample / path.parent.name / f"split_{path.name}")
    report = trainer.main(
        ["--test-only", "--resume", str(checkpoint_copy), "--data-dir", str(sample), "--site-thresholds",
         "--bootstrap-resamples", "20", "--num-workers", "0", "--tracking-uri", trained_run["uri"]]
    )  # fmt: skip
    assert report["class_counts"] == {"Normal": 21, "Tuberculosis": 20}
    assert f"Left out {len(split_test)} of {41 + len(split_test)} images" in capsys.readouterr().out


def test_a_too_small_site_sample_is_refused_before_anything_is_written(checkpoint_copy, tmp_path, capsys):
    sample = tmp_path / "clinic_d"
    labelled_sample(sample, normal=25, tuberculosis=6)
    with exits_with(capsys, "found 25 Normal and 6 Tuberculosis"):
        trainer.main(["--test-only", "--resume", str(checkpoint_copy), "--data-dir", str(sample), "--site-thresholds"])
    assert sorted(p.name for p in checkpoint_copy.parent.iterdir()) == sorted([checkpoint_copy.name, MANIFEST_NAME])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--site-thresholds"], "--site-thresholds needs --test-only"),
        (["--compare", "a.pth", "b.pth", "--site-thresholds"], "--site-thresholds needs --test-only"),
        (
            ["--test-only", "--resume", "a.pth", "--prevalence", "0.02"],
            "--prevalence is used only by --site-thresholds",
        ),
        (["--test-only", "--resume", "a.pth", "--site-thresholds", "--prevalence", "5"], "strictly between 0 and 1"),
        (["--test-only", "--resume", "a.pth", "--site-thresholds"], "--site-thresholds needs --data-dir"),
    ],
)
def test_site_flags_are_refused_where_they_cannot_apply(flags, message, capsys):
    with pytest.raises(SystemExit) as refused:
        trainer.config_from_args(flags)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def split_hashes(samples) -> list[str]:
    from tbcxr.data_quality import scan_images

    return list(scan_images([path for path, _ in samples], workers=1).pixel_hash.values())


def test_a_site_checkpoint_is_never_tested_on_its_own_sample_nor_overwritten_by_a_namesake(
    checkpoint_copy, trained_run, tmp_path, capsys, monkeypatch
):
    fit = [
        "--site-thresholds",
        "--bootstrap-resamples",
        "20",
        "--num-workers",
        "0",
        "--tracking-uri",
        trained_run["uri"],
    ]
    sample = tmp_path / "a" / "clinic"
    labelled_sample(sample, normal=20, tuberculosis=20)
    trainer.main(["--test-only", "--resume", str(checkpoint_copy), "--data-dir", str(sample), *fit])
    (site_path,) = checkpoint_copy.parent.glob("*_site_clinic_*.pth")
    site_sha = sha256(site_path)
    fitting_files = sorted(checkpoint_copy.parent.glob("eval_*"))

    # Another folder of the same name, other images: a new site checkpoint, the first one untouched.
    namesake = tmp_path / "b" / "clinic"
    samples = [(str(p), 0) for p in write_xrays(namesake / "Normal", 20, False, size=40, seed=23)]
    samples += [(str(p), 1) for p in write_xrays(namesake / "Tuberculosis", 20, True, size=40, seed=23)]
    trainer.main(["--test-only", "--resume", str(checkpoint_copy), "--data-dir", str(namesake), *fit])
    assert len(list(checkpoint_copy.parent.glob("*_site_clinic_*.pth"))) == 2 and sha256(site_path) == site_sha
    capsys.readouterr()

    # The site checkpoint on its own sample: nothing left to test on.
    with exits_with(capsys, "every image of .* belongs to the site sample clinic .* nothing is left to test on"):
        trainer.main(["--test-only", "--resume", str(site_path), "--data-dir", str(sample), "--num-workers", "0",
                      "--tracking-uri", trained_run["uri"]])  # fmt: skip
    # Its sample plus new images: the sample is left out, said so, and the fitting run's files stay as they were.
    for label, tuberculosis in (("Normal", False), ("Tuberculosis", True)):
        for path in write_xrays(tmp_path / "new" / label, 3, tuberculosis, size=40, seed=31):
            shutil.copy(path, sample / label / f"new_{path.name}")
    before = {path: sha256(path) for path in fitting_files}
    report = trainer.main(["--test-only", "--resume", str(site_path), "--data-dir", str(sample), "--num-workers", "0",
                           "--bootstrap-resamples", "20", "--tracking-uri", trained_run["uri"]])  # fmt: skip
    assert report["class_counts"] == {"Normal": 3, "Tuberculosis": 3}
    out = capsys.readouterr().out
    assert "Left out 40 of 46 images" in out and "site sample clinic" in out
    assert "Operating points chosen on site sample clinic (20 Normal and 20 Tuberculosis)" in out
    assert {path: sha256(path) for path in fitting_files} == before
    # Prediction with the site checkpoint leaves its sample out too, and says so.
    gradcam.main(["--checkpoint", str(site_path), "--images", str(sample), "--predictions", str(tmp_path / "p.csv"),
                  "--device", "cpu", "--num-workers", "0"])  # fmt: skip
    with open(tmp_path / "p.csv") as f:
        predicted = sorted(row["path"] for row in csv.DictReader(f))
    assert predicted == sorted(f"{label}/new_img_00{i}.png" for label in ("Normal", "Tuberculosis") for i in range(3))
    assert "Left out 40 of 46 images of --images" in capsys.readouterr().out
    # --compare with the site checkpoint as B: its sample is left out for both models, as by --test-only.
    monkeypatch.chdir(tmp_path)  # the comparison report goes to ./reports
    flags = ["--data-dir", str(sample), "--num-workers", "0", "--bootstrap-resamples", "20"]
    compared = trainer.main(
        ["--compare", str(checkpoint_copy), str(site_path), *flags, "--tracking-uri", trained_run["uri"]]
    )
    assert [report["n_images"] for report in compared["reports"]] == [6, 6]
