"""The split manifest, and which images a checkpoint may be scored on.

A data folder is split once (seeded, stratified) into train/val/test; the split manifest beside
the checkpoints records that split and the content of every image. Evaluation and GradCAM score
only images the checkpoint neither trained nor validated on: the manifest's test side, or a
folder less every exact or near copy of the images the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from .checkpoint import Checkpoint, read_json
from .config import CLASS_NAMES, MANIFEST_NAME
from .data_quality import NEAR_DUPLICATE_BITS, as_hash_words, near_pairs, scan_images
from .errors import DataError
from .layout import DataSplit

TRAINED_ON = ("training", "validation")  # sides whose images a checkpoint has seen


def stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int):
    """Seeded stratified split; the held-out side gets at least one image per class."""
    from sklearn.model_selection import train_test_split

    labels = [label for _, label in samples]
    # Stratification allocates held-out images in proportion to the class counts: a side of at least
    # len / rarest-class-count images is what makes that at least one image of the rarest class.
    held_out = max(len(CLASS_NAMES), round(fraction * len(samples)), -(-len(samples) // min(Counter(labels).values())))
    kept, taken = train_test_split(samples, test_size=held_out, stratify=labels, random_state=seed)
    return sorted(kept), sorted(taken)


def make_split_manifest(data: DataSplit, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Train/val/test lists (paths relative to the data root) that every later step reuses."""
    train, test = data.train, data.test
    if test is None:
        train, test = stratified_split(train, test_fraction, seed)
    train, val = stratified_split(train, val_fraction, seed)

    def rel(samples):
        return [[os.path.relpath(path, data.root), label] for path, label in samples]

    return {
        "data_dir": str(data.root.resolve()),
        "layout": data.layout,
        "seed": seed,
        "class_names": list(CLASS_NAMES),
        "train": rel(train),
        "val": rel(val),
        "test": rel(test),
    }


def split_digest(manifest: dict) -> str:
    """A short name for which images a manifest puts on each side: checkpoints record it, so a manifest
    that a later run replaced is noticed."""
    return hashlib.sha1(json.dumps([manifest[side] for side in ("train", "val", "test")]).encode()).hexdigest()[:16]


def manifest_samples(manifest: dict, side: str) -> list[tuple[str, int]]:
    root = Path(manifest["data_dir"])
    return [(str(root / rel), int(label)) for rel, label in manifest[side]]


def recorded_sides(manifest: dict) -> dict[str, str]:
    """Relative path -> the side its image belongs to: training, validation, test, or removed
    (an image the split left out as a duplicate of a training image)."""
    sides = {rel: "removed" for rel in manifest["content_sha1"]}
    for side, name in (("test", "test"), ("val", "validation"), ("train", "training")):
        sides |= {rel: name for rel, _ in manifest[side]}
    return sides


def leave_out_known(samples, manifest: dict, workers: int, keep_test: bool = True) -> tuple[list, dict[str, int]]:
    """The samples that are neither exact nor near (perceptual hash within NEAR_DUPLICATE_BITS) copies of the
    checkpoint's training, validation or split-removed images (and, unless `keep_test`, its test images),
    and the count left out per reason."""
    scan = scan_images([path for path, _ in samples], workers=workers)
    sides = recorded_sides(manifest)
    known = [rel for rel, side in sides.items() if side != "test" or not keep_test]
    exact = {manifest["content_sha1"][rel]: sides[rel] for rel in known}
    reasons = {path: "unreadable" for path in scan.unreadable}
    reasons |= {path: f"copies of its {exact[sha1]} images" for path, sha1 in scan.pixel_hash.items() if sha1 in exact}
    # The manifest's own test images stay, near copies and all: that was the split's (--dedup) decision.
    own_test = {manifest["content_sha1"][rel] for rel, side in sides.items() if side == "test" and keep_test}
    readable = [path for path, _ in samples if path not in reasons and scan.pixel_hash[path] not in own_test]
    if readable and known:
        known_words = as_hash_words(bytes.fromhex("".join(manifest["content_phash"][rel] for rel in known)))
        rows, columns, _ = near_pairs(scan.hash_words(readable), known_words, NEAR_DUPLICATE_BITS)
        reasons |= {readable[i]: f"near copies of its {sides[known[j]]} images" for i, j in zip(rows, columns)}
    return split_by_reason(samples, reasons)


