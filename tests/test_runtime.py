"""Where the computation runs: shards that every rank can gather, the process group's patience with a slow
first preparation (real torchrun jobs over gloo), and evaluation in full float32 on every path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torchvision
from conftest import ROOT, stop_process_group, write_xrays

import resnet50_tb_full as trainer
from tbcxr import runtime
from tbcxr.checkpoint import Checkpoint
from tbcxr.data import checkpoint_transform
from tbcxr.decoding import load_xray
from tbcxr.errors import ConfigurationError
from tbcxr.evaluation import predict_checkpoint
from tbcxr.model import build_model
from tbcxr.runtime import DistributedContext, process_group_timeout, shard


# --------------------------------------------------------------------------- shards
@pytest.mark.parametrize("world_size", [2, 3, 4, 5, 8])
def test_every_rank_gets_equally_many_items_even_with_fewer_items_than_ranks(world_size):
    for count in range(1, 2 * world_size + 2):  # fewer items than half the ranks, fewer than all, more
        items = [f"image{i}" for i in range(count)]
        shards = [shard(items, DistributedContext(rank, world_size)) for rank in range(world_size)]
        # all_gather needs one length on every rank: 2 items on 8 ranks once gave 1,1,1,1,0,0,0,0 and hung.
        assert [len(part) for part in shards] == [-(-count // world_size)] * world_size, count
        interleaved = [item for row in zip(*shards) for item in row]  # the order gather_shards restores
        assert interleaved[:count] == items, count


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(script: str, processes: int, tmp_path, timeout_minutes: float, *args) -> subprocess.CompletedProcess:
    """A real torchrun job running `script` with tbcxr importable, in its own process group (ended on a hang)."""
    path = tmp_path / "job.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n{script}")
    env = os.environ | {runtime.TIMEOUT_VARIABLE: str(timeout_minutes), "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, f"--nproc_per_node={processes}", str(path), *map(str, args)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        stop_process_group(process, signal.SIGKILL)
        pytest.fail("the torchrun job hung: a rank is still waiting in a collective")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


GATHER = """
import json
import time

import torch

from tbcxr.runtime import gather_shards, init_distributed, main_process_first, shard

dist, _ = init_distributed("cpu")
with main_process_first(dist):
    if dist.is_main:
        time.sleep(3)  # a preparation the others wait for, well within the timeout
gathered = {}
for count in (1, 2, 3, 5):
    mine = torch.tensor(shard(list(range(10, 10 + count)), dist), dtype=torch.float64).unsqueeze(1)
    gathered[count] = gather_shards(mine, dist, count).squeeze(1).long().tolist()
if dist.is_main:
    print("GATHERED " + json.dumps(gathered))
torch.distributed.destroy_process_group()
"""


def test_four_ranks_gather_every_item_in_order_from_sets_smaller_than_the_job(tmp_path):
    result = torchrun(GATHER, 4, tmp_path, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("GATHERED "))
    assert json.loads(line.removeprefix("GATHERED ")) == {
        "1": [10], "2": [10, 11], "3": [10, 11, 12], "5": [10, 11, 12, 13, 14]
    }  # fmt: skip


# --------------------------------------------------------------------------- the process group's timeout
SLOW_PREPARATION = """
import time

import torch

from tbcxr.runtime import init_distributed, main_process_first

dist, _ = init_distributed("cpu")
with main_process_first(dist):
    if dist.is_main:
        time.sleep(float(sys.argv[1]))  # rank 0 scans, leak-checks and caches; the others wait
print(f"rank {dist.rank} prepared", flush=True)
torch.distributed.destroy_process_group()
"""


def test_the_process_group_takes_its_timeout_from_the_environment_and_names_it_when_exceeded(tmp_path):
    # 3 s of patience against 15 s of preparation: the waiting rank stops with the setting to raise.
    result = torchrun(SLOW_PREPARATION, 2, tmp_path, 0.05, 15)
    assert result.returncode != 0
    assert "rank 1 prepared" not in result.stdout
    assert (
        "error: rank 1 stopped waiting for rank 0's data preparation: it took longer than the process group "
        f"timeout (0.05 min; set {runtime.TIMEOUT_VARIABLE} for a longer one)"
    ) in result.stderr


def test_the_default_timeout_leaves_hours_for_a_first_preparation_and_bad_settings_are_refused(monkeypatch):
    monkeypatch.delenv(runtime.TIMEOUT_VARIABLE, raising=False)
    assert process_group_timeout() == timedelta(hours=2)  # NCCL's own default, 10 minutes, killed such jobs
    monkeypatch.setenv(runtime.TIMEOUT_VARIABLE, "300")
    assert process_group_timeout() == timedelta(hours=5)
    for bad in ("0", "-5", "ten", "nan"):
        monkeypatch.setenv(runtime.TIMEOUT_VARIABLE, bad)
        with pytest.raises(ConfigurationError, match=f"{runtime.TIMEOUT_VARIABLE}='{bad}': give the timeout"):
            process_group_timeout()


# --------------------------------------------------------------------------- full float32 for what is reported
def precision_flags() -> tuple:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.fixture
def tf32_allowed():
    """TF32 switched on for convolutions and matrix products, as on an Ampere GPU; the flags restored after."""
    saved = precision_flags()
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_ieee_float32_turns_tf32_off_inside_and_restores_the_flags_even_after_an_error(tf32_allowed):
    with runtime.ieee_float32():
        assert precision_flags() == ("ieee", "ieee")
    assert precision_flags() == ("tf32", "tf32")
    with pytest.raises(RuntimeError, match="scoring failed"), runtime.ieee_float32():
        raise RuntimeError("scoring failed")
    assert precision_flags() == ("tf32", "tf32")


def test_the_trainers_evaluation_and_test_only_scoring_both_run_in_full_float32(tf32_allowed, tmp_path):
    seen = []  # the convolution precision of every forward pass of the ResNet

    def record(module, args, output):
        if isinstance(module, torchvision.models.ResNet):
            seen.append(torch.backends.cudnn.conv.fp32_precision)

    torch.manual_seed(0)
    model = build_model("none", freeze_features=False)
    samples = [(str(path), 0) for path in write_xrays(tmp_path, 4, False, size=40)]
    images = torch.stack([checkpoint_transform(Checkpoint.from_model(model, {}, 32))(load_xray(p)) for p, _ in samples])
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model(images)  # what training's forward passes see
        trainer.evaluate(model, [(images, torch.zeros(4, dtype=torch.long))], torch.device("cpu"))  # finish() too
        predict_checkpoint(Checkpoint.from_model(model, {}, 32), samples, torch.device("cpu"), 2, 0)  # --test-only
    finally:
        hook.remove()

    assert seen == ["tf32", "ieee", "ieee", "ieee"]  # predict_checkpoint: two batches of two
    assert precision_flags() == ("tf32", "tf32")
