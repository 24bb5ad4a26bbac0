"""Checks on the images before training: unreadable files and duplicates across splits.

One decode per image gives both: files that cannot be read, and exact (pixel) and near
(perceptual hash) duplicates that would leak training images into validation or test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decoding import UNREADABLE_IMAGE_ERRORS, load_xray


@dataclass
class ImageScan:
    """One decode of every image: what could not be read, and hashes for the leak check."""

    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason
    pixel_hash: dict[str, str] = field(default_factory=dict)  # path -> sha1 of the decoded greyscale pixels
    perceptual_hash: dict[str, object] = field(default_factory=dict)  # path -> imagehash.ImageHash


def _scan_one(path: str):
    import hashlib

    import imagehash

    try:
        img = load_xray(path)
    except UNREADABLE_IMAGE_ERRORS as exc:
        return path, f"{type(exc).__name__}: {exc}", None, None
    return (
        path,
        None,
        hashlib.sha1(img.tobytes() + str(img.size).encode()).hexdigest(),
        imagehash.phash(img, hash_size=16),
    )


def scan_images(paths: list[str], workers: int = 4) -> ImageScan:
    """Decode every file once, in threads (Pillow releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    scan = ImageScan()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_scan_one, paths, chunksize=16)
        for path, error, pixel_hash, perceptual in tqdm(
            results, total=len(paths), desc="Checking images", unit="img", leave=False
        ):
            if error:
                scan.unreadable[path] = error
            else:
                scan.pixel_hash[path], scan.perceptual_hash[path] = pixel_hash, perceptual
    return scan


def find_leaks(manifest: dict, scan: ImageScan, max_distance: int = 10) -> list[dict]:
    """Exact (same decoded pixels) and near (256-bit perceptual hash within max_distance bits)
    duplicates between train and the held-out sides (val, test) and between val and test.

    On tb-cxr-mini, distinct real X-rays are at least 42 bits apart; a re-saved or
    slightly brightened copy is within a few bits."""
    root = Path(manifest["data_dir"])
    side_paths = {side: [str(root / rel) for rel, _ in manifest[side]] for side in ("train", "val", "test")}
    leaks = []
    for kept, held_out in (("train", "val"), ("train", "test"), ("val", "test")):
        a, b = side_paths[kept], side_paths[held_out]
        if not a or not b:
            continue
        bits_a = np.stack([scan.perceptual_hash[p].hash.ravel() for p in a])
        bits_b = np.stack([scan.perceptual_hash[p].hash.ravel() for p in b])
        distances = (bits_a[:, None, :] != bits_b[None, :, :]).sum(axis=2)
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            exact = scan.pixel_hash[a[i]] == scan.pixel_hash[b[j]]
            leaks.append(
                {
                    "kind": "exact" if exact else "near",
                    "distance": int(distances[i, j]),
                    kept: os.path.relpath(a[i], root),
                    held_out: os.path.relpath(b[j], root),
                    "held_out_side": held_out,
                }
            )
    return leaks


def drop_leaks(manifest: dict, leaks: list[dict]) -> dict:
    """Remove each leaking image from its held-out side (val or test); train keeps its copy."""
    dropped = {(leak["held_out_side"], leak[leak["held_out_side"]]) for leak in leaks}
    return manifest | {
        side: [[rel, label] for rel, label in manifest[side] if (side, rel) not in dropped] for side in ("val", "test")
    }
