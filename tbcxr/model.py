"""The network: ResNet50 weights, the model with its two-class head, optimizer groups, inference."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from .config import CLASS_NAMES

IMAGENET_WEIGHTS = models.ResNet50_Weights.IMAGENET1K_V2


class WeightsUnavailableError(SystemExit):
    def __init__(self, problem: str):
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
        super().__init__(
            f"error: ImageNet weights are not available ({problem}).\n"
            f"  - place the file at {cache} (download {IMAGENET_WEIGHTS.url} on a machine with internet), or\n"
            f"  - pass --weights PATH to a ResNet50 state dict or checkpoint, or\n"
            f"  - pass --weights none to train from scratch (random initialisation)."
        )


def load_backbone_state(weights: str) -> dict | None:
    """The ResNet50 state dict to start from: ImageNet, a local file, or None (random)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        try:  # torchvision reads the torch hub cache first and downloads only when it is missing
            return IMAGENET_WEIGHTS.get_state_dict(progress=True)
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            raise WeightsUnavailableError(str(exc)) from exc
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsUnavailableError(
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
            raise WeightsUnavailableError(f"{weights} is not a ResNet50 state dict")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    for name, param in model.named_parameters():
        param.requires_grad = not (freeze_features and not name.startswith("fc."))
    return model


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


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp_dtype=None):
    """Labels, float32 logits and mean cross-entropy over a loader."""
    model.eval()
    labels, logits, loss_sum = [], [], torch.zeros((), device=device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            batch_logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(batch_logits, targets, reduction="sum")
        logits.append(batch_logits)
        labels.append(targets)
    labels = torch.cat(labels).cpu().numpy()
    return labels, torch.cat(logits).cpu(), float(loss_sum) / max(1, len(labels))
