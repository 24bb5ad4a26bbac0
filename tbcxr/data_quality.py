"""Checks on the images before training: unreadable files and duplicates across splits.

One decode per image gives everything: files that cannot be read, exact (pixel sha1) and near
(256-bit perceptual hash) duplicates that would leak training images into validation or test,
and, for the fast data path, the resized pixels the decoded caches are filled from. The result
is kept beside the caches, so an unchanged data set is never decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from .cache import RowWriter, fingerprint, ordered_map, remove_stale_files, resize_pixels
from .checkpoint import atomic_write, read_json, write_json
from .config import CLASS_NAMES
from .decoding import UNREADABLE_IMAGE_ERRORS, load_xray
from .progress import track

SCAN_VERSION = "sha1+phash16"  # part of the scan file's name: a different hash never reads an old file
SIDES = ("train", "val", "test")
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))  # (kept side, held-out side)
NEAR_DUPLICATE_BITS = 10  # perceptual hashes this close are near duplicates
LEAK_CHUNK = 64  # held-out images compared at once: memory is LEAK_CHUNK x N_kept x 10 bytes


@dataclass
class ImageScan:
    """One decode of every file: what could not be read, and hashes for the leak check."""

    paths: list[str]
    unreadable: dict[str, str]  # path -> reason
    pixel_hash: dict[str, str]  # path -> sha1 of the decoded greyscale pixels (readable files)
    perceptual_hash: np.ndarray  # (len(paths), 32) uint8: each file's 256-bit pHash, packed; 0 if unreadable
    pixels: dict[int, Path] = field(default_factory=dict)  # size -> .npy of the pixels resized while scanning
    record: Path | None = None  # where the scan is kept (scan_images with a cache_dir); leak checks go beside it

    @cached_property
    def row(self) -> dict[str, int]:
        return {path: i for i, path in enumerate(self.paths)}

    def hash_words(self, paths: list[str]) -> np.ndarray:
        """The perceptual hashes of `paths` as as_hash_words gives them."""
        return as_hash_words(self.perceptual_hash[[self.row[p] for p in paths]])

    def recorded(self, root: Path) -> dict:
        """What the split manifest records of the scan, by path relative to `root`: the unreadable files, and what
        --test-only needs to recognise training images by content (exact and near copies) wherever the folder is
        later moved or copied: each readable image's pixel sha1 and perceptual hash."""
        readable = sorted(self.pixel_hash)
        return {
            "unreadable": [[os.path.relpath(path, root), reason] for path, reason in sorted(self.unreadable.items())],
            "content_sha1": {os.path.relpath(path, root): self.pixel_hash[path] for path in readable},
            "content_phash": {
                os.path.relpath(path, root): self.perceptual_hash[self.row[path]].tobytes().hex() for path in readable
            },
        }

    def remove_pixels(self) -> None:
        for path in self.pixels.values():
            path.unlink(missing_ok=True)
        self.pixels = {}


def as_hash_words(packed) -> np.ndarray:
    """Packed 256-bit perceptual hashes (bytes, or uint8 rows of 32) as four contiguous rows of uint64 words,
    shape (4, N): the form near_pairs compares."""
    return np.ascontiguousarray(np.frombuffer(packed, dtype=np.uint8).reshape(-1, 32).view(np.uint64).T)


def _scan_one(path: str, sizes: tuple[int, ...]) -> tuple:
    """(error, sha1 of the pixels, packed pHash, pixels resized to each size) of one file."""
    import imagehash

    try:
        image = load_xray(path)
    except UNREADABLE_IMAGE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}", None, None, {}
    digest = hashlib.sha1(image.tobytes() + str(image.size).encode()).digest()
    perceptual = np.packbits(imagehash.phash(image, hash_size=16).hash.ravel())
    return None, digest, perceptual, {size: resize_pixels(image, size) for size in sizes}


