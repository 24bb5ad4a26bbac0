"""torchrun: data-parallel training over gloo on the CPU, checked against one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, learning_metrics, make_organized
from conftest import TINY as CONFTEST_TINY
from mlflow.tracking import MlflowClient

import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint, read_json
from tbcxr.config import MANIFEST_NAME
from tbcxr.data import EpochSampler, LoaderSettings, make_loaders
from tbcxr.runtime import DistributedContext

TINY = [*CONFTEST_TINY, *"--epochs 2 --seed 7 --deterministic".split()]


def run(launcher: list[str], data, tmp_path, name: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [
            *launcher,
            str(ROOT / "resnet50_tb_full.py"),
            "--data-dir",
            str(data),
            "--checkpoint-dir",
            str(tmp_path / name),
            "--tracking-uri",
            f"sqlite:///{tmp_path / (name + '.db')}",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_organized(tmp_path_factory.mktemp("ddp") / "data", train=17, test=5, size=40)


@pytest.mark.parametrize("count", [12, 13])
def test_each_rank_gets_a_disjoint_half_of_the_epoch(count):
    labels = [0] * (count - 4) + [1] * 4
    single = EpochSampler(labels, seed=3, oversample=True)
    single.set_epoch(4)
    shards = []
    for rank in (0, 1):
        sampler = EpochSampler(labels, seed=3, oversample=True, dist=DistributedContext(rank, 2))
        sampler.set_epoch(4)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler)
    whole = list(single)
    assert len(shards[0]) == len(shards[1]) == -(-len(whole) // 2)
    interleaved = [pair for pair_of_ranks in zip(*shards) for pair in pair_of_ranks]
    assert interleaved[: len(whole)] == whole  # together exactly one pass over the epoch's order
    assert not {p for p in shards[0][: len(whole) // 2]} & {p for p in shards[1][: len(whole) // 2]}


def test_two_process_torchrun_writes_one_set_of_outputs_and_evaluates_the_whole_set(data, tmp_path):
    result = run(torchrun(2), data, tmp_path, "ddp")

    assert result.stdout.count("Epoch 1: Loss=") == 1 and result.stdout.count("Test Results - ") == 1
    assert "Distributed: 2 processes (gloo); global batch 8 x 2 = 16" in result.stdout
    # Adam with the original design's rates: no scaling by the process count unless asked for.
    assert "learning rates unscaled (--lr-scale none)" in result.stdout
    ckpt = tmp_path / "ddp"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["best_resnet50_tb_full_trained.pth", "last.pth"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'ddp.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.metrics["world_size"] == 2
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [1, 2]

    # The gathered validation metrics equal a single-process evaluation of the final weights.
    last = Checkpoint.load(ckpt / "last.pth")
    settings = last.config
    assert [
        group["initial_lr"] if "initial_lr" in group else group["lr"] for group in last.optimizer_state["param_groups"]
    ] == [pytest.approx(settings["lr"] * settings["backbone_lr_mult"]), pytest.approx(settings["lr"])]
    model = last.model()
    config = trainer.config_from_args(["--resume", str(ckpt / "last.pth")])
    manifest = read_json(ckpt / MANIFEST_NAME)
    assert len(manifest["val"]) % 2 == 1  # an odd count: the sampler's padding must be dropped
    loader_settings = LoaderSettings(
        image_size=config.image_size,
        batch_size=config.batch_size,
        seed=config.seed,
        oversample=True,
        fast_data=config.fast_data,
        cache_dir=ckpt / "cache",
        num_workers=0,
    )
    _, val_loader, _ = make_loaders(manifest, torch.device("cpu"), loader_settings)
    single = trainer.evaluate(model, val_loader, torch.device("cpu"))
    logged = last.state.history[-1]
    for key in ("accuracy", "f1", "sensitivity", "specificity", "auc"):
        assert logged[f"val_{key}"] == pytest.approx(single[key], abs=1e-9), key
    assert logged["val_loss"] == pytest.approx(single["loss"], rel=1e-5)

    # Resuming the finished run under torchrun: every process stops; none is left waiting for the others.
    resumed = subprocess.run(
        [*torchrun(2), str(ROOT / "resnet50_tb_full.py"), "--resume", str(ckpt / "last.pth")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing left to train" in resumed.stdout and "Epoch 3" not in resumed.stdout


def test_one_process_torchrun_equals_a_plain_run(data, tmp_path):
    run(torchrun(1), data, tmp_path, "torchrun1")
    run([sys.executable], data, tmp_path, "plain")
    with_torchrun = learning_metrics(torch.load(tmp_path / "torchrun1" / "last.pth", weights_only=True)["history"])
    plain = learning_metrics(torch.load(tmp_path / "plain" / "last.pth", weights_only=True)["history"])
    assert len(plain) == 2
    for a, b in zip(with_torchrun, plain):
        assert a == pytest.approx(b, rel=1e-6)
