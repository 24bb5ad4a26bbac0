"""Does a model trained on one hospital's X-rays detect tuberculosis at another hospital?

Trains, from random weights and on the same data with the same budget of epochs and pixels,
(a) a naive reference: plain torchvision ResNet50, ImageFolder + PIL transforms (resize, flip),
    Adam backbone 1e-4 / head 1e-3, the last epoch kept;
(b) this project: `resnet50_tb_full.py --weights none` with its from-scratch recipe,
for several seeds, and scores each on the training set's own test side (internal) and on a
second hospital never used for training or for choosing anything (external). ROC AUC with a
95% stratified bootstrap interval per run, the mean over seeds, and the difference of the
means on the external set with a paired bootstrap interval (the same resampled images for every
model).

    python benchmarks/bench_generalisation.py                        # 3 seeds, 15 epochs, 128 px
    python benchmarks/bench_generalisation.py --seeds 0 --epochs 3   # a quick look
    python benchmarks/bench_generalisation.py --only project --project-args --no-clahe

With --per-epoch every epoch's weights are also scored (for analysis only: nothing is chosen
on the external set), to show which rule for picking the checkpoint would have generalised.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchvision import datasets, models, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import resnet50_tb_full as trainer  # noqa: E402
from tbcxr.checkpoint import Checkpoint  # noqa: E402
from tbcxr.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tbcxr.evaluation import predict_checkpoint  # noqa: E402
from tbcxr.layout import discover_dataset  # noqa: E402
from tbcxr.metrics import bootstrap_indices, selection_score  # noqa: E402
from tbcxr.runtime import seed_everything  # noqa: E402
from tbcxr.split import held_out_samples  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SHARED_SETTINGS = ("train_dir", "external_dir", "epochs", "image_size", "batch_size")  # what --merge checks
PER_EPOCH_NAME = "per_epoch_auc.json"  # beside a project run's checkpoints: --per-epoch's scores


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-dir", default=str(SHARED / "tb-cxr-mini"), help="organized train/test folder")
    parser.add_argument(
        "--external-dir",
        default=str(SHARED / "tb-shenzhen-290"),
        help="another collection: a hospital never trained on",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="one training per seed and model (default 0 1 2; with "
                        "--merge: report these seeds only)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=15, help="epochs for both models")
    parser.add_argument("--image-size", type=int, default=128, help="input size for both models")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for both models")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--only", choices=["both", "naive", "project"], default="both", help="which models to train")
    parser.add_argument("--per-epoch", action="store_true", help="also score every epoch of the project's runs")
    parser.add_argument("--reuse", action="store_true", help="score a finished project run in --work-dir again")
    parser.add_argument("--label", default="project", help="the name the project's runs are reported and saved under "
                        "(keeps a variant apart from the recipe in --merge)")  # fmt: skip
    parser.add_argument("--project-args", nargs=argparse.REMAINDER, default=[], help="extra trainer flags")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "data" / "generalisation"), help="scratch")
    parser.add_argument("--out", default="", help="write the results, per-image scores included, as JSON here")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="train nothing: report on the runs saved by earlier --out files (e.g. --only naive "
                        "and --only project run apart)")  # fmt: skip
    return parser


# --------------------------------------------------------------------------- (a) the naive reference
def naive_transforms(size: int, train: bool) -> transforms.Compose:
    steps = [transforms.Resize((size, size))] + ([transforms.RandomHorizontalFlip()] if train else [])
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def naive_scores(model, folder: Path, size: int, same_order_as: list) -> tuple[np.ndarray, np.ndarray]:
    """Labels and TB probabilities of the naive model on an ImageFolder (class folders Normal, Tuberculosis),
    in the order of the project's samples, so that the paired bootstrap pairs the same images."""
    model.eval()
    dataset = datasets.ImageFolder(str(folder), transform=naive_transforms(size, train=False))
    assert dataset.classes == ["Normal", "Tuberculosis"], dataset.classes
    assert [Path(p).resolve() for p, _ in dataset.samples] == [Path(p).resolve() for p, _ in same_order_as]
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    labels, probs = [], []
    for images, targets in loader:
        probs.append(model(images).softmax(dim=1)[:, 1])
        labels.append(targets)
    return torch.cat(labels).numpy(), torch.cat(probs).numpy()