def scan_images(
    paths: list[str], workers: int = 4, cache_dir: Path | None = None, sizes: tuple[int, ...] = ()
) -> ImageScan:
    """Decode every file once, in worker processes: unreadable files, hashes, and the pixels
    resized to each of `sizes` (for the decoded caches: see ImageScan.pixels).

    With a cache_dir the hashes and the unreadable list are kept there under a name made of the
    files' paths, sizes and modification times; an unchanged data set is read back, not decoded."""
    key = f"{len(paths)}_{fingerprint(paths, SCAN_VERSION)}"
    record = Path(cache_dir) / f"scan_{key}.npz" if cache_dir else None
    pixels = {size: Path(cache_dir) / f"scan_{size}px_{key}.npy" for size in sizes} if cache_dir else {}
    if record is not None and record.is_file():
        print(f"Checking images: {len(paths)} images unchanged, results read from {record}")
        return _load_scan(record, paths, {size: path for size, path in pixels.items() if path.is_file()})
    if cache_dir is not None:  # pixels a failed run left for a data set that has since changed
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_files(cache_dir, ("scan_*px_*.npy",), {path.name for path in pixels.values()})
    sha1 = np.zeros((len(paths), 20), dtype=np.uint8)
    perceptual = np.zeros((len(paths), 32), dtype=np.uint8)
    unreadable = {}
    with ExitStack() as files:
        writers = {size: files.enter_context(RowWriter(path, len(paths), size)) for size, path in pixels.items()}
        results = ordered_map(partial(_scan_one, sizes=tuple(writers)), paths, workers)
        for i, (error, digest, phash, resized) in enumerate(track(results, "Checking images", total=len(paths))):
            if error:
                unreadable[paths[i]] = error
            else:
                sha1[i], perceptual[i] = np.frombuffer(digest, dtype=np.uint8), phash
            for size, writer in writers.items():
                writer.write(resized.get(size, np.zeros((size, size), dtype=np.uint8)))
    if record is not None:
        _save_scan(record, paths, sha1, perceptual, unreadable)
    return ImageScan(paths, unreadable, _hex_digests(paths, sha1, unreadable), perceptual, pixels, record)


def _hex_digests(paths: list[str], sha1: np.ndarray, unreadable: dict[str, str]) -> dict[str, str]:
    return {path: sha1[i].tobytes().hex() for i, path in enumerate(paths) if path not in unreadable}


def _save_scan(record: Path, paths: list[str], sha1, perceptual, unreadable: dict[str, str]) -> None:
    arrays = {
        "sha1": sha1,
        "perceptual": perceptual,
        "unreadable_rows": np.array([i for i, p in enumerate(paths) if p in unreadable], dtype=np.int64),
        "unreadable_reasons": np.array([unreadable[p] for p in paths if p in unreadable], dtype=str),
    }
    atomic_write(record, lambda f: np.savez(f, **arrays))


def _load_scan(record: Path, paths: list[str], pixels: dict[int, Path]) -> ImageScan:
    with np.load(record, allow_pickle=False) as scan:
        sha1, perceptual = scan["sha1"], scan["perceptual"]
        unreadable = {paths[i]: str(reason) for i, reason in zip(scan["unreadable_rows"], scan["unreadable_reasons"])}
    return ImageScan(paths, unreadable, _hex_digests(paths, sha1, unreadable), perceptual, pixels, record)


def near_pairs(held_out: np.ndarray, kept: np.ndarray, max_distance: int) -> tuple[np.ndarray, ...]:
    """(held-out row, kept row, distance) of every pair of hashes (hash_words) within max_distance bits.

    LEAK_CHUNK held-out rows at a time, so memory stays LEAK_CHUNK x N_kept at any size. The first 64
    bits alone differ by more than max_distance in nearly every pair of distinct images, so the other
    192 are compared only where they do not."""
    found = [(np.zeros(0, dtype=np.int64),) * 3]  # the result when there are no held-out rows
    for start in range(0, held_out.shape[1], LEAK_CHUNK):
        chunk = held_out[:, start : start + LEAK_CHUNK]
        rows, columns = np.nonzero(np.bitwise_count(chunk[0][:, None] ^ kept[0][None, :]) <= max_distance)
        distances = np.zeros(len(rows), dtype=np.int64)
        for word in range(len(chunk)):
            distances += np.bitwise_count(chunk[word][rows] ^ kept[word][columns])
        close = distances <= max_distance
        found.append((rows[close] + start, columns[close], distances[close]))
    return tuple(np.concatenate(part) for part in zip(*found))


