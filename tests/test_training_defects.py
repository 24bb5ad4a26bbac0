"""Model selection, early stopping, the recipe choice and resume, each where a run once went wrong:
patience spent before a selection window was full, another run's best file scored as this run's,
--backbone-lr-mult silently dropping the from-scratch recipe, settings ignored or changed on resume,
and a kill between the best checkpoint's write and last.pth's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, exits_with, make_organized

import resnet50_tb_full as trainer
from tbcxr.checkpoint import read_json

BEST = "best_resnet50_tb_full_trained.pth"


def saved(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def data(tmp_path):
    return make_organized(tmp_path / "data", train=10, test=4, size=40)


@pytest.fixture
def no_model_logging(monkeypatch):
    """MLflow's model logging (torch.export) is tested elsewhere and is most of a tiny run's time."""
    monkeypatch.setattr(trainer, "log_model", lambda *args, **kwargs: None)


def train(data: Path, ckpt: Path, *flags: str) -> dict:
    uri = f"sqlite:///{ckpt.parent / 'mlflow.db'}"
    return trainer.main(["--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--tracking-uri", uri, *TINY, *flags])


# --------------------------------------------------------------------------- selection and early stopping
def test_auc3_early_stopping_waits_for_a_full_window_and_scores_this_runs_best(
    tmp_path, data, capsys, no_model_logging
):
    ckpt = tmp_path / "ckpt"
    earlier = train(data, ckpt, "--epochs", "1")  # leaves its own best file in the folder
    capsys.readouterr()

    summary = train(data, ckpt, *"--epochs 3 --selection auc3 --early-stop-patience 2".split())

    out = capsys.readouterr().out
    assert "Early stopping" not in out  # epochs 1 and 2 compared nothing: no patience was spent on them
    assert summary["epochs_trained"] == 3 and summary["best_epoch"] == 3  # the first full window wins
    best = saved(ckpt / BEST)
    assert best["epoch"] == best["best_epoch"] == 3
    assert best["mlflow_run_id"] == summary["mlflow_run_id"] != earlier["mlflow_run_id"]


def test_a_run_that_chose_no_best_epoch_never_scores_an_earlier_runs_best_file(
    tmp_path, data, monkeypatch, no_model_logging, capsys
):
    ckpt = tmp_path / "ckpt"
    earlier = train(data, ckpt, "--epochs", "1")
    earlier_best = (ckpt / BEST).read_bytes()
    # As if no epoch of the next run had been chosen: its finish() finds only the earlier run's best file.
    monkeypatch.setattr(trainer, "selection_score", lambda history, window: [-float("inf"), -float("inf")])

    with exits_with(capsys, re.escape(f"{ckpt / BEST} is not this run's best checkpoint")):
        train(data, ckpt, "--epochs", "1")

    assert (ckpt / BEST).read_bytes() == earlier_best
    assert read_json(ckpt / "summary.json")["mlflow_run_id"] == earlier["mlflow_run_id"]  # no summary of it written


# --------------------------------------------------------------------------- the recipe
def test_backbone_lr_mult_alone_keeps_the_from_scratch_recipe_and_the_console_says_why(
    tmp_path, data, capsys, no_model_logging
):
    config = trainer.config_from_args(["--weights", "none", "--backbone-lr-mult", "0.5"])
    assert config.recipe == "from-scratch" and config.schedule == "cosine" and config.clahe
    assert config.lr == 1e-3 and config.backbone_lr_mult == 0.5  # the typed flag adjusts the recipe

    ckpt = tmp_path / "ckpt"
    trainer.main(["--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--tracking-uri",
                  f"sqlite:///{tmp_path / 'mlflow.db'}", "--weights", "none", "--backbone-lr-mult", "0.5",
                  *"--epochs 1 --image-size 32 --batch-size 8 --num-workers 0".split()])  # fmt: skip

    out = capsys.readouterr().out
    assert "Recipe: from-scratch (random initial weights and no --lr given; --recipe original turns it off)" in out
    assert "Using different learning rates: Backbone 5.00e-04, Classifier 1.00e-03" in out


@pytest.mark.parametrize(
    ("flags", "recipe", "reason"),
    [
        (["--weights", "none", "--lr", "3e-4"], "original", "random initial weights, but --lr given"),
        ([], "original", "initial weights imagenet, which the original design's rates are made for"),
        (["--weights", "none", "--recipe", "original"], "original", "--recipe original given"),
        (["--recipe", "from-scratch"], "from-scratch", "--recipe from-scratch given"),
        (["--weights", "none", "--freeze-features"], "original", "--freeze-features: the transfer-learning"),
    ],
)
def test_the_recipe_and_the_reason_printed_for_it_follow_the_flags(flags, recipe, reason):
    config, why = trainer.parse_config(flags)
    assert config.recipe == recipe and why.startswith(reason)


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("--val-fraction", "0.2", "the saved split is reused"),
        ("--test-fraction", "0.3", "the saved split is reused"),
        ("--dedup", None, "the saved split is reused"),
        ("--image-size", "48", "every epoch so far saw the images prepared this way"),
        ("--clahe", None, "every epoch so far saw the images prepared this way"),
        ("--intensity-augment", None, "every epoch so far saw the images prepared this way"),
    ],
)
def test_resume_refuses_split_and_image_settings_it_would_ignore_or_change_mid_run(
    trained_run, capsys, flag, value, reason
):
    last = trained_run["best"].parent / "last.pth"
    with pytest.raises(SystemExit):
        trainer.config_from_args(["--resume", str(last), flag, *([value] if value else [])])
    assert f"{flag} cannot change on resume: {reason}" in capsys.readouterr().err
    # The saved values themselves may be typed again.
    same = trainer.config_from_args(
        ["--resume", str(last), "--val-fraction", "0.3", "--no-dedup", "--no-clahe", "--image-size", "32"]
    )
    assert same.val_fraction == 0.3 and not same.dedup and not same.clahe and same.image_size == 32


# A trainer that SIGKILLs itself right after the first checkpoint file of epoch 2 reaches the disk (writes:
# last.pth of epoch 0; best and last of epoch 1, in either order; then epoch 2's first): the best file and
# last.pth then disagree on the epoch, whichever of the two is written first.
KILLED_AFTER_ONE_EPOCH_2_WRITE = """
import os, signal, sys
import resnet50_tb_full as trainer
from tbcxr.checkpoint import read_json
import tbcxr.checkpoint as checkpoint
write, checkpoints = checkpoint.atomic_write, []

