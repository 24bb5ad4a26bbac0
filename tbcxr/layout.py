"""Folder layouts: where a data set's images are and which class each belongs to.

Two layouts are found: organized (train/ and test/, each with Normal/ and Tuberculosis/) and the raw Kaggle
download (class folders only, possibly one folder deeper). Hidden files, spreadsheets and other non-images
are skipped. Nothing is decoded here: data.py prepares what this module finds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import CLASS_NAMES
from .decoding import is_image_file
from .errors import DataLayoutError


@dataclass
class DataSplit:
    """Image paths and labels of one data set; `test` is None for the raw layout."""

    root: Path
    layout: str  # "organized" or "raw"
    train: list[tuple[str, int]]
    test: list[tuple[str, int]] | None


def _child_dirs_by_lower_name(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder (DICOM too), sorted; skips hidden files (.DS_Store), Thumbs.db, spreadsheets."""
    with os.scandir(folder) as entries:  # scandir knows each entry's type without a stat call per file
        names = [entry.name for entry in entries if entry.is_file() and is_image_file(entry.path)]
    return [Path(folder) / name for name in sorted(names)]


def find_class_dirs(folder: Path) -> dict[int, Path] | None:
    """Map label -> class folder when `folder` holds every class folder, else None."""
    children = _child_dirs_by_lower_name(folder)
    found = {label: children.get(name.lower()) for label, name in enumerate(CLASS_NAMES)}
    return found if all(found.values()) else None


def labelled_images(class_dirs: dict[int, Path]) -> list[tuple[str, int]]:
    samples = []
    for label, folder in sorted(class_dirs.items()):
        images = list_images(folder)
        if not images:
            raise DataLayoutError(f"class folder {folder} holds no images")
        samples += [(str(p), label) for p in images]
    return samples


def discover_dataset(data_dir: str | Path) -> DataSplit:
    """Find the organized (train/test) or the raw Kaggle (class folders only) layout."""
    root = Path(data_dir).expanduser().resolve()
    if not str(data_dir) or not root.is_dir():
        raise DataLayoutError(f"data folder '{data_dir}' does not exist (set --data-dir or TB_DATA_DIR)")
    children = _child_dirs_by_lower_name(root)
    if "train" in children:
        train_dirs = find_class_dirs(children["train"])
        test_dirs = find_class_dirs(children["test"]) if "test" in children else None
        if train_dirs is None or test_dirs is None:
            raise DataLayoutError(
                f"{root} has a train folder but not train/ and test/ each with Normal and Tuberculosis"
            )
        return DataSplit(root, "organized", labelled_images(train_dirs), labelled_images(test_dirs))
    class_dirs = find_class_dirs(root)
    if class_dirs is None:  # the Kaggle zip unpacks to one extra folder level
        nested = [d for d in children.values() if find_class_dirs(d)]
        if len(nested) == 1:
            class_dirs = find_class_dirs(nested[0])
    if class_dirs is None:
        raise DataLayoutError(f"no Normal and Tuberculosis folders found in {root}")
    return DataSplit(root, "raw", labelled_images(class_dirs), None)