def train_naive(args, seed: int) -> dict:
    seed_everything(seed)
    train_set = datasets.ImageFolder(str(Path(args.train_dir) / "train"), naive_transforms(args.image_size, True))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    model = models.resnet50(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, 2)
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    optimizer = torch.optim.Adam([{"params": backbone, "lr": 1e-4}, {"params": model.fc.parameters(), "lr": 1e-3}])
    for _ in range(args.epochs):
        model.train()
        for images, targets in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
    return {
        "internal": naive_scores(model, Path(args.train_dir) / "test", args.image_size, internal_samples(args)),
        "external": naive_scores(model, Path(args.external_dir), args.image_size, external_samples(args)),
    }


def internal_samples(args) -> list:
    return discover_dataset(args.train_dir).test


def external_samples(args) -> list:
    return discover_dataset(args.external_dir).train


# --------------------------------------------------------------------------- (b) this project
def project_scores(checkpoint: Checkpoint, internal, external) -> dict:
    device = torch.device("cpu")
    return {"internal": predict_checkpoint(checkpoint, internal, device, 64, 2),
            "external": predict_checkpoint(checkpoint, external, device, 64, 2)}  # fmt: skip


def train_project(args, seed: int) -> dict:
    work = Path(args.work_dir) / f"{re.sub(r'[^A-Za-z0-9]+', '-', args.label)}_seed{seed}"
    flags = ["--data-dir", args.train_dir, "--weights", "none", "--image-size", str(args.image_size),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(seed),
             "--checkpoint-dir", str(work), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
             "--num-workers", "2", "--early-stop-patience", str(args.epochs)]  # fmt: skip
    if args.per_epoch:
        flags += ["--save-every", "1"]
    flags += args.project_args
    last_path = work / "last.pth"
    # A finished run is reused only if it was trained with exactly these settings.
    last = Checkpoint.load(last_path) if args.reuse and last_path.is_file() else None
    if not (last and last.state.completed and last.config == asdict(trainer.config_from_args(flags))):
        shutil.rmtree(work, ignore_errors=True)
        trainer.main(flags)
        last = Checkpoint.load(last_path)
    best_path = work / "best_resnet50_tb_full_trained.pth"
    best = Checkpoint.load(best_path)
    internal = held_out_samples(best_path, checkpoint=best)[0]
    assert internal == internal_samples(args), "the project must be scored on the organized test/ side"
    external = external_samples(args)
    result = project_scores(best, internal, external)
    result |= {"best_epoch": last.state.best_epoch, "history": last.state.history}
    if args.per_epoch:
        result["per_epoch"] = per_epoch_aucs(work, internal, external)
    return result


def per_epoch_aucs(work: Path, internal, external) -> list[dict[str, float]]:
    """Internal and external AUC of every epoch's weights. The epoch checkpoints (15 of 190 MB per run) are
    deleted once scored, so the AUCs are kept in the run's folder, where a --reuse run reads them back."""
    saved = work / PER_EPOCH_NAME
    if saved.is_file():
        return json.loads(saved.read_text())
    paths = sorted(work.glob("*_epoch*_resnet50_tb_full_trained.pth"), key=lambda p: int(p.stem.split("_")[1][5:]))
    aucs = []
    for path in paths:
        scores = project_scores(Checkpoint.load(path), internal, external)
        aucs.append({part: roc_auc_score(*scores[part]) for part in ("internal", "external")})
    saved.write_text(json.dumps(aucs))
    for path in paths:  # only once the AUCs are saved: a run stopped in between scores them again
        path.unlink()
    return aucs


