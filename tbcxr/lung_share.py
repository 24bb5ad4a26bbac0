"""The shortcut meter: how much of a GradCAM map's mass lies inside the lung fields.

    lung_share(cam, lungs)              sum(cam x lungs) / sum(cam), NaN for a map that is zero everywhere
    on_grid(mask, shape)                a picture-sized bool lung mask as the share of each map cell it covers
    with_lung_shares(model, explained)  each Explanation with its share, one batched lung-model pass per chunk
    lung_share_summary(explanations)    the mean share, the maps it is over, and the maps without one

The lung mask comes from the shipped lung-field model (tbcxr/lungs.py) run on the picture as decoded, before any
resize or crop: the checkpoint's transform squeezes that whole picture to its square input, so the map's grid
covers the same picture and the mask only needs resizing onto it (each cell weighted by its share of lung).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .decoding import load_xray
from .lungs import LungModel, lung_box, lung_mask

# How each share was obtained (the index's `lung_fields` column).
PAIR = "pair"  # a plausible pair of lungs (lungs.lung_box finds a box): the share is over the model's mask
NO_PLAUSIBLE_PAIR = "no plausible pair"  # mask not empty but one lung, specks...: the share is still over it
NONE_FOUND = "none"  # the model marks no lung pixel: no share


def lung_share(cam: np.ndarray, lungs: np.ndarray) -> float:
    """Share of the map's mass inside the lungs: sum(cam * lungs) / sum(cam), with `lungs` in [0, 1] on the map's
    grid. NaN when the map is zero everywhere (it points nowhere, so neither inside nor outside)."""
    total = float(np.sum(cam, dtype=np.float64))
    if total <= 0:
        return float("nan")
    return float(np.sum(cam * lungs, dtype=np.float64)) / total


def on_grid(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized onto a map's (H, W) grid by area averaging: the share of each cell that is lung."""
    area = F.interpolate(torch.from_numpy(mask).float()[None, None], size=tuple(shape), mode="area")
    return area[0, 0].numpy()


def share_and_source(cam: np.ndarray, mask: np.ndarray) -> tuple[float | None, str, float | None]:
    """The share of one map (None when there is none: no lung pixel, or a map zero everywhere), its source, and the
    lungs' share of the map's grid: the share an even map would get, the level a map at chance reaches."""
    if not mask.any():
        return None, NONE_FOUND, None
    lungs = on_grid(mask, cam.shape)
    share = lung_share(cam, lungs)
    source = PAIR if lung_box(mask) is not None else NO_PLAUSIBLE_PAIR
    return (None if np.isnan(share) else share), source, float(lungs.mean())


def with_lung_shares(model: LungModel, explained: Sequence[list], batch_size: int) -> list[list]:
    """Every checkpoint's explanations (the same images in the same order) with `lung_share` and `lung_fields` set.

    Each picture is decoded once more as load_xray gives it (before the checkpoint's resize and CLAHE) and its
    lungs found in batches of `batch_size`; the masks of a batch serve every checkpoint's maps of those images."""
    shared = [[] for _ in explained]
    for start in range(0, len(explained[0]), batch_size):
        chunk = [e.path for e in explained[0][start : start + batch_size]]
        masks = lung_mask(model, [np.asarray(load_xray(path)) for path in chunk])
        for out, explanations in zip(shared, explained):
            for e, mask in zip(explanations[start : start + batch_size], masks):
                share, source, area = share_and_source(e.cam, mask)
                out.append(replace(e, lung_share=share, lung_fields=source, lung_area=area))
    return shared


def lung_share_summary(explanations: list) -> dict:
    """The mean share over the maps that have one, how many those are, and how many have none or no plausible
    pair of lungs (those still count, over the model's mask)."""
    measured = [e for e in explanations if e.lung_share is not None]
    return {
        "mean": float(np.mean([e.lung_share for e in measured])) if measured else None,
        # what an even map would score on the same pictures: a mean share near it says the maps ignore the lungs
        "even_map_mean": float(np.mean([e.lung_area for e in measured])) if measured else None,
        "maps": len(measured),
        "maps_without_share": len(explanations) - len(measured),
        "maps_without_plausible_pair": sum(e.lung_fields == NO_PLAUSIBLE_PAIR for e in explanations),
        "source": "shipped lung-field model on each full picture as decoded; share = sum(map x lungs) / sum(map)",
    }


def lung_share_text(share: float | None, source: str) -> str:
    """The caption's words for a share: a percentage, n/a with the reason, and a warning without a plausible pair."""
    if share is None:
        return "Lung share n/a (no lungs found)" if source == NONE_FOUND else "Lung share n/a (map all zero)"
    return f"Lung share {share:.0%}" + (" (no plausible pair of lungs)" if source == NO_PLAUSIBLE_PAIR else "")


def lung_share_line(summary: dict) -> str:
    """The console's line for a summary."""
    if summary["mean"] is None:
        return f"Lung share of map mass: n/a ({summary['maps_without_share']} maps without one)"
    return (
        f"Lung share of map mass (lung model on each full picture): mean {summary['mean']:.3f} over "
        f"{summary['maps']} maps, against {summary['even_map_mean']:.3f} for an even map (the lungs' share of those "
        f"pictures); {summary['maps_without_plausible_pair']} without a plausible pair of lungs, "
        f"{summary['maps_without_share']} n/a"
    )


def lung_share_metrics(summary: dict) -> dict[str, float]:
    """The summary as MLflow metrics of the training run (none when no map has a share)."""
    if summary["mean"] is None:
        return {}
    return {
        "gradcam_lung_share_mean": summary["mean"],
        "gradcam_lung_share_even_map": summary["even_map_mean"],
        "gradcam_lung_share_maps": summary["maps"],
    }
