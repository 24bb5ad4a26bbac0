"""GradCAM script: output files and index, correctness (pointing game, faithfulness), errors."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import coloured_share, exits_with, make_organized
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

import resnet50_gradcam_tb_full as gradcam
from tbcxr import explain as cams
from tbcxr.checkpoint import Checkpoint, read_json
from tbcxr.config import MANIFEST_NAME
from tbcxr.data import PreparationSettings, XrayDataset, eval_transform, prepare_manifest
from tbcxr.decoding import load_xray
from tbcxr.demo import synthetic_xray
from tbcxr.model import build_model
from tbcxr.split import split_digest


def save_tiny_checkpoint(path, freeze_features=False, image_size=32, **extra):
    """A checkpoint of random weights; beside a split manifest it records that split, as training does."""
    torch.manual_seed(0)
    model = build_model("none", freeze_features=freeze_features)
    config = {"freeze_features": freeze_features, "image_size": image_size}
    manifest = path.parent / MANIFEST_NAME
    digest = split_digest(read_json(manifest)) if manifest.is_file() else ""
    Checkpoint.from_model(model.eval(), config, image_size, split_digest=digest, **extra).save(path)
    return path


@pytest.fixture
def trained_layout(tmp_path):
    """An organized data set, its split manifest and a checkpoint beside it."""
    data = make_organized(tmp_path / "data", train=6, test=3, size=40)
    ckpt_dir = tmp_path / "checkpoints"
    prepare_manifest(str(data), ckpt_dir / MANIFEST_NAME, PreparationSettings(0.2, 0.2, seed=0), workers=0)
    return data, ckpt_dir


def test_outputs_index_comparison_and_mlflow_artifacts(tmp_path, trained_layout, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("training", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment)
    _, ckpt_dir = trained_layout
    best = save_tiny_checkpoint(
        ckpt_dir / "best_resnet50_tb_full_trained.pth", mlflow_run_id=run.info.run_id, tracking_uri=uri
    )
    transfer = save_tiny_checkpoint(tmp_path / "transfer.pth", freeze_features=True)
    out = tmp_path / "out"

    result = gradcam.main(
        [
            "--checkpoint",
            str(best),
            "--num-images",
            "2",
            "--output-dir",
            str(out),
            "--compare-checkpoint",
            str(transfer),
            "--device",
            "cpu",
        ]
    )

    names = {p.name for p in out.iterdir()}
    expected = {f"gradcam_{c}_{i}_full_training.png" for c in ("normal", "tuberculosis") for i in (1, 2)}
    expected |= {f"gradcam_compare_{c}_{i}.png" for c in ("normal", "tuberculosis") for i in (1, 2)}
    expected |= {
        "gradcam_summary_full_training.png",
        "gradcam_index_full_training.csv",
        "gradcam_index_full_training.json",
    }
    assert names == expected
    assert all(coloured_share(out / name) > 0.2 for name in names if name.endswith(".png"))  # maps drawn
    with open(out / "gradcam_index_full_training.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["true_label"] for r in rows] == ["Normal", "Normal", "Tuberculosis", "Tuberculosis"]
    assert all(r["file"] in names and 0 <= float(r["probability_tuberculosis"]) <= 1 for r in rows)
    assert all(r["correct"] == str(r["true_label"] == r["predicted_label"]) for r in rows)
    index = json.loads((out / "gradcam_index_full_training.json").read_text())
    assert set(index["mean_road_per_class"]) == {"Normal", "Tuberculosis"}
    assert index["mean_road_per_class"]["Normal"] == pytest.approx(
        np.mean([float(r["road_score"]) for r in rows[:2]]), abs=1e-5
    )
    console = capsys.readouterr().out
    assert "Faithfulness (ROAD combined, higher is better): Normal" in console
    assert f"logged {len(names)} files to MLflow run {run.info.run_id}" in console
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "gradcam")}
    assert logged == {f"gradcam/{name}" for name in names}
    assert len(result["images"]) == 4


def test_transfer_learning_checkpoint_uses_its_label_and_folder(tmp_path, trained_layout, monkeypatch, capsys):
    data, ckpt_dir = trained_layout
    ckpt = save_tiny_checkpoint(ckpt_dir / "best_resnet50_tb_finetuned.pth", freeze_features=True)
    monkeypatch.chdir(tmp_path)

    gradcam.main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--num-images", "1", "--method", "gradcam++"])

    out = tmp_path / "gradcam_results" / "resnet50_tb"
    assert (out / "gradcam_normal_1_transfer_learning.png").is_file()
    assert (out / "gradcam_tuberculosis_1_transfer_learning.png").is_file()
    assert "files written locally only" in capsys.readouterr().out


def test_arbitrary_images_greyscale_and_rgb_give_the_same_map(tmp_path):
    pixels = synthetic_xray(np.random.default_rng(5), 64, tuberculosis=True)
    Image.fromarray(pixels, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.stack([pixels] * 3, -1), mode="RGB").save(tmp_path / "rgb.jpg", quality=100)
    Image.fromarray(np.stack([pixels] * 3, -1), mode="RGB").save(tmp_path / "rgb.png")
    ckpt = Checkpoint.load(save_tiny_checkpoint(tmp_path / "c.pth"))
    model = ckpt.model()
    samples = gradcam.samples_from_paths([str(tmp_path / "grey.png"), str(tmp_path / "rgb.png")])
    assert [label for _, label in samples] == [cams.UNLABELLED] * 2

    grey, rgb = cams.explain(model, model.layer4, samples, ckpt, torch.device("cpu"), "gradcam", "predicted", 2)

    np.testing.assert_array_equal(grey.cam, rgb.cam)
    assert grey.prob_tb == rgb.prob_tb


def test_batched_maps_equal_one_at_a_time(tmp_path):
    model = Checkpoint.load(save_tiny_checkpoint(tmp_path / "c.pth")).model().eval()
    torch.manual_seed(1)
    batch = torch.randn(4, 3, 64, 64)
    targets = [0, 1, 1, 0]

    together = cams.compute_cams(model, model.layer4, batch, targets, "gradcam")
    alone = np.concatenate(
        [cams.compute_cams(model, model.layer4, batch[i : i + 1], targets[i : i + 1], "gradcam") for i in range(4)]
    )

    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not any(module._forward_hooks for module in model.modules())  # the context manager cleaned up


def test_each_map_explains_the_class_it_was_asked_for(tmp_path):
    model = Checkpoint.load(save_tiny_checkpoint(tmp_path / "c.pth")).model().eval()
    torch.manual_seed(2)
    image = torch.randn(1, 3, 64, 64)
    normal, tuberculosis = (cams.compute_cams(model, model.layer4, image, [c], "gradcam")[0] for c in (0, 1))
    assert not np.allclose(normal, tuberculosis, atol=1e-3)  # --target normal and tuberculosis differ
    both = cams.compute_cams(model, model.layer4, image.repeat(2, 1, 1, 1), [1, 0], "gradcam")
    np.testing.assert_allclose(both, np.stack([tuberculosis, normal]), atol=1e-5)  # each image its own target


def explanation(prob_tb: float, threshold: float, predicted: int, true_label: int = 0) -> cams.Explanation:
    """`prob_tb` and `threshold` as P(TB); the explanation holds the log-odds that decide."""
    rng = np.random.default_rng(0)
    return cams.Explanation(
        path="case.png",
        true_label=true_label,
        prob_tb=prob_tb,
        log_odds=math.log(prob_tb / (1 - prob_tb)),
        predicted=predicted,
        target=predicted,
        cam=rng.random((32, 32), dtype=np.float32),
        rgb=rng.random((32, 32, 3), dtype=np.float32),
        road=0.1,
        threshold=math.log(threshold / (1 - threshold)),
        chosen_on="validation (30 Normal and 21 Tuberculosis)",
    )


def test_captions_give_p_tb_against_the_threshold_in_every_figure(tmp_path, monkeypatch):
    below = explanation(0.515, 0.6, predicted=0)
    assert cams.caption(below) == (
        "True: Normal | Pred: Normal | P(TB) 51.5% vs threshold 60.0%: log-odds 0.1 < 0.4 | "
        "threshold chosen on validation (30 Normal and 21 Tuberculosis)"
    )
    assert "P(TB) 61.0% vs threshold 60.0%: log-odds 0.45 ≥ 0.41" in cams.caption(explanation(0.61, 0.6, predicted=1))
    assert "P(TB) 59.96% vs threshold 60.00%: log-odds 0.40 < 0.41" in cams.caption(
        explanation(0.5996, 0.6, predicted=0)
    )
    # Saturated: P(TB) prints alike on both sides; the log-odds, with as many decimals as it takes, do not.
    saturated = explanation(0.5, 0.5, predicted=0)
    saturated.log_odds, saturated.threshold, saturated.prob_tb = 40.25, 40.5, 1.0
    assert "P(TB) 100.0% vs threshold 100.0%: log-odds 40.2 < 40.5" in cams.caption(saturated)

    figures = []
    monkeypatch.setattr(cams, "save_figure", lambda fig, path, dpi: figures.append(fig))
    cams.render_explanation(below, "gradcam", "full_training", tmp_path / "one.png")
    cams.render_grid([below], "gradcam", "full_training", tmp_path / "grid.png")
    cams.render_comparison((below, below), ("full_training", "transfer_learning"), "gradcam", tmp_path / "pair.png")
    assert len(figures) == 3
    for fig in figures:
        text = " ".join([t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes])
        cams.pyplot().close(fig)
        assert "Pred: Normal" in text and "P(TB) 51.5% vs threshold 60.0%: log-odds 0.1 < 0.4" in text
        assert "chosen on validation (30 Normal and 21 Tuberculosis)" in text
        assert "48.5%" not in text  # 1 - P(TB) would read as "48.5% sure it is Normal"


def test_missing_checkpoint_names_the_training_command(tmp_path, capsys):
    with exits_with(capsys, r"file not found\.\nTrain one first, e\.g\.: python resnet50_tb_full\.py"):
        gradcam.main(["--checkpoint", str(tmp_path / "nope.pth")])


def test_no_usable_image_to_explain_is_a_clear_error_naming_the_reason(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "c.pth")
    (tmp_path / "broken.png").write_text("this is not a PNG")
    reason = "1 cannot identify image file 'the file'"
    with exits_with(capsys, re.escape(f"no map to draw: no image given can be scored as a chest X-ray: {reason} ("
                                      f"{tmp_path / 'broken.png'})")):  # fmt: skip
        gradcam.main(
            ["--checkpoint", str(ckpt), "--images", str(tmp_path / "broken.png"), "--output-dir", str(tmp_path / "out")]
        )


# --------------------------------------------------------------------------- correctness
class BlobNet(nn.Module):
    """A small CNN with ResNet's tail (conv features, global average pool, linear head)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def blob_images(folder, count, seed):
    """Noise images; positives carry one bright blob at a random place. Returns (path, label, centre)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    samples = []
    for i in range(count):
        label = i % 2
        img = rng.normal(0.35, 0.08, (64, 64))
        centre = rng.integers(10, 54, size=2)
        if label:
            img += 0.6 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 4.0**2))
        path = folder / f"{i:03d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(path)
        samples.append((str(path), label, centre))
    return samples


def test_pointing_game_and_faithfulness_on_blob_task(tmp_path):
    torch.manual_seed(0)
    transform = eval_transform(64)
    train = blob_images(tmp_path / "train", 240, seed=0)
    dataset = XrayDataset([(p, label) for p, label, _ in train], transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    model = BlobNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    checkpoint = Checkpoint.from_model(model, {}, 64)  # ImageNet normalisation, threshold 0.5, identity calibration

    test = blob_images(tmp_path / "test", 40, seed=1)
    explanations = cams.explain(
        model,
        model.features[-1],
        [(p, label) for p, label, _ in test],
        checkpoint,
        torch.device("cpu"),
        "gradcam",
        "tuberculosis",
        batch_size=20,
        score_faithfulness=False,
    )
    hits = []
    for e, (_, label, centre) in zip(explanations, test):
        if label == 1 and not e.wrong:
            peak = np.unravel_index(np.argmax(e.cam), e.cam.shape)
            hits.append(np.hypot(*(np.asarray(peak) - centre)) <= 8)  # inside the blob (2 sigma)
    assert len(hits) >= 16, "the blob model should classify most positives correctly"
    assert np.mean(hits) >= 0.8

    positives = [(p, 1) for p, label, _ in test if label == 1][:10]
    batch = torch.stack([transform(load_xray(p)) for p, _ in positives])
    maps = cams.compute_cams(model, model.features[-1], batch, [1] * len(positives), "gradcam")
    real = cams.faithfulness(model, batch, maps, [1] * len(positives))
    inverted = cams.faithfulness(model, batch, 1 - maps, [1] * len(positives))
    # The inverted map keeps what the model uses and removes the rest: it must score worse on every image.
    assert (real > inverted).all()
    assert real.mean() - inverted.mean() > 0.5 * np.abs(real).mean()


# --------------------------------------------------------------------------- ROAD is reproducible
def tiny_model(tmp_path):
    return Checkpoint.load(save_tiny_checkpoint(tmp_path / "c.pth")).model().eval()


def test_road_scores_repeat_exactly_and_ignore_the_rest_of_the_batch(tmp_path):
    model = tiny_model(tmp_path)
    torch.manual_seed(2)
    batch = torch.randn(3, 3, 32, 32)
    targets = [1, 0, 1]
    maps = cams.compute_cams(model, model.layer4, batch, targets, "gradcam")
    caller_rng = torch.get_rng_state()

    first = cams.faithfulness(model, batch, maps, targets, seed=0)
    again = cams.faithfulness(model, batch, maps, targets, seed=0)
    alone = cams.faithfulness(model, batch[2:], maps[2:], targets[2:], seed=0)

    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert alone[0] == first[2]
    assert torch.equal(torch.get_rng_state(), caller_rng)  # the caller's random stream is left as it was
    assert not np.array_equal(cams.faithfulness(model, batch, maps, targets, seed=1), first)


@pytest.mark.parametrize("flat", ["all zero", "half zero, half one"])
def test_road_on_flat_maps_removes_each_percentile_share(tmp_path, monkeypatch, flat):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    model = tiny_model(tmp_path)
    torch.manual_seed(3)
    batch = torch.randn(1, 3, 32, 32)
    cam = np.zeros((1, 32, 32), dtype=np.float32)
    if flat == "half zero, half one":
        cam[:, :16] = 1.0  # the upper half is the most relevant
    kept_masks = []
    impute = NoisyLinearImputer.__call__

    def recording(self, img, mask):
        kept_masks.append(mask.numpy().astype(bool))  # True: pixel kept, False: removed and imputed
        return impute(self, img, mask)

    monkeypatch.setattr(NoisyLinearImputer, "__call__", recording)

    scores = [cams.faithfulness(model, batch, cam, [1]) for _ in range(2)]

    assert np.isfinite(scores[0]).all() and scores[0] == scores[1]
    # Least relevant removed first at each percentile, then most relevant first: each keeps its share.
    shares = [mask.mean() for mask in kept_masks[:8]]
    assert shares == pytest.approx([p / 100 for p in cams.ROAD_PERCENTILES] * 2, abs=2 / cam.size)
    if flat == "half zero, half one":
        lerf_20, morf_20 = kept_masks[0], kept_masks[4]
        assert lerf_20[:16].sum() == lerf_20.sum()  # keeps only the most relevant (upper) half's pixels
        assert morf_20[16:].sum() == morf_20.sum()  # keeps only the least relevant (lower) half's pixels