# --------------------------------------------------------------------------- report
def auc_with_interval(labels, probs, resamples: int) -> dict:
    draws = [roc_auc_score(labels[i], probs[i]) for i in bootstrap_indices(labels, resamples, seed=0)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"auc": float(roc_auc_score(labels, probs)), "ci_low": float(low), "ci_high": float(high)}


def mean_difference(runs: dict, model: str, reference: str, part: str, resamples: int) -> dict:
    """Mean over seeds of one model's AUC minus another's, with two paired bootstrap intervals: over the
    images (the same resampled images for both), and over the images and the seeds (each model's seeds
    resampled too: how much the result would move with other seeds; wide with a few seeds)."""
    labels = runs[reference][0][part][0]
    for name in (model, reference):
        for run in runs[name]:
            assert np.array_equal(run[part][0], labels), "both models must be scored on the same images"

    def difference(index, seeds):
        means = {name: np.mean([roc_auc_score(labels[index], runs[name][s][part][1][index]) for s in seeds[name]])
                 for name in (model, reference)}  # fmt: skip
        return means[model] - means[reference]

    every_seed = {name: range(len(runs[name])) for name in (model, reference)}
    rng = np.random.default_rng(2)
    images = [difference(i, every_seed) for i in bootstrap_indices(labels, resamples, seed=1)]
    both = [
        difference(i, {name: rng.integers(0, len(runs[name]), len(runs[name])) for name in every_seed})
        for i in bootstrap_indices(labels, resamples, seed=3)
    ]
    (low, high), (seeds_low, seeds_high) = np.percentile(images, [2.5, 97.5]), np.percentile(both, [2.5, 97.5])
    return {"difference": float(difference(np.arange(len(labels)), every_seed)), "ci_low": float(low),
            "ci_high": float(high), "seeds_ci_low": float(seeds_low), "seeds_ci_high": float(seeds_high)}  # fmt: skip


def selection_rules(run: dict) -> dict[str, dict]:
    """Which epoch each checkpoint-selection rule picks from the validation history alone, and the internal
    and external AUC of that epoch's weights (needs --per-epoch; the external set chooses nothing here)."""
    history = run["history"]
    epochs = len(history)
    picks = {"last epoch": epochs, "lowest validation loss": 1 + int(np.argmin([h["val_loss"] for h in history]))}
    for window in (1, 3):
        scores = [selection_score(history[:e], min(window, epochs)) for e in range(1, epochs + 1)]
        picks[f"best validation AUC, window {window}"] = 1 + max(range(epochs), key=lambda i: (scores[i], -i))
    return {rule: {"epoch": e, **run["per_epoch"][e - 1]} for rule, e in picks.items()}


def print_table(results: dict, args) -> None:
    print(f"\nTrained on {args.train_dir} (train side), {args.epochs} epochs at {args.image_size} px, random initial "
          f"weights; ROC AUC [95% CI, {args.resamples} stratified bootstrap resamples]")  # fmt: skip
    external = f"external ({Path(args.external_dir).name})"
    print(f"{'model':<18}{'seed':>5}  {'internal (own test side)':<28}{external:<28}")
    for name, runs in results["runs"].items():
        for run in runs:
            seed = run["seed"]
            cells = [
                f"{run[p]['auc']:.3f} [{run[p]['ci_low']:.3f}, {run[p]['ci_high']:.3f}]"
                for p in ("internal", "external")
            ]
            print(f"{name:<18}{seed:>5}  {cells[0]:<28}{cells[1]:<28}")
        means = [np.mean([run[p]["auc"] for run in runs]) for p in ("internal", "external")]
        print(f"{name:<18}{'mean':>5}  {means[0]:<28.3f}{means[1]:<28.3f}")
    for name, runs in results["runs"].items():
        for run in runs:
            if "per_epoch" in run:
                print(
                    f"{name}, seed {run['seed']}: the epoch each selection rule picks (external AUC for analysis only)"
                )
                for rule, pick in selection_rules(run).items():
                    print(f"  {rule:<34} epoch {pick['epoch']:>2}: internal {pick['internal']:.3f}, "
                          f"external {pick['external']:.3f}")  # fmt: skip
    for pair, parts in results["differences"].items():
        for part, entry in parts.items():
            images = f"[{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]"
            seeds = f"[{entry['seeds_ci_low']:+.3f}, {entry['seeds_ci_high']:+.3f}]"
            print(f"{pair}, mean {part} AUC: {entry['difference']:+.3f}, 95% CI {images} over images, {seeds} over "
                  "images and seeds")  # fmt: skip


