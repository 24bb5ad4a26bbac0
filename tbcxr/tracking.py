"""MLflow in one place: choosing the store, runs, the offline queue, artifact logging (model logging: model_registry).

A run survives its store going away: the first failure prints one warning, later records go
to a JSON-lines queue beside the checkpoints, and --resume replays the queue.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from .errors import ConfigurationError
from .runtime import ctrl_c_held


def server_answers(uri: str, timeout: float = 1.0) -> bool:
    """True when an MLflow server answers its /health endpoint at `uri`."""
    host = urllib.parse.urlparse(uri).hostname or ""
    # A loopback probe never goes through a proxy; a fresh opener reads the proxy settings now.
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    try:
        with urllib.request.build_opener(*handlers).open(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite store URI (relative to the current folder, as SQLAlchemy reads it);
    None for a server or an in-memory database."""
    if not uri.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def store_reachable(uri: str) -> bool:
    """Whether an MLflow store can be used from here: a server that answers, or an existing sqlite file."""
    if uri.startswith(("http://", "https://")):
        return server_answers(uri)
    if database := sqlite_file(uri):
        return database.is_file()
    return bool(uri)


def absolute_sqlite(uri: str) -> str:
    """A sqlite store URI with its file as an absolute path, so that checkpoints find the store from any folder."""
    database = sqlite_file(uri)
    if database is None:
        return uri
    from sqlalchemy.engine import make_url

    return make_url(uri).set(database=str(database.resolve())).render_as_string(hide_password=False)


def resolve_tracking_uri(explicit: str, port: int, recorded: str = "") -> tuple[str, str]:
    """Pick the MLflow store: an explicit URI, MLFLOW_TRACKING_URI, the `recorded` store (a training run's,
    for its evaluation) if it can be used, the local server on `port`, else sqlite (as an absolute path)."""
    explicit = explicit or os.environ.get("MLFLOW_TRACKING_URI", "")
    explicit = absolute_sqlite(explicit or (recorded if store_reachable(recorded) else ""))
    if explicit:
        if explicit.startswith(("http://", "https://")) and not server_answers(explicit, timeout=5.0):
            raise ConfigurationError(
                f"error: the MLflow tracking server {explicit} does not answer.\n"
                f"Start it with: mlflow server --host 127.0.0.1 --port {port}  (or drop --tracking-uri)"
            )
        return explicit, "given"
    local = f"http://127.0.0.1:{port}"
    if server_answers(local):
        return local, f"MLflow server on port {port}"
    return absolute_sqlite("sqlite:///mlflow.db"), (
        f"no MLflow server on port {port}; logging to mlflow.db in this folder. "
        f"Browse it from here with: mlflow ui --host 127.0.0.1 --port {port}"
    )


