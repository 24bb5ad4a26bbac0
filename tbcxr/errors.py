"""The errors the library raises: a TbcxrError's message is the whole text a user reads ("error: ...").

Library functions raise these and never end the process, so that a notebook or another program can
catch them; each script's `main` (decorated with `exits_on_error`) prints the message and exits 1.
"""

from __future__ import annotations

import functools
from pathlib import Path

EXPECTED_LAYOUT = """Expected one of these layouts (class folder names match case-insensitively):
  organized:  DIR/train/Normal/*.png  DIR/train/Tuberculosis/*.png
              DIR/test/Normal/*.png   DIR/test/Tuberculosis/*.png
  raw Kaggle: DIR/Normal/*.png        DIR/Tuberculosis/*.png
              (or one folder deeper, e.g. DIR/TB_Chest_Radiography_Database/Normal)
No data at hand? Run with --demo to generate a small synthetic data set."""


class TbcxrError(Exception):
    """A problem the user can act on; str() is the message, saying what to do."""


class ConfigurationError(TbcxrError):
    """Settings that cannot work here: a flag, an environment variable, the device, the MLflow store."""


class FlagError(ConfigurationError):
    """Flags that do not go together; the script shows it as a usage error (argparse's exit status 2)."""


class DataError(TbcxrError):
    """Images or a split that cannot be used as asked: unreadable files, a changed split, too few images."""


class DataLayoutError(DataError):
    """A missing or malformed data folder; the message lists the layouts expected."""

    def __init__(self, problem: str):
        super().__init__(f"error: {problem}\n{EXPECTED_LAYOUT}")


class ImageReadError(DataError):
    def __init__(self, path: str, problem: Exception):
        super().__init__(f"error: cannot read image {path}: {problem}")


class CheckpointError(TbcxrError):
    def __init__(self, path, problem: str):
        super().__init__(
            f"error: cannot use checkpoint {path}: {problem}.\n"
            "Train one first, e.g.: python resnet50_tb_full.py --data-dir DIR  (or --demo)"
        )


class OperatingPointError(TbcxrError):
    def __init__(self, path, name: str, stored: dict[str, float]):
        listing = ", ".join(f"{key} ({value:.4f})" for key, value in stored.items())
        super().__init__(f"error: checkpoint {path} has no operating point {name!r}; it stores: {listing}")


class WeightsUnavailableError(TbcxrError):
    def __init__(self, problem: str, cache_file: Path, url: str):
        super().__init__(
            f"error: ImageNet weights are not available ({problem}).\n"
            f"  - place the file at {cache_file} (download {url} on a machine with internet), or\n"
            f"  - pass --weights PATH to a ResNet50 state dict or checkpoint, or\n"
            f"  - pass --weights none to train from scratch (random initialisation)."
        )


class TrainingError(TbcxrError):
    """Training cannot go on (out of memory, a checkpoint another run wrote); the message says how to resume."""


class NonFiniteLossError(TrainingError):
    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(
            f"error: the training loss became {value} at epoch {epoch}, batch {batch}. The best checkpoint is "
            "untouched. Start a new run with a lower learning rate (--lr; a resumed run keeps its rates), or "
            "resume with full precision (--no-amp)."
        )


def exits_on_error(get_args_parser):
    """Decorate a script's main: a TbcxrError ends it with `parser.exit(1, message)`: the message on stderr,
    exit status 1 (a failed run; argparse's 2 is for a mistyped command line), and no traceback."""

    def decorate(main):
        @functools.wraps(main)
        def main_exiting_on_error(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except TbcxrError as exc:
                get_args_parser().exit(1, f"{exc}\n")

        return main_exiting_on_error

    return decorate
