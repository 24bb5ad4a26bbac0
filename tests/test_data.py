"""Data discovery, junk skipping, greyscale handling and the split manifest."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_organized, shared_data, write_xrays
from PIL import Image

from tbcxr.data import eval_transform, train_transform
from tbcxr.decoding import load_xray
from tbcxr.demo import synthetic_xray
from tbcxr.errors import DataLayoutError
from tbcxr.layout import discover_dataset
from tbcxr.split import make_split_manifest


def test_organized_layout_case_insensitive_and_junk_skipped(tmp_path):
    root = make_organized(tmp_path / "data", train=5, test=3)
    (root / "train" / "Normal").rename(root / "train" / "normal")
    (root / "test").rename(root / "Test")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "normal" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "normal" / "Thumbs.db").write_bytes(b"junk")
    (root / "train" / "normal" / "notes.xlsx").write_bytes(b"PK")

    data = discover_dataset(root)

    assert data.layout == "organized"
    assert Counter(label for _, label in data.train) == {0: 5, 1: 5}
    assert Counter(label for _, label in data.test) == {0: 3, 1: 3}
    assert all(path.endswith(".png") for path, _ in data.train + data.test)


def test_raw_kaggle_layout_one_folder_deeper_with_metadata(tmp_path):
    inner = tmp_path / "archive" / "TB_Chest_Radiography_Database"
    write_xrays(inner / "Normal", 6, False)
    write_xrays(inner / "Tuberculosis", 4, True)
    (inner / "Normal.metadata.xlsx").write_bytes(b"PK")
    (inner / "Tuberculosis.metadata.xlsx").write_bytes(b"PK")
    (inner / "README.md.txt").write_text("kaggle readme")

    data = discover_dataset(tmp_path / "archive")

    assert data.layout == "raw" and data.test is None
    assert Counter(label for _, label in data.train) == {0: 6, 1: 4}


@pytest.mark.parametrize("breakage", ["missing_dir", "no_classes", "empty_class", "no_test"])
def test_bad_layouts_stop_with_expected_layout_and_demo_hint(tmp_path, breakage):
    root = make_organized(tmp_path / "data", train=2, test=2)
    if breakage == "missing_dir":
        root = tmp_path / "nowhere"
    elif breakage == "no_classes":
        root = tmp_path / "data" / "train" / "Normal"
    elif breakage == "empty_class":
        shutil.rmtree(root / "test" / "Tuberculosis")
        (root / "test" / "Tuberculosis").mkdir()
        (root / "test" / "Tuberculosis" / ".DS_Store").write_bytes(b"x")
    else:
        shutil.rmtree(root / "test")

    with pytest.raises(DataLayoutError) as error:
        discover_dataset(root)

    message = str(error.value)
    assert message.startswith("error: ")
    assert "DIR/train/Normal" in message and "--demo" in message


def test_greyscale_and_rgb_files_give_identical_tensors(tmp_path):
    pixels = synthetic_xray(np.random.default_rng(3), 64, tuberculosis=True)
    Image.fromarray(pixels, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB").save(tmp_path / "rgb.png")
    transform = eval_transform(48)

    grey = transform(load_xray(tmp_path / "grey.png"))
    rgb = transform(load_xray(tmp_path / "rgb.png"))

    assert grey.shape == (3, 48, 48)
    assert torch.equal(grey, rgb)


def test_train_transform_output_shape_and_channels_equal(tmp_path):
    pixels = synthetic_xray(np.random.default_rng(4), 80, tuberculosis=False)
    image = Image.fromarray(pixels, mode="L")
    torch.manual_seed(0)
    out = train_transform(64, mean=(0.5,) * 3, std=(0.5,) * 3)(image)
    assert out.shape == (3, 64, 64)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_split_manifest_is_stable_for_a_seed_and_stratified(tmp_path):
    root = tmp_path / "raw"
    write_xrays(root / "Normal", 50, False, size=32)
    write_xrays(root / "Tuberculosis", 10, True, size=32)
    data = discover_dataset(root)

    first = make_split_manifest(data, val_fraction=0.2, test_fraction=0.25, seed=7)
    again = make_split_manifest(data, val_fraction=0.2, test_fraction=0.25, seed=7)
    other = make_split_manifest(data, val_fraction=0.2, test_fraction=0.25, seed=8)

    assert first == again
    assert first["test"] != other["test"]
    sides = {side: [path for path, _ in first[side]] for side in ("train", "val", "test")}
    assert sum(map(len, sides.values())) == 60
    assert not set(sides["train"]) & set(sides["val"]) and not set(sides["train"]) & set(sides["test"])
    for side in ("train", "val", "test"):  # the 5:1 class ratio is kept on every side, up to rounding
        counts = Counter(label for _, label in first[side])
        assert abs(counts[1] - len(sides[side]) / 6) <= 1
    assert Counter(label for _, label in first["test"]) == {0: 12, 1: 3}


def test_real_shared_data_layouts():
    mini = discover_dataset(shared_data("tb-cxr-mini"))
    assert mini.layout == "organized"
    assert Counter(label for _, label in mini.train) == {0: 151, 1: 151}  # .DS_Store skipped
    assert Counter(label for _, label in mini.test) == {0: 50, 1: 50}
    kaggle = discover_dataset(shared_data("tb-kaggle-sample"))
    assert kaggle.layout == "raw" and len(kaggle.train) == 10
    # RGB Normal files and greyscale TB files decode to the same single-channel mode.
    assert {load_xray(path).mode for path, _ in kaggle.train} == {"L"}