def split_by_reason(samples, reasons: dict[str, str]) -> tuple[list, dict[str, int]]:
    """The samples without a reason to leave them out, and how many were left out per reason."""
    left_out = Counter(reasons[path] for path, _ in samples if path in reasons)
    return [(path, label) for path, label in samples if path not in reasons], dict(left_out)


def manifest_beside(checkpoint_path: Path, checkpoint: Checkpoint | None = None, required: bool = False) -> dict | None:
    """The split manifest in a checkpoint's folder (None if there is none; an error if `required`), refused
    when it is not the split the checkpoint was trained on (another run or --prepare-only replaced it)."""
    path = Path(checkpoint_path).parent / MANIFEST_NAME
    if not path.is_file():
        if required:
            raise DataError(
                f"error: no {MANIFEST_NAME} in {path.parent}, so the split the checkpoint was trained on is unknown: "
                "pass --checkpoint-dir with the folder that holds the checkpoint and its split manifest"
            )
        return None
    manifest = read_json(path)
    if checkpoint is None:
        checkpoint = Checkpoint.load(checkpoint_path)
    if checkpoint.split_digest != split_digest(manifest):
        raise DataError(
            f"error: {path} is not the split {checkpoint_path} was trained on: a later run or --prepare-only "
            "in the same --checkpoint-dir replaced it, so its test images are unknown"
        )
    return manifest


def held_out_samples(
    checkpoint_path: Path,
    data: DataSplit | None = None,
    workers: int = 2,
    *,
    checkpoint: Checkpoint | None = None,
    keep_test: bool = True,
) -> tuple[list, str]:
    """The labelled images to test a checkpoint on, and where they come from.

    Without a data folder: the test side of the split manifest beside the checkpoint. With one (as
    layout.discover_dataset finds it): its test/ side (organized layout) or all of it (raw layout: the
    folder the checkpoint was trained on, or another hospital's), minus every exact or near copy of an
    image the manifest records as training, validation or split-removed content. Content, not paths: a
    moved or copied folder is still recognised. The console says how many images were left out and why.
    Pass the loaded checkpoint when you hold it: it is read from disk otherwise. Without `keep_test` (a
    site's sample for its thresholds), the split's test images are left out too: they stay untouched for
    testing the refitted checkpoint. A site checkpoint's own sample (tbcxr.site) is left out as well."""
    manifest_path = Path(checkpoint_path).parent / MANIFEST_NAME
    checkpoint = checkpoint if checkpoint is not None else Checkpoint.load(checkpoint_path)
    manifest = manifest_beside(checkpoint_path, checkpoint)
    if data is None:
        if manifest is None:
            raise DataError(
                f"error: no {MANIFEST_NAME} beside {checkpoint_path}; pass --data-dir with a "
                "train/test layout or a labelled Normal/Tuberculosis folder"
            )
        if not Path(manifest["data_dir"]).is_dir():
            raise DataError(
                f"error: the data folder {manifest['data_dir']} that {manifest_path} lists is gone; pass --data-dir "
                "with where it is now (its training and validation images are still left out)"
            )
        return with_site_sample_left_out(
            manifest_samples(manifest, "test"), f"test side of {manifest_path}", checkpoint, workers
        )
    candidates, source = (data.test, f"test/ side of {data.root}") if data.test else (data.train, f"all of {data.root}")
    if manifest is None:
        print(f"WARNING: no {MANIFEST_NAME} beside {checkpoint_path}: {source} cannot be checked against the "
              "checkpoint's training images; all of it is scored", file=sys.stderr)  # fmt: skip
        source += " (not checked against training images: no split manifest)"
        return with_site_sample_left_out(candidates, source, checkpoint, workers)
    samples, left_out = leave_out_known(candidates, manifest, workers, keep_test)
    if left_out:
        reasons = ", ".join(f"{count} {reason}" for reason, count in left_out.items())
        print(f"Left out {sum(left_out.values())} of {len(candidates)} images of {source}: {reasons}")
        source += f" less {sum(left_out.values())} images the checkpoint trained on, validated on or could not read"
    elif data.test is None:
        source += " (external test set: no exact or near copy of the checkpoint's training or validation images)"
    if not samples:
        raise DataError(
            f"error: every image of {source} is one the checkpoint trained or validated on"
            + ("" if keep_test else ", or of its test side")
            + ", or cannot be read: nothing is left to test on"
        )
    return with_site_sample_left_out(samples, source, checkpoint, workers)


