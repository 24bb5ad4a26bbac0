"""The lung-field model: a small MONAI U-Net that outlines both lungs on a chest X-ray, and the lung box.

    load_lung_model()        the model shipped beside this file (tbcxr/lung_model.pt), or another such file
    lung_mask(model, images) 8-bit greyscale pictures -> one bool mask each, at the picture's own size
    lung_box(mask)           the box around both lungs as (x0, y0, x1, y1), or None when no plausible pair is found
    with_margin(box, ...)    the box widened on every side by a share of its size, kept inside the picture
    dice(), box_iou()        the two held-out scores recorded with the weights

Box convention: (x0, y0, x1, y1) in pixels of the mask, x to the right and y down, x1 and y1 exclusive, as
in Python slices (`image[y0:y1, x0:x1]`) and PIL's `Image.crop`; its area is (x1 - x0) * (y1 - y0).

The weights file is a plain dict that loads with torch.load(weights_only=True): the network's settings, its
weights in half precision, and the record of how it was trained (command, data digest, held-out names and
scores, input size, box convention). Only this module knows its keys; tbcxr/lung_training.py writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoint import atomic_write
from .errors import TbcxrError

SHIPPED_WEIGHTS = Path(__file__).with_name("lung_model.pt")
FORMAT = "tbcxr-lung-model-1"
BOX_CONVENTION = "(x0, y0, x1, y1) pixels, x right, y down, x1 and y1 exclusive (image[y0:y1, x0:x1], PIL crop)"
# MONAI UNet settings: 0.4 M parameters, 0.8 MB in half precision.
NETWORK = {"channels": (8, 16, 32, 64, 128), "strides": (2, 2, 2, 2), "num_res_units": 2}
# A plausible pair of lungs: each of the two largest regions covers at least this share of the picture, and the
# smaller at least this share of the larger. In the 98 radiologists' masks the smaller lung covers 9.5% of its
# picture at the least, and 69% of its partner; a speck or a single lung fails these.
MIN_LUNG_FRACTION = 0.02
MIN_LUNG_RATIO = 0.25
# Share of the box's width (height) added left and right (above and below) by with_margin when none is given.
DEFAULT_MARGIN = 0.05


@dataclass
class LungModel:
    """A lung-field network ready for inference, with the record of how it was made."""

    network: torch.nn.Module
    input_size: int
    record: dict


def lung_network() -> torch.nn.Module:
    """A MONAI U-Net from random weights: one greyscale channel in, one lung logit per pixel out."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, **NETWORK)


def resized(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """8-bit pictures -> float32 batch (N, 1, size, size) in [0, 1], each squeezed to the square (aspect not
    kept: training saw its pictures the same way)."""
    batch = [torch.from_numpy(np.array(image, dtype=np.uint8)).float()[None, None] / 255 for image in images]
    return torch.cat([F.interpolate(x, size=(size, size), mode="bilinear", antialias=True) for x in batch])


def standardised(batch: torch.Tensor) -> torch.Tensor:
    """Each picture to mean 0 and standard deviation 1: the network sees contrast, not a scanner's brightness."""
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    std = batch.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (batch - mean) / std


def lung_mask(model: LungModel, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One bool mask per 8-bit greyscale picture (H, W), at that picture's own size: True on the lung fields.

    One batched pass at the model's input size on the CPU in float32; the logits are resized back to each
    picture before the threshold, so the outline is smooth at any size."""
    if not len(images):
        return []
    with torch.inference_mode():
        logits = model.network(standardised(resized(images, model.input_size)))
        return [
            (F.interpolate(logit[None], size=image.shape[:2], mode="bilinear")[0, 0] > 0).numpy()
            for logit, image in zip(logits, images)
        ]


def lung_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1; x1, y1 exclusive) around both lungs of a bool mask, or None when the mask holds
    no plausible pair: empty, only specks, or one lung (the second region under MIN_LUNG_RATIO of the first).

    Regions are 8-connected; those under MIN_LUNG_FRACTION of the picture (specks) are left out of the box."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count < 2:
        return None
    areas = np.bincount(labels.ravel())[1:]
    largest, second = np.sort(areas)[::-1][:2]
    if second < MIN_LUNG_FRACTION * mask.size or second < MIN_LUNG_RATIO * largest:
        return None
    kept = np.isin(labels, 1 + np.flatnonzero(areas >= MIN_LUNG_FRACTION * mask.size))
    rows, columns = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def with_margin(
    box: tuple[int, int, int, int], width: int, height: int, margin: float = DEFAULT_MARGIN
) -> tuple[int, int, int, int]:
    """The box widened by `margin` x its width on the left and on the right, and `margin` x its height above and
    below (rounded outwards), then clipped to a picture of `width` x `height` pixels. Same convention as lung_box."""
    x0, y0, x1, y1 = box
    dx, dy = np.ceil(margin * (x1 - x0)), np.ceil(margin * (y1 - y0))
    return max(0, int(x0 - dx)), max(0, int(y0 - dy)), min(width, int(x1 + dx)), min(height, int(y1 + dy))


def full_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box around every True pixel (torchvision's masks_to_boxes, made exclusive), None for an empty mask:
    the reference box of a radiologist's mask."""
    from torchvision.ops import masks_to_boxes

    if not mask.any():
        return None
    x0, y0, x1, y1 = masks_to_boxes(torch.from_numpy(mask)[None]).int()[0].tolist()
    return x0, y0, x1 + 1, y1 + 1


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice overlap of two bool masks (MONAI's compute_dice); 1.0 when both are empty."""
    from monai.metrics import compute_dice

    def as_batch(mask):
        return torch.from_numpy(mask)[None, None].float()

    return float(compute_dice(as_batch(predicted), as_batch(reference), ignore_empty=False)[0, 0])


def box_iou(predicted: tuple | None, reference: tuple) -> float:
    """Intersection over union of two boxes in lung_box's convention (torchvision's box_iou); 0.0 when no box
    was predicted, so an image the model gives up on counts against it."""
    from torchvision.ops import box_iou as torchvision_box_iou

    if predicted is None:
        return 0.0
    return float(torchvision_box_iou(torch.tensor([predicted]).float(), torch.tensor([reference]).float())[0, 0])


def save_lung_model(path: Path, network: torch.nn.Module, input_size: int, record: dict) -> None:
    """Write the weights file: settings, half-precision weights and the training record (plain types only)."""
    state = {name: tensor.detach().half() for name, tensor in network.state_dict().items()}
    network_settings = {key: list(value) if isinstance(value, tuple) else value for key, value in NETWORK.items()}
    payload = {"format": FORMAT, "network": network_settings, "input_size": input_size,
               "box_convention": BOX_CONVENTION, "state_dict": state, "record": record}  # fmt: skip
    atomic_write(path, lambda f: torch.save(payload, f))


def load_lung_model(path: str | Path = SHIPPED_WEIGHTS) -> LungModel:
    """The lung-field model of a weights file (default: the one shipped), in float32 on the CPU, in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise TbcxrError(f"error: {path} is not a lung-field model file ({FORMAT})")
    if {k: tuple(v) if isinstance(v, list) else v for k, v in payload["network"].items()} != NETWORK:
        raise TbcxrError(
            f"error: {path} holds a network with other settings than this version builds: {payload['network']}"
        )
    network = lung_network()
    network.load_state_dict({name: tensor.float() for name, tensor in payload["state_dict"].items()})
    return LungModel(network.eval(), payload["input_size"], payload["record"])
