"""Files that must survive a crash: atomic writes, JSON, and the checkpoint.

A checkpoint file is a plain dict of tensors and built-in types, so it loads with
torch.load(..., weights_only=True) and no file can run code when read. `Checkpoint` is that
file, typed: this module is the only one that knows the dict's keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .config import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, Profile, profile_for
from .errors import CheckpointError
from .metrics import Calibration, log_odds_of
from .model import build_model, count_trainable
from .runtime import ctrl_c_held

# 3: thresholds are calibrated log-odds (an image is TB when scale x d + bias >= t), and validation_counts records
# the images they were chosen on; 2 stored P(TB) thresholds; 1 also a softmax temperature T (scale 1/T, no bias).
CHECKPOINT_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
# A format 1-2 P(TB) threshold was compared with a float32 softmax P(TB) = 1 / (1 + exp(-d)), which is 1.0 once
# the float32 sum 1 + exp(-d) rounds to 1, exp(-d) < 2**-24: d >= 24 ln 2. A stored 1.0 meant "TB from there".
FLOAT32_SATURATION_LOG_ODDS = 24 * math.log(2)
RECOMMENDED_OPERATING_POINT = "youden"  # chosen on validation; "default" (0.5) until an epoch has been validated


def atomic_write(path: Path, write) -> None:
    """Write via a temp file, fsync and rename, so a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the previous file at `path` stays as it was
        raise


def write_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@dataclass
class RunState:
    """What the epoch loop changes; saved in every checkpoint, restored by --resume."""

    epoch: int = 0
    best_score: list = field(default_factory=lambda: [-1.0, -float("inf")])  # [val AUC, -val loss]
    best_epoch: int = 0
    stale_epochs: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    completed: bool = False
    thresholds: dict = field(default_factory=lambda: {"default": 0.0})  # operating point name -> log-odds threshold
    calibration: Calibration = field(default_factory=Calibration)  # how P(TB) is read from the logits
    operating_points_epoch: int = 0  # the epoch whose weights and validation the thresholds come from
    peak_memory_mb: float = 0.0
    validation_counts: dict = field(default_factory=dict)  # class name -> validation images the points rest on


def run_state(saved: dict) -> RunState:
    """The RunState of a checkpoint dict of any readable format. A field the file lacks (written before the
    field existed) takes its default, so that adding a field never makes the checkpoints already saved unreadable."""
    values = {f.name: saved[f.name] for f in fields(RunState) if f.name in saved and f.name != "calibration"}
    if saved["format"] == 1:  # P(TB) = softmax(logits / T): scale 1/T, no bias
        values["calibration"] = Calibration(scale=1.0 / saved["temperature"])
    elif "calibration" in saved:
        values["calibration"] = Calibration(**saved["calibration"])
    if saved["format"] < 3 and "thresholds" in saved:
        values["thresholds"] = {name: threshold_log_odds(p) for name, p in saved["thresholds"].items()}
    return RunState(**values)


def threshold_log_odds(probability: float) -> float:
    """A format 1-2 P(TB) threshold as the log-odds threshold that decides alike (but for float32 rounding
    within an ulp of it)."""
    return FLOAT32_SATURATION_LOG_ODDS if probability >= 1.0 else float(log_odds_of(probability))


