"""The checkpoint file: a plain dict that loads without running code, read back field for field into a
typed Checkpoint; the operating point and calibration predictions use; a clear error for any file that
is not one of ours."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch
from torch import nn

from tbcxr.checkpoint import Checkpoint, RunState
from tbcxr.config import CLAHE, FULL_TRAINING, TRANSFER_LEARNING
from tbcxr.errors import CheckpointError
from tbcxr.metrics import Calibration, select_thresholds
from tbcxr.model import build_model

# The keys of the file on disk: files written before keep loading only while these stay.
KEYS = {"format", "model", "config", "class_names", "image_size", "mean", "std", "trainable_parameters",
        "mlflow_run_id", "tracking_uri", "preprocessing", "split_digest", *RunState.__dataclass_fields__}  # fmt: skip
TRAINING_KEYS = {"optimizer", "scheduler", "scaler"}


def test_a_saved_checkpoint_is_a_plain_dict_and_loads_back_field_for_field(tmp_path):
    torch.manual_seed(0)
    model = build_model("none", freeze_features=True)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=3)
    thresholds = select_thresholds([0, 0, 1, 1, 1], [0.1, 0.4, 0.35, 0.8, 0.9])
    state = RunState(epoch=3, best_epoch=2, history=[{"epoch": 1, "val_loss": 0.5}], thresholds=thresholds,
                     calibration=Calibration(0.6, -1.2), operating_points_epoch=3, train_seconds=12.5,
                     peak_memory_mb=300.0)  # fmt: skip
    saved = Checkpoint.from_model(
        model, {"freeze_features": True, "experiment": "mine", "weights": "none"}, 32, state=state,
        clahe=dict(CLAHE), split_digest="0123456789abcdef", mlflow_run_id="run1", tracking_uri="sqlite:///m.db",
        optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(), scaler_state={},
    )  # fmt: skip
    path = tmp_path / "last.pth"
    saved.save(path)

    plain = torch.load(path, weights_only=True)  # no code runs: tensors and built-in containers only
    assert type(plain) is dict and plain["format"] == 3 and plain.keys() == KEYS | TRAINING_KEYS
    assert plain["preprocessing"] == {"clahe": {"clip_limit": 2.0, "tile_grid": (8, 8)}}
    loaded = Checkpoint.load(path)
    assert loaded.state == state
    assert loaded.clahe == CLAHE and loaded.split_digest == "0123456789abcdef"
    assert (loaded.mlflow_run_id, loaded.tracking_uri) == ("run1", "sqlite:///m.db")
    assert loaded.image_size == 32 and loaded.class_names == ["Normal", "Tuberculosis"]
    assert loaded.trainable_parameters == 4098 and loaded.resumable
    assert loaded.profile is TRANSFER_LEARNING and loaded.experiment == "mine" and loaded.initial_weights == "none"
    assert loaded.model_state.keys() == model.state_dict().keys()
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded.optimizer_state["state"][0]["exp_avg"], exp_avg)
    torch.optim.Adam(model.fc.parameters(), lr=1e-3).load_state_dict(loaded.optimizer_state)  # restorable as saved

    weights_only = tmp_path / "best.pth"
    Checkpoint.from_model(model, {}, 32).save(weights_only)
    assert torch.load(weights_only, weights_only=True).keys() == KEYS  # a best_*.pth holds no training state
    best = Checkpoint.load(weights_only)
    assert not best.resumable and best.clahe is None and best.profile is FULL_TRAINING


@pytest.mark.parametrize("missing", [f.name for f in fields(RunState)])
def test_a_checkpoint_written_before_a_run_state_field_existed_loads_with_that_fields_default(tmp_path, missing):
    """Every field added to RunState later would otherwise make every checkpoint saved before it unreadable."""
    saved_values = dict(epoch=3, best_score=[0.9, -0.2], best_epoch=2, stale_epochs=1, history=[{"epoch": 1}],
                        train_seconds=12.5, completed=True, thresholds={"default": 0.5, "youden": 0.6},
                        calibration=Calibration(0.6, -1.2), operating_points_epoch=3, peak_memory_mb=300.0)  # fmt: skip
    assert all(value != getattr(RunState(), name) for name, value in saved_values.items())  # none is a default
    state = RunState(**saved_values)
    plain = Checkpoint({"w": torch.ones(3)}, {}, 32, trainable_parameters=3, state=state).to_dict()
    path = tmp_path / "older.pth"
    torch.save({key: value for key, value in plain.items() if key != missing}, path)

    loaded = Checkpoint.load(path).state

    assert loaded == replace(state, **{missing: getattr(RunState(), missing)})


def test_the_rebuilt_model_gives_identical_logits(tmp_path):
    torch.manual_seed(1)
    model = build_model("none")
    model(torch.randn(4, 3, 32, 32))  # training mode: BatchNorm running statistics move away from their start
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    Checkpoint.from_model(model, {}, 32).save(tmp_path / "c.pth")

    rebuilt = Checkpoint.load(tmp_path / "c.pth").model().eval()

    with torch.no_grad():
        assert torch.equal(rebuilt(images), expected)


def test_the_recommended_operating_point_and_the_calibration_defaults():
    fresh = Checkpoint({}, {}, 32, trainable_parameters=0)  # as before the first epoch is validated
    assert fresh.recommended_operating_point == "default" and fresh.operating_threshold == 0.0  # log-odds: P 0.5
    assert fresh.state.calibration == Calibration(scale=1.0, bias=0.0)  # predictions are the network's softmax

    validated = Checkpoint({}, {}, 32, 0, RunState(thresholds={"default": 0.5, "youden": 0.62, "who_triage": 0.3}))
    assert validated.recommended_operating_point == "youden" and validated.operating_threshold == 0.62


def small_checkpoint(path):
    Checkpoint({"w": torch.ones(3)}, {}, 32, trainable_parameters=3).save(path)
    return path


def damaged(path):
    small_checkpoint(path)
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short
    return path


def another_architectures_state_dict(path):
    torch.save(nn.Linear(4, 2).state_dict(), path)
    return path


def another_format(path):
    plain = Checkpoint({"w": torch.ones(3)}, {}, 32, trainable_parameters=3).to_dict()
    torch.save(plain | {"format": 4}, path)
    return path


def a_key_missing(path):
    plain = Checkpoint({"w": torch.ones(3)}, {}, 32, trainable_parameters=3).to_dict()
    torch.save({key: value for key, value in plain.items() if key != "split_digest"}, path)
    return path


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda path: path, "file not found"),
        (damaged, "not a safe, readable checkpoint"),
        (another_architectures_state_dict, "not a checkpoint written by resnet50_tb_full.py"),
        (another_format, "it is in checkpoint format 4, which this version does not read (it reads formats 1, 2, 3"),
        (a_key_missing, "not a checkpoint written by resnet50_tb_full.py (no 'split_digest')"),
    ],
    ids=["missing", "damaged", "state-dict", "format-4", "key-missing"],
)
def test_a_file_that_is_not_one_of_our_checkpoints_is_refused_naming_the_file(tmp_path, make, problem):
    path = make(tmp_path / "model.pth")

    with pytest.raises(CheckpointError) as error:
        Checkpoint.load(path)

    message = str(error.value)
    assert f"cannot use checkpoint {path}: {problem}" in message
    assert "python resnet50_tb_full.py" in message  # how to get one that works


def test_a_format_2_checkpoint_loads_its_p_tb_thresholds_as_log_odds_that_decide_alike(tmp_path):
    """Format 2 stored P(TB) thresholds, compared with a float32 softmax; format 3 stores log-odds. A stored
    1.0 (a WHO triage point on saturated scores) meant "TB where float32 P(TB) is 1.0", not "never TB"."""
    plain = Checkpoint({"w": torch.ones(3)}, {}, 32, trainable_parameters=3).to_dict()
    del plain["validation_counts"]  # format 2 had none
    stored = {"default": 0.5, "youden": 0.62, "who_triage": 1.0}
    torch.save(plain | {"format": 2, "thresholds": stored}, tmp_path / "old.pth")

    loaded = Checkpoint.load(tmp_path / "old.pth")

    thresholds = loaded.state.thresholds
    assert thresholds["default"] == 0.0 and thresholds["youden"] == pytest.approx(math.log(0.62 / 0.38), abs=1e-12)
    assert loaded.state.validation_counts == {} and loaded.operating_threshold == thresholds["youden"]
    gaps = torch.tensor([-3.0, 0.0, 0.48, 0.5, 0.49, 2.0, 16.6, 16.63, 16.64, 16.7, 17.4, 25.0, 60.0])
    for offset in (-4.0, 0.0, 7.0):  # the Normal logit: float32 softmax rounds alike wherever the pair sits
        logits = torch.stack([torch.full_like(gaps, offset), offset + gaps], dim=1)
        old_p = torch.softmax(logits.float(), dim=1)[:, 1]
        for name, p in stored.items():
            assert (old_p >= p).tolist() == (gaps.double().numpy() >= thresholds[name]).tolist(), (name, offset)
