"""Batch prediction: one CSV row per file of a mixed folder, the same P(TB) as --test-only, operating
points, maps only where asked for, and clear errors for checkpoints that are not ours."""

from __future__ import annotations

import csv
import hashlib
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, exits_with, logits_by_hand, write_xrays
from PIL import Image
from torchvision import models

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint

REAL_DICOMS = {"Tuberculosis/chest.dcm": "cr_mono2_8bit_jpeg_baseline.dcm",
               "Tuberculosis/chest_noext": "cr_mono1_10bit_acrnema_noext"}  # fmt: skip
JUNK = {
    "junk/broken.png": "unreadable: cannot identify image file",
    "junk/empty.png": "unreadable: empty file",
    "junk/colour.png": "unreadable: colour image, not a greyscale radiograph",
    "junk/frames.tif": "unreadable: multi-frame image (2 frames)",
    "junk/icon.png": "unreadable: 8x8 pixels is not the size of a chest radiograph",
    "junk/notes.txt": "unreadable: not an image file",
}


def write_dicom(path, pixels: np.ndarray, preamble: bool) -> None:
    """An 8-bit MONOCHROME2 DICOM, with the file preamble or (old ACR-NEMA style) without."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=preamble)


@pytest.fixture(scope="module")
def new_site(tmp_path_factory):
    """Images the trained run never saw, in class folders (so --test-only scores them): PNG, JPEG, a DICOM
    with an extension and one without; and beside them a folder of files that are no usable X-ray."""
    root = tmp_path_factory.mktemp("predict") / "new_site"
    for label, tuberculosis in (("Normal", False), ("Tuberculosis", True)):
        pngs = write_xrays(root / label, 3, tuberculosis, size=56, seed=7)
        Image.open(pngs[0]).save(root / label / "as_jpeg.jpg", quality=95)
    if (SHARED_DATA / "dicom-chest").is_dir():
        for name, source in REAL_DICOMS.items():
            shutil.copyfile(SHARED_DATA / "dicom-chest" / source, root / name)
    else:  # a user's clone: generated DICOMs of the same two kinds
        pixels = np.asarray(Image.open(root / "Tuberculosis" / "img_000.png"))
        for preamble, name in ((True, "Tuberculosis/chest.dcm"), (False, "Tuberculosis/chest_noext")):
            write_dicom(root / name, pixels, preamble)
    junk = root / "junk"
    junk.mkdir()
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no picture")
    (junk / "empty.png").touch()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(junk / "colour.png")
    frames = [Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(junk / "frames.tif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(junk / "icon.png")
    (junk / "notes.txt").write_text("site notes")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden system file: no row
    return root


def predict(checkpoint, images, csv_path, *flags) -> dict[str, dict]:
    argv = ["--checkpoint", str(checkpoint), "--images", str(images), "--predictions", str(csv_path)]
    gradcam.main([*argv, "--device", "cpu", "--num-workers", "0", *flags])
    with open(csv_path) as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_every_file_gets_a_row_with_its_status_and_p_tb_equals_test_only(trained_run, new_site, tmp_path, capsys):
    best = trained_run["best"]
    checkpoint = Checkpoint.load(best)

    rows = predict(best, new_site, tmp_path / "predictions.csv", "--num-workers", "2")

    images = {f"{label}/{name}" for label in ("Normal", "Tuberculosis") for name in
              ("img_000.png", "img_001.png", "img_002.png", "as_jpeg.jpg")} | set(REAL_DICOMS)  # fmt: skip
    assert set(rows) == images | set(JUNK)  # one row per file, the hidden one aside, paths relative to the folder
    for path in images:
        assert rows[path]["status"] == "ok", rows[path]
        assert rows[path]["decision"] == ("Tuberculosis" if float(rows[path]["log_odds"])
                                          >= checkpoint.operating_threshold else "Normal")  # fmt: skip
    for path, status in JUNK.items():
        assert rows[path]["status"].startswith(status), rows[path]
        assert rows[path]["p_tb"] == rows[path]["log_odds"] == rows[path]["decision"] == ""
    # P(TB) as torchvision alone computes it from the file and the stored calibration: no shared code.
    pictures = sorted(path for path in images if path.endswith((".png", ".jpg")))
    logits = logits_by_hand(best, [new_site / path for path in pictures])
    scale, bias = checkpoint.state.calibration.scale, checkpoint.state.calibration.bias
    by_hand = torch.sigmoid(scale * (logits[:, 1] - logits[:, 0]) + bias)
    assert [float(rows[path]["p_tb"]) for path in pictures] == pytest.approx(by_hand.tolist(), abs=2e-6)
    log_odds = scale * (logits[:, 1] - logits[:, 0]) + bias  # TB minus Normal, scaled, then shifted
    assert [float(rows[path]["log_odds"]) for path in pictures] == pytest.approx(log_odds.tolist(), abs=2e-5)
    digest = hashlib.sha256(best.read_bytes()).hexdigest()[:12]
    threshold = checkpoint.operating_threshold
    assert {(float(r["threshold_log_odds"]), r["operating_point"], r["checkpoint"]) for r in rows.values()} == {
        (threshold, checkpoint.recommended_operating_point, digest)  # every digit: repr round-trips
    }
    assert {float(r["threshold_p_tb"]) for r in rows.values()} == {1 / (1 + math.exp(-threshold))}
    called = sum(r["decision"] == "Tuberculosis" for r in rows.values())
    assert (
        f"Predicted {len(rows)} files: {len(images)} ok, {len(JUNK)} unreadable, {called} called Tuberculosis at "
        f"log-odds {threshold!r} (P(TB) {1 / (1 + math.exp(-threshold)):.6g}) "
        f"({checkpoint.recommended_operating_point}); wrote {tmp_path / 'predictions.csv'}"
    ) in capsys.readouterr().out

    trainer.main(["--test-only", "--resume", str(best), "--data-dir", str(new_site), "--num-workers", "0",
                  "--bootstrap-resamples", "20", "--tracking-uri", trained_run["uri"]])  # fmt: skip
    (labelled,) = best.parent.glob(f"eval_{best.stem}_new_site_*_predictions.csv")
    with open(labelled) as f:
        scored = list(csv.DictReader(f))
    assert {row["path"] for row in scored} == {str(new_site / path) for path in images}  # DICOMs too
    for row in scored:
        relative = row["path"].removeprefix(f"{new_site}/")
        assert float(row["p_tb"]) == pytest.approx(float(rows[relative]["p_tb"]), abs=1e-5)
        assert row["true_label"] == relative.split("/")[0]
        for name, threshold in checkpoint.state.thresholds.items():
            assert row[f"decision_{name}"] == ("Tuberculosis" if float(row["log_odds"]) >= threshold else "Normal")


def test_a_linked_image_is_listed_under_its_name_in_the_folder(trained_run, new_site, tmp_path):
    # Folders assembled from links into an archive are common; the row names the file as the folder lists it.
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "patient_1.png").symlink_to(new_site / "Normal" / "img_000.png")
    rows = predict(trained_run["best"], folder, tmp_path / "linked.csv")
    assert list(rows) == ["patient_1.png"] and rows["patient_1.png"]["status"] == "ok"


def test_operating_point_sets_the_threshold_and_unknown_names_are_listed(trained_run, new_site, tmp_path, capsys):
    thresholds = Checkpoint.load(trained_run["best"]).state.thresholds
    assert thresholds["who_triage"] != thresholds["youden"]

    rows = predict(trained_run["best"], new_site / "Normal", tmp_path / "p.csv", "--operating-point", "who_triage")

    assert {(float(r["threshold_log_odds"]), r["operating_point"]) for r in rows.values()} == {
        (thresholds["who_triage"], "who_triage")
    }
    assert all(r["decision"] == ("Tuberculosis" if float(r["log_odds"]) >= thresholds["who_triage"] else "Normal")
               for r in rows.values())  # fmt: skip
    with exits_with(capsys, "no operating point 'site_a'; it stores: default .*youden .*who_triage"):
        predict(trained_run["best"], new_site / "Normal", tmp_path / "q.csv", "--operating-point", "site_a")


def test_maps_top_renders_the_highest_p_tb_only_and_none_computes_no_map(trained_run, new_site, tmp_path, monkeypatch):
    out = tmp_path / "maps"

    rows = predict(trained_run["best"], new_site, tmp_path / "p.csv", "--maps", "top", "--num-images", "2",
                   "--output-dir", str(out))  # fmt: skip

    per_image = sorted(p.name for p in out.glob("gradcam_*_full_training.png") if "summary" not in p.name)
    assert len(per_image) == 2
    with open(out / "gradcam_index_full_training.csv") as f:
        mapped = [row["image"] for row in csv.DictReader(f)]
    ok = [(float(r["log_odds"]), path) for path, r in rows.items() if r["status"] == "ok"]
    assert sorted(mapped) == sorted(str(new_site / path) for _, path in sorted(ok, reverse=True)[:2])

    monkeypatch.setattr(gradcam, "explain", lambda *a, **k: pytest.fail("a map was computed"))
    predict(trained_run["best"], new_site / "Normal", tmp_path / "none.csv", "--output-dir", str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("damage", ["resnet18 weights", "truncated file"])
def test_a_checkpoint_that_is_not_ours_is_a_clear_error_naming_the_file(
    trained_run, new_site, tmp_path, damage, capsys
):
    path = tmp_path / "other.pth"
    if damage == "resnet18 weights":
        saved = Checkpoint.load(trained_run["best"]).to_dict()
        saved["model"] = models.resnet18(weights=None).state_dict()
        torch.save(saved, path)
        reason = "its weights are not this project's ResNet50"
    else:
        path.write_bytes(trained_run["best"].read_bytes()[:5000])
        reason = "not a safe, readable checkpoint"

    with exits_with(capsys, re.escape(f"cannot use checkpoint {path}: {reason}")):
        predict(path, new_site / "Normal", tmp_path / "p.csv")

    assert not (tmp_path / "p.csv").exists()