@dataclass
class Checkpoint:
    """The weights of one epoch with everything needed to use them: the settings they were trained with,
    the preprocessing the images went through, the run's state, and (for --resume) the training state."""

    model_state: dict[str, torch.Tensor]
    config: dict  # the trainer's settings (TrainConfig as a dict)
    image_size: int
    trainable_parameters: int
    state: RunState = field(default_factory=RunState)
    clahe: dict | None = None  # the CLAHE settings every image was equalised with (config.CLAHE); None: none
    split_digest: str = ""  # split.split_digest of the manifest the weights were trained on
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # Kept in last.pth and the periodic checkpoints, not in best_*.pth: what --resume needs besides the weights.
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    scaler_state: dict | None = None  # empty when the run trained without fp16 (a disabled GradScaler)
    # --site-thresholds: the local sample its operating points were refitted on; None: chosen on validation.
    site: dict | None = None

    @classmethod
    def from_model(cls, model: nn.Module, config: dict, image_size: int, **extra) -> Checkpoint:
        """The checkpoint of a model's current weights; `extra`: the other fields."""
        return cls(model.state_dict(), dict(config), image_size, count_trainable(model), **extra)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint safely (weights_only=True: tensors and plain containers only)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "file not found")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or unsafe files
            raise CheckpointError(path, f"not a safe, readable checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(saved, dict) or "format" not in saved:
            raise CheckpointError(path, "not a checkpoint written by resnet50_tb_full.py")
        if saved["format"] not in READABLE_FORMATS:
            raise CheckpointError(
                path,
                f"it is in checkpoint format {saved['format']!r}, which this version does not read (it reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}; a newer version of this project may have written it)",
            )
        try:
            return cls._from_dict(saved)
        except KeyError as missing:
            raise CheckpointError(path, f"not a checkpoint written by resnet50_tb_full.py (no {missing})") from None

    @classmethod
    def _from_dict(cls, saved: dict) -> Checkpoint:
        training = ("optimizer", "scheduler", "scaler") if "optimizer" in saved else ()
        return cls(
            model_state=saved["model"],
            config=saved["config"],
            image_size=saved["image_size"],
            trainable_parameters=saved["trainable_parameters"],
            state=run_state(saved),
            clahe=saved["preprocessing"].get("clahe"),
            split_digest=saved["split_digest"],
            mlflow_run_id=saved["mlflow_run_id"],
            tracking_uri=saved["tracking_uri"],
            class_names=saved["class_names"],
            mean=saved["mean"],
            std=saved["std"],
            site=saved.get("site"),  # absent: the operating points are validation's
            **{f"{part}_state": saved[part] for part in training},
        )

    def to_dict(self) -> dict:
        """The plain dict the file holds."""
        saved = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model_state,
            "config": dict(self.config),
            "class_names": list(self.class_names),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "trainable_parameters": self.trainable_parameters,
            "mlflow_run_id": self.mlflow_run_id,
            "tracking_uri": self.tracking_uri,
            # what evaluation and GradCAM must redo to see the images as training did
            "preprocessing": {"clahe": dict(self.clahe)} if self.clahe else {},
            "split_digest": self.split_digest,
            **asdict(self.state),
        }
        if self.resumable:
            saved |= {"optimizer": self.optimizer_state, "scheduler": self.scheduler_state, "scaler": self.scaler_state}
        if self.site is not None:
            saved["site"] = dict(self.site)
        return saved

    def save(self, path: Path) -> None:
        with ctrl_c_held():  # seconds at most; cut, torch.save would raise a RuntimeError, not the interrupt
            atomic_write(path, lambda f: torch.save(self.to_dict(), f))

    def with_operating_points(self, thresholds: dict[str, float], site: dict) -> Checkpoint:
        """The same weights, preprocessing and calibration with operating points refitted on a site's sample,
        `site` recording that sample. A checkpoint to predict with: without the training state, so that
        --resume cannot train on from it and replace the site's points with validation's."""
        return replace(
            self,
            state=replace(self.state, thresholds=dict(thresholds)),
            site=dict(site),
            optimizer_state=None,
            scheduler_state=None,
            scaler_state=None,
        )

    def model(self) -> nn.Module:
        """A plain ResNet50 (on the CPU) with these weights."""
        network = build_model("none", num_classes=len(self.class_names))
        network.load_state_dict(self.model_state)
        return network

    @property
    def resumable(self) -> bool:
        """Whether it keeps the optimizer, scheduler and scaler state that --resume continues from."""
        return self.optimizer_state is not None

    @property
    def profile(self) -> Profile:
        """The run profile it was trained with: full training or the transfer-learning baseline."""
        return profile_for(self.config.get("freeze_features", False))

    @property
    def experiment(self) -> str:
        """The MLflow experiment of its training run."""
        return self.config.get("experiment", self.profile.experiment)

    @property
    def initial_weights(self) -> str:
        """The --weights its training started from ('?' when its settings do not say)."""
        return self.config.get("weights", "?")

    @property
    def recommended_operating_point(self) -> str:
        """The name of the stored operating point predictions use."""
        thresholds = self.state.thresholds
        return RECOMMENDED_OPERATING_POINT if RECOMMENDED_OPERATING_POINT in thresholds else "default"

    @property
    def operating_threshold(self) -> float:
        """The log-odds threshold predictions use: Youden's J from validation when stored, else 0 (P(TB) 0.5)."""
        return float(self.state.thresholds[self.recommended_operating_point])

    @property
    def operating_points_chosen_on(self) -> dict:
        """Where the operating points come from ("validation" or the site sample) and the images of each class
        they rest on (empty when a checkpoint older than format 3 does not record them)."""
        if self.site is not None:
            counts = {name: self.site[name] for name in self.class_names if name in self.site}
            return {"sample": f"site sample {self.site.get('name', '?')}", "class_counts": counts}
        return {"sample": "validation", "class_counts": dict(self.state.validation_counts)}

    @property
    def operating_points_chosen_on_text(self) -> str:
        """E.g. 'validation (20 Normal and 4 Tuberculosis)'."""
        chosen = self.operating_points_chosen_on
        counts = " and ".join(f"{n} {name}" for name, n in chosen["class_counts"].items())
        return f"{chosen['sample']} ({counts or 'image counts not recorded'})"