class RunLogger:
    """Logs to one MLflow run and survives the store going away.

    The first failed call prints one warning; from then on nothing is sent, and every
    record (metrics, artifacts) goes to a JSON-lines file beside the checkpoints.
    `replay_pending()` sends that file on the next `--resume` that reaches the store.
    """

    def __init__(self, tracking_uri: str, run_id: str, pending_path: Path):
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id, self.pending_path = tracking_uri, run_id, Path(pending_path)
        self.client = MlflowClient(tracking_uri)
        self.offline = False
        # Held for sqlite only: a server's request may wait seconds on a timeout, and an interrupt leaves no lock.
        self.hold_ctrl_c = sqlite_file(tracking_uri) is not None

    @staticmethod
    def store_errors() -> tuple:
        import requests
        from mlflow.exceptions import MlflowException

        return (MlflowException, requests.RequestException, OSError)

    def _send(self, record: dict) -> None:
        from mlflow.entities import Metric

        with ctrl_c_held() if self.hold_ctrl_c else nullcontext():
            if record["kind"] == "metrics":
                metrics = [
                    Metric(key, value, record["timestamp"], record["step"]) for key, value in record["metrics"].items()
                ]
                self.client.log_batch(self.run_id, metrics=metrics)
            else:
                self.client.log_artifact(self.run_id, record["path"], artifact_path=record["artifact_path"])

    def go_offline(self, exc: Exception, consequence: str) -> None:
        """Stop sending and say so once, on stderr."""
        if not self.offline:
            print(
                f"WARNING: MLflow store {self.tracking_uri} stopped answering ({type(exc).__name__}); {consequence}",
                file=sys.stderr,
            )
        self.offline = True

    def _record(self, record: dict) -> None:
        if not self.offline:
            try:
                self._send(record)
                return
            except self.store_errors() as exc:
                self.go_offline(
                    exc, f"training goes on and unsent records are kept in {self.pending_path} (replayed by --resume)"
                )
        with open(self.pending_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._record({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._record({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def replay_pending(self) -> int:
        """Send what an earlier, disconnected run queued; the file goes once all is sent. Returns how many records
        were sent. A queued artifact whose file is gone is skipped with a warning: it would hold the queue for good."""
        if not self.pending_path.is_file():
            return 0
        records = [json.loads(line) for line in self.pending_path.read_text().splitlines() if line.strip()]
        gone = [r["path"] for r in records if r["kind"] == "artifact" and not Path(r["path"]).exists()]
        for record in records:
            if record["kind"] != "artifact" or record["path"] not in gone:
                self._send(record)
        for path in gone:
            print(f"WARNING: {path} was queued for MLflow run {self.run_id} but is gone; not sent", file=sys.stderr)
        self.pending_path.unlink()
        return len(records) - len(gone)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def model_registered(self) -> bool:
        """Whether a model version was registered from this run (False, offline, when the store does not answer)."""
        if self.offline:
            return False
        try:
            return bool(self.client.search_model_versions(f"run_id = '{self.run_id}'"))
        except self.store_errors() as exc:
            self.go_offline(exc, f"records are kept in {self.pending_path}")
            return False

    def set_status(self, status: str) -> None:
        if not self.offline:
            try:
                self.client.update_run(self.run_id, status=status)
            except self.store_errors() as exc:
                self.go_offline(exc, f"the run's status stays as it was; records are kept in {self.pending_path}")


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The id of the named MLflow experiment, created when missing.

    A new experiment in a sqlite store keeps its artifacts in `mlruns/<name>/` beside the database
    file, not in MLflow's default `./mlruns` of whatever folder the script was started from.
    """
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    artifacts = None
    if database := sqlite_file(tracking_uri):
        folder = re.sub(r"[^\w.-]+", "_", name).strip("._") or "experiment"  # one folder, whatever the name
        artifacts = (database.resolve().parent / "mlruns" / folder).as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def fail_over_quickly() -> None:
    """Fail over in seconds, not minutes, when a server disappears mid-run."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, pending_path: Path) -> RunLogger:
    """A RunLogger for a new run with its parameters logged."""
    from mlflow.entities import Param

    fail_over_quickly()
    logger = RunLogger(tracking_uri, "", pending_path)
    run = logger.client.create_run(experiment_id(logger.client, experiment, tracking_uri), run_name=run_name)
    logger.run_id = run.info.run_id
    pending_path.unlink(missing_ok=True)  # a queue left by an earlier run belongs to that run
    logger.client.log_batch(logger.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return logger


def continue_run(tracking_uri: str, run_id: str, history: list[dict], pending_path: Path) -> RunLogger:
    """A RunLogger for a resumed run: queued records replayed, epochs of `history` the store lacks re-sent."""
    fail_over_quickly()
    logger = RunLogger(tracking_uri, run_id, pending_path)
    try:
        replayed = logger.replay_pending()
        logged = logger.logged_steps("val_loss")  # epochs finished but never sent (killed between save and log)
        for record in history:
            if record["epoch"] not in logged:
                logger.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
        logger.set_status("RUNNING")
        print(
            f"MLflow: continuing run {logger.run_id} in {logger.tracking_uri}"
            + (f" ({replayed} queued records replayed)" if replayed else "")
        )
    except logger.store_errors() as exc:
        logger.go_offline(exc, f"records are queued in {pending_path}")
    return logger


@contextmanager
def active_run(logger: RunLogger):
    """The logger's run as MLflow's active run, for the fluent log_model APIs. The tracking URI is put back
    after: set_tracking_uri also sets MLFLOW_TRACKING_URI, which later store choices in this process read."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(logger.tracking_uri)
    try:
        with mlflow.start_run(run_id=logger.run_id):
            yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset again


def log_evaluation_run(
    tracking_uri: str, experiment: str, run_name: str, tags: dict, metrics: dict, paths: list[Path]
) -> str:
    """A new MLflow run holding an evaluation or comparison, tagged with the runs it is about."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, experiment, tracking_uri), run_name=run_name)
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if np.isfinite(v)],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    for path in paths:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


class SilentLogger:
    """The MLflow logger of ranks other than 0: rank 0 logs for the whole torchrun job."""

    run_id = tracking_uri = ""
    offline = True

    def log_metrics(self, metrics: dict, step: int = 0) -> None: ...
    def log_artifact(self, path, artifact_path=None) -> None: ...
    def set_status(self, status: str) -> None: ...


def metric_histories(tracking_uri: str, run_id: str, keys: tuple[str, ...]) -> dict[str, list] | None:
    """{key: [(step, value), ...]} of a run, sorted by step; None when the run cannot be reached."""
    if not run_id or not store_reachable(tracking_uri):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def log_to_training_run(run_id: str, uri: str, paths: list[Path], metrics: dict[str, float] | None = None) -> str:
    """Attach the files to a checkpoint's MLflow run under gradcam/, and log the metrics, when its store is reached."""
    if not run_id or not uri:
        return "checkpoint names no MLflow run; files written locally only"
    if not store_reachable(uri):
        return f"MLflow store {uri} is not reachable from here; files written locally only"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return f"run {run_id} is not in {uri}; files written locally only"
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path="gradcam")
    for name, value in (metrics or {}).items():
        client.log_metric(run_id, name, value)
    logged_metrics = f", metrics {', '.join(metrics)}" if metrics else ""
    return f"logged {len(paths)} files to MLflow run {run_id} ({uri}) under gradcam/{logged_metrics}"
