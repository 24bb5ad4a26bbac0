"""The from-scratch recipe: when it applies, its schedule, CLAHE and intensity augmentation, and the
smoothed model selection, each the same on the fast cached path and the per-image path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_organized, write_xrays

import resnet50_tb_full as trainer
from tbcxr.cache import decoded_cache
from tbcxr.checkpoint import Checkpoint
from tbcxr.config import CLAHE, IMAGENET_MEAN, IMAGENET_STD
from tbcxr.data import IntensityJitter, checkpoint_transform, eval_transform, train_transform
from tbcxr.decoding import equalise, load_xray
from tbcxr.fast_data import CachedBatches, DeviceBatches, augment_intensity, sample_intensity
from tbcxr.metrics import selection_score
from tbcxr.model import build_scheduler
from tbcxr.split import manifest_samples

SCRATCH = {"recipe": "from-scratch", "lr": 1e-3, "backbone_lr_mult": 1.0, "schedule": "cosine", "clahe": True}


def test_from_scratch_recipe_applies_to_random_weights_unless_a_learning_rate_is_given():
    config = trainer.config_from_args(["--weights", "none"])
    assert {key: getattr(config, key) for key in SCRATCH} == SCRATCH
    assert config.intensity_augment and config.warmup_epochs == 1 and config.selection == "last"

    own_lr = trainer.config_from_args(["--weights", "none", "--lr", "3e-4"])
    assert own_lr.recipe == "original" and own_lr.schedule == "plateau" and own_lr.lr == 3e-4
    assert trainer.config_from_args([]).recipe == "original"  # ImageNet weights: the original design's rates
    frozen = trainer.config_from_args(["--weights", "none", "--freeze-features"])
    assert frozen.recipe == "original" and frozen.lr == 1e-3 and frozen.batch_size == 32
    # Explicit flags still win over the recipe's defaults.
    assert not trainer.config_from_args(["--weights", "none", "--no-clahe"]).clahe


def test_cosine_schedule_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [parameter], "lr": 1e-3, "name": "classifier"}])
    scheduler = build_scheduler(optimizer, "cosine", epochs=5, warmup_epochs=1, plateau_patience=3)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # where a longer run would go on
    # Epoch 1 at a tenth, then cosine over the remaining 4 epochs: 1, (1 + cos(pi/4)) / 2, 1/2, (1 - cos(pi/4)) / 2.
    expected = [1e-4, 1e-3, 1e-3 * (1 + np.cos(np.pi / 4)) / 2, 5e-4, 1e-3 * (1 - np.cos(np.pi / 4)) / 2]
    assert rates == pytest.approx(expected)


def test_selection_averages_validation_auc_over_the_window():
    history = [{"val_auc": 0.9, "val_loss": 0.5}, {"val_auc": 0.6, "val_loss": 0.7}, {"val_auc": 0.8, "val_loss": 0.3}]
    assert selection_score(history, 1) == pytest.approx([0.8, -0.3])
    assert selection_score(history, 2) == pytest.approx([0.7, -0.5])


def test_clahe_is_the_same_on_the_cached_path_the_per_image_path_and_a_checkpoint(tmp_path):
    paths = [str(p) for p in write_xrays(tmp_path / "imgs", 3, True, size=80)]
    cache = decoded_cache(paths, 48, tmp_path / "cache")
    fast, _ = next(iter(DeviceBatches(CachedBatches(cache, [1] * 3, 3, clahe=True), torch.device("cpu"), 48, False)))
    slow = torch.stack([eval_transform(48, clahe=CLAHE)(load_xray(p)) for p in paths])
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    plain = torch.stack([eval_transform(48)(load_xray(p)) for p in paths])
    assert (slow - plain).abs().max() > 0.1  # CLAHE really changed the pixels
    checkpoint = Checkpoint({}, {"clahe": True}, 48, trainable_parameters=0, clahe=dict(CLAHE))
    torch.testing.assert_close(torch.stack([checkpoint_transform(checkpoint)(load_xray(p)) for p in paths]), slow)
    # The checkpoint's own settings are used, not today's defaults.
    other = dataclasses.replace(checkpoint, clahe={"clip_limit": 8.0, "tile_grid": [2, 2]})
    assert not torch.allclose(torch.stack([checkpoint_transform(other)(load_xray(p)) for p in paths]), slow)
    # OpenCV's CLAHE spreads a low-contrast image over a wider range.
    flat = (100 + 10 * np.random.default_rng(0).random((64, 64))).astype(np.uint8)
    assert np.ptp(equalise(flat)) > 2 * np.ptp(flat)


def test_intensity_augmentation_identity_and_ranges():
    images = torch.rand(4, 1, 16, 16)
    identity = {"gamma": torch.ones(4), "blur_sigma": torch.zeros(4), "noise_std": torch.zeros(4)}
    torch.testing.assert_close(augment_intensity(images, identity, None), images.clamp(min=1e-6), atol=1e-6, rtol=0)

    params = sample_intensity(2000, torch.Generator().manual_seed(0), "cpu")
    assert 0.7 <= params["gamma"].min() and params["gamma"].max() <= 1.4
    assert params["gamma"].min() < 0.75 and params["gamma"].max() > 1.35  # the whole range is used
    assert params["blur_sigma"].max() <= 1.0 and params["noise_std"].max() <= 0.03

    bright = augment_intensity(torch.full((1, 1, 8, 8), 0.25), {"gamma": torch.tensor([0.5]),
                               "blur_sigma": torch.zeros(1), "noise_std": torch.zeros(1)}, None)  # fmt: skip
    torch.testing.assert_close(bright, torch.full((1, 1, 8, 8), 0.5))  # 0.25 ** 0.5

    edge = torch.zeros(1, 1, 9, 9)
    edge[..., 4:] = 1.0
    blurred = augment_intensity(edge, {"gamma": torch.ones(1), "blur_sigma": torch.ones(1),
                                       "noise_std": torch.zeros(1)}, None)  # fmt: skip
    assert 0.1 < blurred[0, 0, 4, 3] < 0.5 < blurred[0, 0, 4, 4] < 0.9  # the step is softened, not moved


def test_per_image_training_transform_with_the_recipe_is_seeded_and_applies_both(tmp_path):
    image = load_xray(write_xrays(tmp_path, 1, True, size=64)[0])

    def draw(**options):
        torch.manual_seed(3)
        return train_transform(48, **options)(image)

    recipe = draw(clahe=True, intensity=True)
    assert torch.equal(recipe, draw(clahe=True, intensity=True))  # seeded per sample
    assert recipe.shape == (3, 48, 48)
    for partial in (draw(), draw(clahe=True), draw(intensity=True)):
        assert (recipe - partial).abs().max() > 0.05  # each option really changes the pixels
    grey = recipe * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(grey[0], grey[2])  # the three channels carry one greyscale picture
    assert 0.0 <= grey.min() and grey.max() <= 1.0 + 1e-6


def test_loaders_apply_clahe_to_every_side_and_intensity_to_train_only(tmp_path):
    data = make_organized(tmp_path / "data", train=8, test=3, size=48)
    from tbcxr.data import LoaderSettings, PreparationSettings, make_loaders, prepare_manifest

    split = PreparationSettings(val_fraction=0.3, test_fraction=0.2, seed=0)
    manifest = prepare_manifest(str(data), tmp_path / "m.json", split, workers=1)
    for fast in (True, False):
        settings = LoaderSettings(
            image_size=32,
            batch_size=4,
            seed=0,
            oversample=False,
            fast_data=fast,
            cache_dir=tmp_path / "cache",
            num_workers=0,
        )
        plain = make_loaders(manifest, torch.device("cpu"), settings)
        recipe = make_loaders(manifest, torch.device("cpu"), dataclasses.replace(settings, clahe=True, intensity=True))
        for side in (1, 2):  # validation and test: CLAHE only, exactly the per-image evaluation transform
            images, _ = next(iter(recipe[side]))
            assert (images - next(iter(plain[side]))[0]).abs().max() > 0.1
            samples = [p for p, _ in manifest_samples(manifest, ("train", "val", "test")[side])]
            expected = torch.stack([eval_transform(32, clahe=CLAHE)(load_xray(p)) for p in samples[: len(images)]])
            torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
        if fast:
            assert recipe[0].intensity and not recipe[1].intensity and not plain[0].intensity
        else:
            assert any(isinstance(step, IntensityJitter) for step in recipe[0].dataset.transform.transforms)
            assert not any(isinstance(step, IntensityJitter) for step in recipe[1].dataset.transform.transforms)


def test_recipe_flags_resolve_as_documented(capsys):
    assert trainer.config_from_args(["--weights", "none", "--recipe", "original"]).schedule == "plateau"
    assert trainer.config_from_args(["--demo"]).recipe == "original"  # the demo keeps its own settings
    with pytest.raises(SystemExit):
        trainer.config_from_args(["--warmup-epochs", "2"])  # plateau has no warm-up
    assert "--warmup-epochs needs --schedule cosine" in capsys.readouterr().err


def test_selection_waits_for_a_full_window_and_last_takes_the_latest_epoch():
    history = [{"val_auc": 0.8, "val_loss": 0.5}, {"val_auc": 0.6, "val_loss": 0.7}]
    assert selection_score(history[:1], 2) == [-float("inf"), -float("inf")]  # one noisy epoch cannot win
    assert selection_score(history, 2) == pytest.approx([0.7, -0.6])
    assert selection_score(history, 0) > selection_score(history[:1], 0)  # "last": a worse AUC still wins


def test_a_from_scratch_run_says_so_and_records_its_preprocessing(tmp_path, capsys, monkeypatch):
    data = make_organized(tmp_path / "data", train=8, test=3, size=40)
    ckpt = tmp_path / "ckpt"
    trainer.main(["--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                  *"--weights none --epochs 2 --image-size 32 --batch-size 8 --num-workers 0".split()])  # fmt: skip
    out = capsys.readouterr().out
    assert "From-scratch recipe for random initial weights (cosine schedule, 1-epoch warm-up, CLAHE, intensity" in out
    assert "Using different learning rates: Backbone 1.00e-03, Classifier 1.00e-03" in out
    best = Checkpoint.load(ckpt / "best_resnet50_tb_full_trained.pth")
    assert best.state.epoch == best.state.best_epoch == 2  # --selection last: the schedule's end
    assert best.clahe == {"clip_limit": 2.0, "tile_grid": (8, 8)}
    last = Checkpoint.load(ckpt / "last.pth")
    assert [h["lr_classifier"] for h in last.state.history] == pytest.approx([1e-4, 1e-3])  # warm-up, then cosine

    with pytest.raises(SystemExit):  # a cosine schedule cannot be stretched on resume
        trainer.config_from_args(["--resume", str(ckpt / "last.pth"), "--epochs", "5"])
    assert "--epochs cannot change on resume: they laid out the cosine schedule" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nor can the rule that chose the best checkpoint so far
        trainer.config_from_args(["--resume", str(ckpt / "last.pth"), "--selection", "auc"])
    assert "--selection cannot change on resume" in capsys.readouterr().err
    assert trainer.config_from_args(["--resume", str(ckpt / "last.pth"), "--selection", "last"]).selection == "last"
    with pytest.raises(SystemExit):  # nor the learning rates: Adam's saved state would override them unseen
        trainer.config_from_args(["--resume", str(ckpt / "last.pth"), "--lr", "1e-5"])
    assert "--lr cannot change on resume: the optimizer's saved state holds the rates" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nor the schedule, whose state the scheduler saved
        trainer.config_from_args(["--resume", str(ckpt / "last.pth"), "--schedule", "plateau"])
    assert "--schedule cannot change on resume: the scheduler's saved state holds it" in capsys.readouterr().err
    # Evaluation takes nothing from the saved config: without --data-dir it scores the split manifest's test side.
    monkeypatch.setenv("TB_DATA_DIR", str(tmp_path / "elsewhere"))
    assert (
        trainer.config_from_args(["--test-only", "--resume", str(ckpt / "best_resnet50_tb_full_trained.pth")]).data_dir
        == ""
    )
