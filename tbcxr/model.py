"""The network: ResNet50 weights, the model with its two-class head, optimizer groups, inference."""

from __future__ import annotations

import pickle
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from .config import CLASS_NAMES
from .errors import WeightsUnavailableError

IMAGENET_WEIGHTS = models.ResNet50_Weights.IMAGENET1K_V2


def weights_unavailable(problem: str) -> WeightsUnavailableError:
    """The error that says where torch looks for the ImageNet file and where to download it from."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
    return WeightsUnavailableError(problem, cache, IMAGENET_WEIGHTS.url)


def load_backbone_state(weights: str) -> dict | None:
    """The ResNet50 state dict to start from: ImageNet, a local file, or None (random)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        # torchvision reads the torch hub cache first and downloads only when it is missing; the download
        # is checked against the hash in the file name, and unpickling allows tensors and containers only.
        try:
            return IMAGENET_WEIGHTS.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            raise weights_unavailable(str(exc)) from exc
        except pickle.UnpicklingError as exc:
            raise weights_unavailable(f"the cached file is not a safe state dict ({exc.__class__.__name__})") from exc
    path = Path(weights)
    if not path.is_file():
        raise weights_unavailable(f"--weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise weights_unavailable(
            f"--weights file {path} is not a safe, readable state dict ({type(exc).__name__})"
        ) from exc
    return state.get("model", state) if isinstance(state, dict) else {}


def build_model(weights: str = "none", freeze_features: bool = False, num_classes: int = len(CLASS_NAMES)) -> nn.Module:
    """torchvision ResNet50 with a `num_classes` head; every layer trainable unless frozen."""
    model = models.resnet50(weights=None)
    state = load_backbone_state(weights)
    if state is not None:
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise weights_unavailable(f"{weights} is not a ResNet50 state dict")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    for name, param in model.named_parameters():
        param.requires_grad = not (freeze_features and not name.startswith("fc."))
    return model


def train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers whose parameters are frozen (--freeze-features):
    they stay in eval mode, so their running statistics stay those of the initial weights."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many steps Adam has applied: an fp16 GradScaler skips steps whose gradients overflowed."""
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    return int(max(steps)) if steps else 0


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(model: nn.Module, lr: float, backbone_lr_mult: float) -> torch.optim.Adam:
    """Adam with named groups: the backbone at lr * backbone_lr_mult, the classifier at lr."""
    classifier = [p for n, p in model.named_parameters() if n.startswith("fc.") and p.requires_grad]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.requires_grad]
    groups = [{"params": classifier, "lr": lr, "name": "classifier"}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return torch.optim.Adam(groups)


def build_scheduler(optimizer, schedule: str, epochs: int, warmup_epochs: int, plateau_patience: int):
    """The learning-rate schedule, stepped once per epoch by step_scheduler.

    plateau: the original design's ReduceLROnPlateau on validation loss (x0.1 after `plateau_patience`
    epochs without improvement). cosine: warm-up from a tenth of the rate in equal steps, one per epoch (one
    warm-up epoch: the first epoch at a tenth), then cosine decay to 0."""
    from torch.optim import lr_scheduler

    if schedule == "plateau":  # no warm-up: the original design's schedule
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=plateau_patience)
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup_epochs))
    if not warmup_epochs:
        return cosine
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def step_scheduler(scheduler, validation_loss: float) -> None:
    """End of an epoch: the plateau schedule watches the validation loss, the others only count epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(validation_loss)
    else:
        scheduler.step()


def group_lrs(optimizer: torch.optim.Optimizer, as_set: bool = False) -> dict[str, float]:
    """Each named group's current rate, or with as_set the rate before any schedule (a warm-up) lowered it."""
    return {
        group["name"]: group.get("initial_lr", group["lr"]) if as_set else group["lr"]
        for group in optimizer.param_groups
    }


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device):
    """Labels, logits and mean cross-entropy over a loader, in float32 everywhere.

    Model selection, thresholds and P(TB) calibration are fitted on these scores, and --test-only
    recomputes them: no autocast here, so both see the same numbers."""
    model.eval()
    labels, logits, loss_sum = [], [], torch.zeros((), device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        batch_logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(batch_logits, targets, reduction="sum")
        logits.append(batch_logits)
        labels.append(targets)
    labels = torch.cat(labels).cpu().numpy()
    return labels, torch.cat(logits).cpu(), float(loss_sum) / max(1, len(labels))
