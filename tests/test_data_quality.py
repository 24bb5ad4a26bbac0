"""Data preparation at scale: the chunked leak check against an all-pairs reference, one decode
per image, the kept scan and caches, and --prepare-only."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_organized, shared_data
from PIL import Image

import resnet50_tb_full as trainer
from tbcxr import cache, data_quality
from tbcxr.cache import decode_resized, side_cache_sizes
from tbcxr.checkpoint import read_json
from tbcxr.config import MANIFEST_NAME
from tbcxr.data import LoaderSettings, PreparationSettings, make_loaders, prepare_manifest
from tbcxr.data_quality import LEAK_CHUNK, PAIRS, ImageScan, find_leaks, scan_images
from tbcxr.layout import discover_dataset
from tbcxr.split import make_split_manifest, manifest_samples


def brute_force_leaks(manifest: dict, bits: dict[str, np.ndarray], sha1: dict[str, str], max_distance: int):
    """The all-pairs check the chunked one replaced: N_kept x N_held_out x 256 booleans."""
    leaks = []
    for kept, held_out in PAIRS:
        a, b = [rel for rel, _ in manifest[kept]], [rel for rel, _ in manifest[held_out]]
        if not a or not b:
            continue
        distances = (np.stack([bits[r] for r in a])[:, None, :] != np.stack([bits[r] for r in b])[None]).sum(axis=2)
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            kind = "exact" if sha1[a[i]] == sha1[b[j]] else "near"
            leaks.append(
                {"kind": kind, "distance": int(distances[i, j]), kept: a[i], held_out: b[j], "held_out_side": held_out}
            )
    return leaks


def flipped(bits: np.ndarray, count: int, rng) -> np.ndarray:
    copy = bits.copy()
    copy[rng.choice(256, count, replace=False)] ^= True
    return copy


def generated_hashes(threshold: int):
    """Random 256-bit hashes (about 128 bits apart) on three sides, with planted pairs at 0, exactly
    `threshold` and threshold + 1 bits, on both sides of a chunk boundary."""
    rng = np.random.default_rng(0)
    sides = {"train": 200, "val": LEAK_CHUNK * 2 + 2, "test": 70}
    rels = {side: [f"{side}/img_{i:03d}.png" for i in range(n)] for side, n in sides.items()}
    bits = {rel: rng.random(256) < 0.5 for side in rels for rel in rels[side]}
    sha1 = {rel: hashlib.sha1(rel.encode()).hexdigest() for rel in bits}
    planted = [  # (kept image, held-out image, bits flipped, same pixels)
        ("train/img_005.png", "test/img_000.png", threshold, False),
        ("train/img_006.png", "test/img_001.png", threshold + 1, False),
        ("train/img_007.png", "val/img_000.png", 0, True),
        ("train/img_008.png", "val/img_001.png", 0, False),
        ("train/img_009.png", f"val/img_{LEAK_CHUNK - 1:03d}.png", threshold, False),
        ("train/img_009.png", f"val/img_{LEAK_CHUNK:03d}.png", threshold - 1, False),
        ("val/img_002.png", "test/img_002.png", threshold, False),
        ("val/img_002.png", "test/img_069.png", threshold + 1, False),
    ]
    for kept, held_out, count, same in planted:
        bits[held_out] = flipped(bits[kept], count, rng)
        if same:
            sha1[held_out] = sha1[kept]
    manifest = {"data_dir": "/data"} | {side: [[rel, i % 2] for i, rel in enumerate(rels[side])] for side in rels}
    paths = [f"/data/{rel}" for rel in bits]
    scan = ImageScan(
        paths,
        {},
        {f"/data/{rel}": digest for rel, digest in sha1.items()},
        np.packbits(np.stack([bits[rel] for rel in bits]), axis=1),
    )
    return manifest, scan, bits, sha1


@pytest.mark.parametrize("max_distance", [10, 120])
def test_chunked_leak_check_equals_all_pairs(max_distance):
    manifest, scan, bits, sha1 = generated_hashes(threshold=10)
    expected = brute_force_leaks(manifest, bits, sha1, max_distance)
    assert find_leaks(manifest, scan, max_distance) == expected
    if max_distance == 10:  # the planted pairs: at the threshold in, one bit over out, exact told apart
        pairs = {(leak["kind"], leak["distance"], leak[leak["held_out_side"]]) for leak in expected}
        assert pairs == {
            ("near", 10, "test/img_000.png"),
            ("exact", 0, "val/img_000.png"),
            ("near", 0, "val/img_001.png"),
            ("near", 10, f"val/img_{LEAK_CHUNK - 1:03d}.png"),
            ("near", 9, f"val/img_{LEAK_CHUNK:03d}.png"),
            ("near", 10, "test/img_002.png"),
        }
    else:
        assert len(expected) > 1000  # random pairs too: the order of the list is checked as well


def test_near_pairs_of_a_large_external_folder_are_found_chunk_by_chunk(monkeypatch):
    """An external folder (--test-only --data-dir, --site-thresholds, GradCAM) is compared with every known
    image: in one go that needed 8 bytes x N_folder x N_known (16 GB at 50,000 x 40,000)."""
    manifest, scan, bits, _ = generated_hashes(threshold=10)
    folder = [f"/data/{rel}" for rel, _ in manifest["val"] + manifest["test"]]  # 200 rows: four chunks
    known = [f"/data/{rel}" for rel, _ in manifest["train"]]
    compared = []
    bitwise_count = np.bitwise_count
    monkeypatch.setattr(np, "bitwise_count", lambda words: compared.append(words.size) or bitwise_count(words))
    rows, columns, distances = data_quality.near_pairs(scan.hash_words(folder), scan.hash_words(known), 10)
    monkeypatch.undo()
    assert max(compared) <= LEAK_CHUNK * len(known)
    brute = (np.stack([bits[p[6:]] for p in folder])[:, None] != np.stack([bits[p[6:]] for p in known])[None]).sum(2)
    expected = np.nonzero(brute <= 10)
    assert (rows.tolist(), columns.tolist()) == (expected[0].tolist(), expected[1].tolist())
    assert distances.tolist() == brute[expected].tolist()
    assert f"/data/val/img_{LEAK_CHUNK:03d}.png" in [folder[i] for i in rows]  # found past the first chunk


@pytest.mark.parametrize("name", ["tb-cxr-mini", "tb-shenzhen-290"])
def test_leak_check_on_real_x_rays_equals_all_pairs(name):
    data = discover_dataset(shared_data(name))
    paths = [path for path, _ in data.train + (data.test or [])]
    manifest = make_split_manifest(data, 0.15, 0.2, seed=42)
    scan = scan_images(paths, workers=2)
    bits = {
        os.path.relpath(p, data.root): np.unpackbits(scan.perceptual_hash[i]).astype(bool) for i, p in enumerate(paths)
    }
    sha1 = {os.path.relpath(p, data.root): digest for p, digest in scan.pixel_hash.items()}
    for max_distance in (10, 80):  # 80 bits: hundreds of pairs of distinct X-rays
        assert find_leaks(manifest, scan, max_distance) == brute_force_leaks(manifest, bits, sha1, max_distance)
    assert find_leaks(manifest, scan) == []  # distinct real X-rays are at least 42 bits apart


def test_worker_processes_scan_like_one_process(tmp_path):
    data = make_organized(tmp_path / "data", train=14, test=4, size=40)  # 37 files: more than one chunk of work
    paths = sorted(str(p) for p in data.rglob("*.png"))
    (data / "train" / "Normal" / "empty.png").write_bytes(b"")
    paths.append(str(data / "train" / "Normal" / "empty.png"))
    one = scan_images(paths, workers=1, cache_dir=tmp_path / "one", sizes=(24,))
    two = scan_images(paths, workers=2, cache_dir=tmp_path / "two", sizes=(24,))
    assert one.unreadable.keys() == two.unreadable.keys() == {paths[-1]}
    assert one.pixel_hash == two.pixel_hash and np.array_equal(one.perceptual_hash, two.perceptual_hash)
    pixels = np.load(two.pixels[24])
    assert np.array_equal(np.load(one.pixels[24]), pixels)
    assert np.array_equal(pixels[0], decode_resized(paths[0], 24)) and not pixels[-1].any()


@pytest.fixture
def decodes(monkeypatch):
    """Every decode, counted: scanning and caching run in this process so the count sees them all."""
    calls = []

    def counting(decode):
        def wrapper(path):
            calls.append(str(path))
            return decode(path)

        return wrapper

    for module in (data_quality, cache):
        monkeypatch.setattr(module, "load_xray", counting(module.load_xray))
        monkeypatch.setattr(module, "ordered_map", lambda fn, items, workers: map(fn, items))
    return calls


def prepare_and_load(data: Path, tmp_path: Path, seed: int = 1) -> dict:
    """prepare_manifest then make_loaders, as the trainer calls them on the fast data path."""
    split = PreparationSettings(val_fraction=0.2, test_fraction=0.2, seed=seed)
    manifest = prepare_manifest(
        str(data), tmp_path / MANIFEST_NAME, split, workers=2, cache_dir=tmp_path / "cache", image_size=32
    )
    settings = LoaderSettings(
        image_size=32,
        batch_size=4,
        seed=1,
        oversample=False,
        fast_data=True,
        cache_dir=tmp_path / "cache",
        num_workers=0,
    )
    make_loaders(manifest, torch.device("cpu"), settings)
    return manifest


def test_each_image_is_decoded_once_and_an_unchanged_set_not_again(tmp_path, decodes, capsys):
    data = make_organized(tmp_path / "data", train=8, test=3, size=40)
    (data / "train" / "Normal" / "empty.png").write_bytes(b"")
    files = sorted(str(p) for p in data.rglob("*.png"))

    manifest = prepare_and_load(data, tmp_path)
    assert sorted(decodes) == files  # unreadable files included: each decoded (tried) once
    caches = sorted((tmp_path / "cache").glob("decoded_*.npy"))
    assert len(caches) == 3 and not list((tmp_path / "cache").glob("scan_*px_*.npy"))  # the scan's pixels moved
    for side, size in side_cache_sizes(32).items():  # the caches hold the pixels the decode-per-side path makes
        paths = [path for path, _ in manifest_samples(manifest, side)]
        decoded = cache.decoded_cache(paths, size, tmp_path / "cache")
        assert np.array_equal(decoded, np.stack([decode_resized(p, size) for p in paths]))

    decodes.clear()
    capsys.readouterr()
    (tmp_path / "cache" / ".decoded_32px_9_0123.npy.tmp").write_bytes(b"a run killed while caching")
    again = prepare_and_load(data, tmp_path)
    assert decodes == [] and again == manifest
    assert "images and settings unchanged, split read from" in capsys.readouterr().out
    assert sorted((tmp_path / "cache").glob("decoded_*.npy")) == caches

    resplit = prepare_and_load(data, tmp_path, seed=2)  # another split: the kept scan, a new leak check and caches
    output = capsys.readouterr().out
    assert resplit["val"] != manifest["val"] and not [path for path in decodes if path.endswith("empty.png")]
    assert f"Checking images: {len(files)} images unchanged" in output  # the scan, and only the scan, read back
    assert output.count("unchanged, results read from") == 1
    # Training and validation (test/ is fixed), and the killed run's partial file: a read-back run removes nothing.
    assert "Removed 3 cache files of earlier preparations" in output
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    assert {path.name for path in (tmp_path / "cache").glob("decoded_*.npy")} == set(resplit["preparation"]["caches"])
    decodes.clear()

    before = set((tmp_path / "cache").glob("decoded_*.npy"))
    scan_before = set((tmp_path / "cache").glob("scan_*.npz"))
    changed = sorted((data / "test" / "Tuberculosis").iterdir())[0]
    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8), mode="L").save(changed)
    prepare_and_load(data, tmp_path, seed=2)
    assert sorted(decodes) == files  # a changed file: scanned afresh, still once per image
    new = set((tmp_path / "cache").glob("decoded_*.npy")) - before
    assert [path.name.split("_")[:3] for path in new] == [["decoded", "32px", "6"]]  # the test side's (6) only
    assert len(set((tmp_path / "cache").glob("decoded_*.npy")) - new) == 2  # the old test side's cache went
    scans = set((tmp_path / "cache").glob("scan_*.npz"))
    assert len(scans) == 1 and not scans & scan_before  # so did the scan of the files as they were


@pytest.mark.parametrize("change", ["val_fraction", "dedup", "image_size", "added_file", "deleted_cache"])
def test_a_preparation_is_read_back_only_while_files_settings_and_caches_are_unchanged(tmp_path, capsys, change):
    data = make_organized(tmp_path / "data", train=6, test=2, size=40)
    manifest_path, cache_dir = tmp_path / MANIFEST_NAME, tmp_path / "cache"
    split = PreparationSettings(val_fraction=0.2, test_fraction=0.2, seed=1)
    kwargs = dict(workers=0, image_size=32, cache_dir=cache_dir)
    prepare_manifest(str(data), manifest_path, split, **kwargs)
    prepare_manifest(str(data), manifest_path, split, **kwargs)
    assert "images and settings unchanged" in capsys.readouterr().out

    if change == "added_file":
        (data / "train" / "Normal" / "extra.png").write_bytes((data / "test" / "Normal" / "img_000.png").read_bytes())
    elif change == "deleted_cache":
        next(cache_dir.glob("decoded_*.npy")).unlink()
    elif change == "image_size":
        kwargs["image_size"] = 24
    else:
        split = dataclasses.replace(split, **{change: {"val_fraction": 0.4, "dedup": True}[change]})
    manifest = prepare_manifest(str(data), manifest_path, split, **kwargs)
    assert "images and settings unchanged" not in capsys.readouterr().out
    assert read_json(manifest_path) == manifest
    assert all((cache_dir / name).is_file() for name in manifest["preparation"]["caches"])
    if change == "added_file":  # an exact copy of a test image: on the training side, and reported
        assert any(rel.endswith("extra.png") for rel, _ in manifest["train"] + manifest["val"])
        assert [leak["kind"] for leak in manifest["leaks"]] == ["exact"]


class ModelBuilt(Exception):
    """Raised in place of building a model: the run got that far."""


def test_prepare_only_writes_the_manifest_builds_no_model_and_training_reuses_it(tmp_path, capsys, monkeypatch):
    data = make_organized(tmp_path / "data", train=10, test=3, size=40)
    args = ["--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "ckpt"), "--image-size", "32"]

    def build_model(*_, **__):
        raise ModelBuilt

    monkeypatch.setattr(trainer, "build_model", build_model)
    manifest = trainer.main([*args, "--prepare-only"])
    report = capsys.readouterr().out
    assert (tmp_path / "ckpt" / MANIFEST_NAME).is_file() and sum(
        len(manifest[side]) for side in ("train", "val", "test")
    ) == 26
    assert "Prepared data:" in report and "duplicates across splits: 0 exact, 0 near" in report
    assert "decoded cache: " in report and str(tmp_path / "ckpt" / "cache") in report

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    for module in (data_quality, cache):
        monkeypatch.setattr(module, "load_xray", no_decoding)
    with pytest.raises(ModelBuilt):  # the next training run goes from its data straight to the model
        trainer.main(args)
