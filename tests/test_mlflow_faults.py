"""MLflow faults that once stopped records or models for good: a queued artifact whose file was deleted held
the offline queue, and a model torch.export cannot trace kept the servable model from ever being registered."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_organized
from mlflow.tracking import MlflowClient

import resnet50_tb_full as trainer
from tbcxr.config import PENDING_RECORDS_NAME
from tbcxr.tracking import continue_run, start_run


def test_a_queued_artifact_whose_file_is_gone_is_skipped_with_a_warning_and_the_rest_replays(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pending = tmp_path / PENDING_RECORDS_NAME
    logger = start_run(uri, "queue", "run", {"epochs": 2}, pending)
    logger.go_offline(OSError("connection refused"), "records are queued")  # as when the store stops answering
    kept, deleted, later = (tmp_path / name for name in ("manifest.json", "roc_curve.png", "summary.json"))
    for path in (kept, deleted, later):
        path.write_text(path.name)
    logger.log_metrics({"val_loss": 0.5}, step=1)
    logger.log_artifact(kept)
    logger.log_artifact(deleted, artifact_path="test")
    logger.log_metrics({"val_loss": 0.4}, step=2)
    logger.log_artifact(later)
    assert len(pending.read_text().splitlines()) == 5  # every record went to the real queue file
    deleted.unlink()  # e.g. a figure removed by hand before --resume
    capsys.readouterr()

    resumed = continue_run(uri, logger.run_id, [], pending)

    captured = capsys.readouterr()
    assert f"WARNING: {deleted} was queued for MLflow run {logger.run_id} but is gone; not sent" in captured.err
    assert f"continuing run {logger.run_id} in {uri} (4 queued records replayed)" in captured.out
    assert not resumed.offline and not pending.exists()  # the queue is done with, not held for the next resume
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "val_loss")] == [(1, 0.5), (2, 0.4)]
    assert sorted(a.path for a in client.list_artifacts(logger.run_id)) == ["manifest.json", "summary.json"]


@pytest.mark.real_log_model
def test_a_pt2_export_failure_still_registers_the_servable_model_and_says_why_the_pt2_copy_is_missing(
    tmp_path, capsys, monkeypatch
):
    def untraceable(*args, **kwargs):
        raise RuntimeError("Dynamic control flow is not supported\n(a second line of detail)")

    monkeypatch.setattr(torch.export, "export", untraceable)  # what MLflow's pt2 logging calls
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = make_organized(tmp_path / "data", train=8, test=4, size=40)

    summary = trainer.main(["--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "ckpt"), "--tracking-uri",
                            uri, "--registered-model", "untraceable", *TINY, "--epochs", "1"])  # fmt: skip

    captured = capsys.readouterr()
    reason = "torch.export failed (RuntimeError: Dynamic control flow is not supported (a second line of detail))"
    assert f"WARNING: the pt2 copy of the model was not logged: {reason}" in captured.err
    assert "Registered model untraceable version 1" in captured.out
    client = MlflowClient(uri)
    [version] = client.search_model_versions("name='untraceable'")
    assert version.run_id == summary["mlflow_run_id"]
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["pt2_model"] == f"not logged: {reason}"
    assert run.info.status == "FINISHED"