def train_all(args) -> tuple[dict, float]:
    """{model: [per-seed scores]} and the seconds it took."""
    started = time.perf_counter()
    names = ["naive", "project"] if args.only == "both" else [args.only]
    scores = {name: [] for name in names}
    for seed in args.seeds or [0, 1, 2]:
        for name in names:
            print(f"== {name}, seed {seed}", flush=True)
            run = train_naive(args, seed) if name == "naive" else train_project(args, seed)
            scores[name].append(run | {"seed": seed})
    if "project" in scores:
        scores[args.label] = scores.pop("project")
    return scores, time.perf_counter() - started


def load_saved(paths: list[str], args) -> tuple[dict, float]:
    """Per-image scores and training time saved by earlier runs' --out files, which must share the data,
    the budget and the images scored; args takes their settings, for the table's heading."""
    scores, seconds, first = {}, 0.0, None
    for path in paths:
        saved = json.loads(Path(path).read_text())
        settings = {key: saved["args"][key] for key in SHARED_SETTINGS} | {"images": saved.get("images")}
        first = first or settings
        differing = [key for key, value in settings.items() if value != first[key] and None not in (value, first[key])]
        if differing:
            raise SystemExit(f"error: {path} differs from {paths[0]} in {', '.join(differing)}: not comparable")
        seconds += saved["seconds"]
        for name, runs in saved["scores"].items():
            for run in runs:
                if args.seeds and run["seed"] not in args.seeds:
                    continue
                if run["seed"] in [r["seed"] for r in scores.get(name, [])]:
                    raise SystemExit(
                        f"error: {name}, seed {run['seed']} is in more than one file; give it another --label"
                    )
                parts = {part: tuple(np.asarray(values) for values in run[part]) for part in ("internal", "external")}
                scores.setdefault(name, []).append(run | parts)
    vars(args).update({key: first[key] for key in SHARED_SETTINGS})
    return scores, seconds


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.label == "naive":
        raise SystemExit("error: --label naive is the reference's name")
    scores, seconds = load_saved(args.merge, args) if args.merge else train_all(args)
    names = list(scores)
    results = {"date": str(date.today()), "args": vars(args), "runs": {}, "seconds": seconds}
    results["images"] = {  # in the order of every run's scores: what --merge checks the pairing by
        "internal": [Path(path).name for path, _ in internal_samples(args)],
        "external": [Path(path).name for path, _ in external_samples(args)],
    }
    for name, runs in scores.items():
        results["runs"][name] = [
            {part: auc_with_interval(*run[part], args.resamples) for part in ("internal", "external")}
            | {key: run[key] for key in ("seed", "best_epoch", "history", "per_epoch") if key in run}
            for run in runs
        ]
    results["differences"] = {  # every model against each one listed before it (the naive reference first)
        f"{model} - {reference}": {
            part: mean_difference(scores, model, reference, part, args.resamples) for part in ("internal", "external")
        }
        for i, reference in enumerate(names)
        for model in names[i + 1 :]
    }
    print_table(results, args)
    print(f"Total training and scoring time: {results['seconds'] / 60:.1f} min")
    if args.out:
        saved = {name: [{k: [np.asarray(a).tolist() for a in v] if k in ("internal", "external") else v
                         for k, v in run.items()} for run in runs] for name, runs in scores.items()}  # fmt: skip
        Path(args.out).write_text(json.dumps(results | {"scores": saved}, indent=2))
    return results


if __name__ == "__main__":
    main()