def find_leaks(manifest: dict, scan: ImageScan, max_distance: int = NEAR_DUPLICATE_BITS) -> list[dict]:
    """Exact (same decoded pixels) and near (256-bit perceptual hash within max_distance bits)
    duplicates between train and the held-out sides (val, test) and between val and test.

    Every held-out image is compared with every image of the sides before it, LEAK_CHUNK held-out
    images at a time with XOR and popcount, so memory does not grow with N_kept x N_held_out.
    Exact copies have identical perceptual hashes, so they are among the pairs found; their pixel
    sha1 tells them apart. On tb-cxr-mini, distinct real X-rays are at least 42 bits apart; a
    re-saved or slightly brightened copy is within a few bits.

    With a kept scan, the result is kept beside it, named by the scan and the three sides: the
    same split of an unchanged data set is not compared again."""
    root = Path(manifest["data_dir"])
    rel = {side: [r for r, _ in manifest[side]] for side in SIDES}
    held_out_total = len(rel["val"]) + len(rel["test"])
    kept_leaks = None
    if scan.record is not None:
        key = hashlib.sha1(json.dumps([scan.record.name, max_distance, rel]).encode()).hexdigest()[:16]
        kept_leaks = scan.record.with_name(f"leaks_{key}.json")
        if kept_leaks.is_file():
            print(f"Leak check: {held_out_total} images unchanged, results read from {kept_leaks}")
            return read_json(kept_leaks)
    words = {side: scan.hash_words([str(root / r) for r in rel[side]]) for side in SIDES}
    chunks = [
        (side, start, min(start + LEAK_CHUNK, len(rel[side])))
        for side in ("val", "test")
        for start in range(0, len(rel[side]), LEAK_CHUNK)
    ]
    found = []  # (pair number, kept row, held-out row, distance); sorted, the order of an all-pairs scan
    for held_out, start, stop in track(chunks, "Leak check", total=held_out_total, size=lambda c: c[2] - c[1]):
        for number, (kept, side) in enumerate(PAIRS):
            if side == held_out and rel[kept]:
                rows, columns, distances = near_pairs(words[held_out][:, start:stop], words[kept], max_distance)
                found += [(number, i, start + j, d) for j, i, d in zip(rows, columns, distances.tolist())]
    leaks = []
    for number, i, j, distance in sorted(found):
        kept, held_out = PAIRS[number]
        exact = scan.pixel_hash[str(root / rel[kept][i])] == scan.pixel_hash[str(root / rel[held_out][j])]
        leaks.append(
            {
                "kind": "exact" if exact else "near",
                "distance": distance,
                kept: rel[kept][i],
                held_out: rel[held_out][j],
                "held_out_side": held_out,
            }
        )
    if kept_leaks is not None:
        write_json(leaks, kept_leaks)
    return leaks


def drop_leaks(manifest: dict, leaks: list[dict], dedup: bool, listed_in: str) -> dict:
    """The manifest with `leaks` listed under "leaks" (a warning says how many, and that they are listed in
    `listed_in`) and removed from their held-out side (val or test; train keeps its copy): the exact copies, and
    with dedup the near ones too. An exact copy of a training image is never a test image; near copies are the
    user's call."""
    if leaks:
        exact = sum(leak["kind"] == "exact" for leak in leaks)
        action = (
            "all removed from the held-out side (--dedup)"
            if dedup
            else "exact copies removed from the held-out side; --dedup removes the near ones too"
        )
        print(
            f"WARNING: {exact} exact and {len(leaks) - exact} near-duplicate pairs between train, val and test "
            f"({action}); list in {listed_in}",
            file=sys.stderr,
        )
    removed = [leak for leak in leaks if dedup or leak["kind"] == "exact"]
    dropped = {(leak["held_out_side"], leak[leak["held_out_side"]]) for leak in removed}
    kept = {side: [[rel, label] for rel, label in manifest[side] if (side, rel) not in dropped] for side in SIDES[1:]}
    return manifest | kept | {"leaks": leaks}


def data_report(manifest: dict, manifest_path: Path, cache_files: list[Path]) -> str:
    """A few lines on the prepared data: class counts per split, unreadable files, leaks, caches."""
    lines = [f"Prepared data: {manifest['data_dir']} ({manifest['layout']} layout, split seed {manifest['seed']})"]
    for side in SIDES:
        counts = Counter(label for _, label in manifest[side])
        by_class = ", ".join(f"{name} {counts[label]}" for label, name in enumerate(CLASS_NAMES))
        lines.append(f"  {side:<5} {len(manifest[side]):>7} images ({by_class})")
    unreadable = len(manifest["unreadable"])
    lines.append(
        f"  unreadable files: {unreadable or 'none'}" + (f" (listed in {manifest_path})" if unreadable else "")
    )
    exact = sum(leak["kind"] == "exact" for leak in manifest["leaks"])
    lines.append(f"  duplicates across splits: {exact} exact, {len(manifest['leaks']) - exact} near")
    if cache_files:
        megabytes = sum(path.stat().st_size for path in cache_files) / 2**20
        lines.append(
            f"  decoded cache: {megabytes:.1f} MB in {len(cache_files)} files in {cache_files[0].parent.resolve()}"
        )
    lines.append(f"  split manifest: {manifest_path}")
    return "\n".join(lines)