def with_site_sample_left_out(samples, source: str, checkpoint: Checkpoint, workers: int) -> tuple[list, str]:
    kept = leave_out_site_sample(samples, checkpoint, workers, source)
    if len(kept) < len(samples):
        source += f" less {len(samples) - len(kept)} images of the site sample its operating points were fitted on"
    return kept, source


def refuse_trained_on(samples, checkpoint_path: Path, workers: int, *, checkpoint: Checkpoint) -> None:
    """--compare: stop when the second checkpoint trained or validated on any of the evaluated images."""
    manifest = manifest_beside(checkpoint_path, checkpoint)
    if manifest is None:
        raise DataError(
            f"error: {checkpoint_path} has no split manifest recording image content beside it, so "
            "its training images cannot be told apart from the evaluated ones; refusing to compare"
        )
    _, left_out = leave_out_known(samples, manifest, workers)
    overlap = {reason: n for reason, n in left_out.items() if any(side in reason for side in TRAINED_ON)}
    if overlap:
        reasons = ", ".join(f"{count} {reason}" for reason, count in overlap.items())
        raise DataError(
            f"error: {checkpoint_path} was trained on a different split: of the {len(samples)} evaluated images, "
            f"{reasons}. A paired test on them would favour it. Compare on images neither model saw: pass "
            "--data-dir with an external labelled folder"
        )


def pixel_hashes(paths: list[str], workers: int) -> dict[str, str]:
    """Path -> the SHA-1 of its decoded pixels (what the split manifest records), for the readable files."""
    return dict(scan_images(list(paths), workers=workers).pixel_hash)


def leave_out_site_sample(samples, checkpoint: Checkpoint, workers: int, what: str) -> list:
    """The samples less the images a site checkpoint's operating points were refitted on (by pixel content,
    as recorded in the checkpoint); the console says how many. Stops when nothing is left. A checkpoint
    without a site sample returns the samples as they are."""
    recorded = set((checkpoint.site or {}).get("pixel_sha1", ()))
    if checkpoint.site and not recorded:
        print(f"WARNING: this site checkpoint does not record its sample {checkpoint.site.get('name', '?')} by "
              f"content (written by an older version): images of it in {what} cannot be recognised and are "
              "scored as if held out", file=sys.stderr)  # fmt: skip
    if not recorded:
        return samples
    hashes = pixel_hashes([path for path, _ in samples], workers)
    kept = [(path, label) for path, label in samples if hashes.get(path) not in recorded]
    left_out = len(samples) - len(kept)
    if left_out:
        print(f"Left out {left_out} of {len(samples)} images of {what}: the site sample "
              f"{checkpoint.site.get('name', '?')} this checkpoint's operating points were fitted on")  # fmt: skip
    if not kept:
        raise DataError(
            f"error: every image of {what} belongs to the site sample {checkpoint.site.get('name', '?')} the "
            "checkpoint's operating points were fitted on: nothing is left to test on. Use a second labelled "
            "sample, or the checkpoint the site one was refitted from"
        )
    return kept