def write_then_die_at_epoch_2(path, contents):
    write(path, contents)
    checkpoints.extend([path] if str(path).endswith(".pth") else [])
    if len(checkpoints) == 4:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.atomic_write = write_then_die_at_epoch_2
trainer.log_model = lambda *args, **kwargs: None
trainer.main(sys.argv[1:])
"""


def test_a_kill_between_the_best_and_last_writes_leaves_a_best_that_resume_keeps_consistent(
    tmp_path, data, capsys, no_model_logging
):
    ckpt = tmp_path / "ckpt"
    args = ["--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY, "--epochs", "2", "--selection", "last"]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ONE_EPOCH_2_WRITE, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last, best = saved(ckpt / "last.pth"), saved(ckpt / BEST)
    assert not last["completed"]
    # Never a best file of an epoch that last.pth does not hold: the resumed run would train it again and, on a
    # GPU (not deterministic), might score it lower and keep the stale file as its best.
    assert best["epoch"] <= last["epoch"] == last["best_epoch"] == 2

    summary = trainer.main(["--resume", str(ckpt / "last.pth")])

    assert f"Resumed from {ckpt / 'last.pth'} after epoch 2" in capsys.readouterr().out  # nothing trained again
    last, best = saved(ckpt / "last.pth"), saved(ckpt / BEST)
    assert summary["best_epoch"] == best["epoch"] == best["best_epoch"] == last["best_epoch"] == 2
    assert best["history"] == last["history"] and best["mlflow_run_id"] == last["mlflow_run_id"]
    assert all(torch.equal(weights, last["model"][name]) for name, weights in best["model"].items())


# --------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize(
    ("where", "last_holds"),
    [("validation", 1), ("periodic checkpoint", 1), ("last.pth", 2)],
)
def test_ctrl_c_names_the_epoch_it_interrupted_and_the_epoch_last_pth_holds(
    tmp_path, data, capsys, monkeypatch, no_model_logging, where, last_holds
):
    """Epoch 2 is interrupted while it is validated, while its periodic checkpoint is written (after the run's
    state already says epoch 2, before last.pth has it) or while its last.pth is written (held until whole)."""
    import tbcxr.checkpoint as checkpoint

    evaluate, write = trainer.evaluate, checkpoint.atomic_write
    validations = []

    def interrupted_validation(*args, **kwargs):
        validations.append(1)
        if where == "validation" and len(validations) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does outside a held write
        return evaluate(*args, **kwargs)

    def interrupted_write(path, contents):
        name = Path(path).name
        if validations == [1, 1] and ("_epoch2_" in name if where == "periodic checkpoint" else name == where):
            os.kill(os.getpid(), signal.SIGINT)  # held by Checkpoint.save until the file is whole
        write(path, contents)

    monkeypatch.setattr(trainer, "evaluate", interrupted_validation)
    monkeypatch.setattr(checkpoint, "atomic_write", interrupted_write)
    ckpt = tmp_path / "ckpt"

    with pytest.raises(SystemExit) as exited:
        train(data, ckpt, "--epochs", "3", "--save-every", "2")

    assert exited.value.code == 130
    held = "holds it" if last_holds == 2 else "holds epoch 1"
    out = capsys.readouterr().out
    assert f"Interrupted during epoch 2; {ckpt / 'last.pth'} {held}. Resume with:" in out, out[-1000:]
    assert f"python resnet50_tb_full.py --resume {ckpt / 'last.pth'}" in out
    assert saved(ckpt / "last.pth")["epoch"] == last_holds
