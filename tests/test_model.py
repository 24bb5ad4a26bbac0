"""The ResNet50 builder, weight loading and the optimisation set-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_organized
from torchvision import models

from tbcxr.errors import WeightsUnavailableError
from tbcxr.model import (
    IMAGENET_WEIGHTS,
    build_model,
    build_optimizer,
    build_scheduler,
    count_trainable,
    group_lrs,
    optimizer_steps,
    step_scheduler,
    train_mode,
)
from tbcxr.runtime import autocast_dtype


def test_full_training_has_every_parameter_trainable():
    model = build_model("none")
    assert count_trainable(model) == 23_512_130
    assert all(p.requires_grad for p in model.parameters())
    assert model.fc.out_features == 2


def test_freeze_features_trains_only_the_head():
    model = build_model("none", freeze_features=True)
    assert count_trainable(model) == 2048 * 2 + 2
    optimizer = build_optimizer(model, lr=1e-3, backbone_lr_mult=0.1)
    assert group_lrs(optimizer) == {"classifier": 1e-3}


def test_optimizer_groups_carry_differential_lrs_and_plateau_lowers_both():
    model = build_model("none")
    optimizer = build_optimizer(model, lr=1e-4, backbone_lr_mult=0.1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5)
    assert groups["classifier"]["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in groups["classifier"]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 23_512_130

    scheduler = build_scheduler(optimizer, "plateau", epochs=30, warmup_epochs=0, plateau_patience=2)
    for _ in range(3):  # improvement, then two flat epochs: within patience
        step_scheduler(scheduler, 1.0)
    assert group_lrs(optimizer)["classifier"] == pytest.approx(1e-4)
    step_scheduler(scheduler, 1.0)  # third flat epoch exceeds patience 2
    lrs = group_lrs(optimizer)
    assert lrs["backbone"] == pytest.approx(1e-6) and lrs["classifier"] == pytest.approx(1e-5)


def test_mixed_precision_uses_fp16_where_a_card_only_emulates_bf16(monkeypatch):
    def bf16_supported(including_emulation=True):  # a T4 or V100: no native bf16, emulation possible
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert autocast_dtype(torch.device("cuda"), amp=None) == torch.float16
    assert autocast_dtype(torch.device("cpu"), amp=True) == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), amp=None) is None


def test_a_run_saved_without_fp16_resumes_on_a_card_that_uses_fp16(tmp_path):
    import resnet50_tb_full as trainer
    from tbcxr.checkpoint import Checkpoint, RunState
    from tbcxr.runtime import SINGLE_PROCESS
    from tbcxr.training import Run, Training

    model = build_model("none")
    optimizer = build_optimizer(model, lr=1e-4, backbone_lr_mult=0.1)
    scheduler = build_scheduler(optimizer, "plateau", epochs=30, warmup_epochs=0, plateau_patience=3)
    saved = Checkpoint.from_model(  # bf16 or full precision: the GradScaler was disabled, its saved state is empty
        model, {}, 32, state=RunState(epoch=3), optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(), scaler_state=torch.amp.GradScaler("cpu", enabled=False).state_dict(),
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    loss, device = torch.nn.CrossEntropyLoss(), torch.device("cpu")
    training = Training(model, model, optimizer, scheduler, scaler, loss, torch.float16, device)
    run = Run(trainer.TrainConfig(checkpoint_dir=str(tmp_path)), SINGLE_PROCESS, training, split_digest="")
    run.restore(saved)
    assert run.state.epoch == 3 and scaler.get_scale() == 2.0**16  # a fresh scale, not a crash


@pytest.fixture
def reference_resnet50_state():
    torch.manual_seed(123)
    return models.resnet50(weights=None).state_dict()


def test_imagenet_weights_load_from_torch_hub_cache(tmp_path, monkeypatch, reference_resnet50_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / IMAGENET_WEIGHTS.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(reference_resnet50_state, cached)

    model = build_model("imagenet")

    assert torch.equal(model.conv1.weight, reference_resnet50_state["conv1.weight"])
    assert torch.equal(model.layer4[2].bn3.running_var, reference_resnet50_state["layer4.2.bn3.running_var"])
    assert model.fc.out_features == 2  # the 1000-class head is replaced


def test_weights_from_a_local_state_dict_file(tmp_path, reference_resnet50_state):
    path = tmp_path / "resnet50.pth"
    torch.save(reference_resnet50_state, path)
    model = build_model(str(path))
    assert torch.equal(model.layer1[0].conv1.weight, reference_resnet50_state["layer1.0.conv1.weight"])


def test_unavailable_imagenet_weights_stop_with_instructions(tmp_path):
    # The trainer in a fresh interpreter, with an empty hub cache and a proxy on a closed port: the download fails
    # at once, and the run stops before it trains, with the message alone (no traceback).
    proxy = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path),
        "https_proxy": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "HTTP_PROXY": proxy,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    data = make_organized(tmp_path / "data", train=4, test=2, size=32)
    trainer = [sys.executable, str(ROOT / "resnet50_tb_full.py"), "--data-dir", str(data), "--weights", "imagenet"]
    result = subprocess.run(
        [*trainer, "--checkpoint-dir", str(tmp_path / "ckpt"), "--device", "cpu", "--num-workers", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "ImageNet weights are not available" in result.stderr and "Traceback" not in result.stderr
    assert "--weights none" in result.stderr and "--weights PATH" in result.stderr
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in result.stderr


def test_missing_or_foreign_weights_file_is_refused(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_model(str(tmp_path / "nope.pth"))
    foreign = tmp_path / "foreign.pth"
    torch.save({"layer.weight": torch.zeros(2)}, foreign)
    with pytest.raises(WeightsUnavailableError, match="not a ResNet50 state dict"):
        build_model(str(foreign))


class RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_cached_imagenet_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / IMAGENET_WEIGHTS.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": RunsCodeOnLoad(marker)}, cached)

    with pytest.raises(WeightsUnavailableError, match="not a safe state dict"):
        build_model("imagenet")
    assert not marker.exists()


def test_frozen_backbone_keeps_batchnorm_in_eval_mode_while_the_head_trains():
    model = build_model("none", freeze_features=True)
    train_mode(model)
    assert model.fc.training
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model = build_model("none")
    train_mode(model)
    assert all(m.training for m in model.modules())


def test_fp16_skipped_steps_are_counted_without_reading_the_scale_every_step(monkeypatch):
    import resnet50_tb_full as trainer

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 gradients: both steps skipped
    reads = []
    original = scaler.get_scale
    monkeypatch.setattr(scaler, "get_scale", lambda: reads.append(1) or original())
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    loader = type("Loader", (list,), {"batch_size": 4})(batches)

    results = trainer.train_one_epoch(
        model, loader, torch.nn.CrossEntropyLoss(), optimizer, scaler, torch.device("cpu"), torch.float16
    )

    assert reads == []  # no host read of the scale inside the step loop
    assert results["skipped_steps"] == 2 and original() == 2.0**38
    assert optimizer_steps(optimizer) == 0
