"""One screening rule: --test-only, GradCAM, batch prediction and the served model leave the same files out
(colour, strip-shaped, multi-frame), each with the same reason, score every other file, and list what they
left out in their outputs."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import write_xrays
from mlflow.pyfunc import PythonModelContext
from PIL import Image

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr.predict import UNREADABLE
from tbcxr.serving import CHECKPOINT_ARTIFACT, TuberculosisClassifier

EXPECTED = {
    "Normal/photo.png": "colour image, not a greyscale radiograph",
    "Tuberculosis/strip.png": "160x40 pixels is not the size of a chest radiograph",
    "Normal/frames.tif": "multi-frame image (2 frames); only single radiographs are scored",
}


def sample_with_odd_files(root: Path) -> Path:
    """A labelled folder: 4 synthetic X-rays per class (seeds the training run never used) and, among them, a
    colour photo, a strip (4:1) and a two-frame TIFF, each made of X-ray pixels so only its shape is odd."""
    for label, name in enumerate(("Normal", "Tuberculosis")):
        write_xrays(root / name, 4, tuberculosis=bool(label), size=40, seed=50)
    grey = np.asarray(Image.open(root / "Normal" / "img_000.png"))
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "Normal" / "photo.png")
    Image.fromarray(np.tile(grey, (1, 4))).save(root / "Tuberculosis" / "strip.png")
    frames = [Image.fromarray(grey), Image.fromarray(255 - grey)]
    frames[0].save(root / "Normal" / "frames.tif", save_all=True, append_images=frames[1:])
    return root


def test_every_scoring_path_leaves_out_the_same_files_for_the_same_reason(trained_run, tmp_path):
    best = trained_run["best"]
    folder = sample_with_odd_files(tmp_path / "screening_sample")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = [path.relative_to(folder).as_posix() for path in files]
    named = {path: name for path, name in zip(map(str, files), names)}

    # Batch prediction: one CSV row per file, the odd ones `unreadable: <reason>`.
    predictions = tmp_path / "predictions.csv"
    gradcam.main(["--checkpoint", str(best), "--images", str(folder), "--predictions", str(predictions)])
    with open(predictions, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    predicted = {name: row["status"].removeprefix(f"{UNREADABLE}: ") for name, row in rows.items() if row["p_tb"] == ""}
    assert predicted == EXPECTED

    # --test-only: scored without them; its report lists them with the reason.
    report = trainer.main(["--test-only", "--resume", str(best), "--data-dir", str(folder), "--bootstrap-resamples",
                           "20"])  # fmt: skip
    assert {named[entry["path"]]: entry["reason"] for entry in report["left_out"]} == EXPECTED
    assert report["n_images"] == len(files) - len(EXPECTED)
    (scored,) = Path(best).parent.glob(f"eval_{Path(best).stem}_screening_sample_*_predictions.csv")
    with open(scored, newline="") as f:
        assert {named[row["path"]] for row in csv.DictReader(f)} == set(rows) - set(EXPECTED)

    # GradCAM maps of the odd files and one X-ray (a map takes seconds): a map of the X-ray only; its index
    # lists the others with the reason.
    given = [str(folder / name) for name in EXPECTED] + [str(folder / "Normal" / "img_000.png")]
    maps = gradcam.main(["--checkpoint", str(best), "--images", *given, "--output-dir", str(tmp_path / "maps"),
                         "--maps", "all"])  # fmt: skip
    assert {named[entry["image"]]: entry["reason"] for entry in maps["left_out"]} == EXPECTED
    assert [named[image["image"]] for image in maps["images"]] == ["Normal/img_000.png"]

    # The served model: each odd upload's row says why; every other row has its P(TB), the CSV's.
    model = TuberculosisClassifier()
    model.load_context(PythonModelContext(artifacts={CHECKPOINT_ARTIFACT: str(best)}, model_config={}))
    uploads = pd.DataFrame({"image": [base64.b64encode(path.read_bytes()).decode() for path in files]})
    answer = model.predict(None, uploads)
    served = {name: status.removeprefix(f"{UNREADABLE}: ") for name, status in zip(names, answer["status"])}
    assert {name: reason for name, reason in served.items() if reason != "ok"} == EXPECTED
    for name, p_tb in zip(names, answer["p_tb"]):
        if name not in EXPECTED:
            assert abs(p_tb - float(rows[name]["p_tb"])) <= 1e-6
