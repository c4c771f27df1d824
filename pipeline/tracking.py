"""MLflow tracking behind one narrow interface.

The convention everywhere: if ``MLFLOW_TRACKING_URI`` is set, it is used (with ``MLFLOW_S3_ENDPOINT_URL`` and
``AWS_*`` for S3 artifacts). Otherwise the embedded default applies: sqlite at ``<run.root>/mlflow.db`` with
artifacts under ``<run.root>/mlartifacts``.

The driver of each stage owns an MLflow run; it hands the run id to the Ray workers, and rank 0 logs metrics
into it through :class:`MetricLogger`. Every other rank gets :class:`NullLogger`. A tracking server that
fails mid-run never stops training: the logger warns once and drops the metrics it could not send.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time

log = logging.getLogger(__name__)


def embedded_uri(root: str) -> str:
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def tracking_uri(root: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(root)


def artifact_location(root: str, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside the embedded store, or wherever a server decides.

    Decided from the URI, not the environment: ``mlflow.set_tracking_uri`` itself exports MLFLOW_TRACKING_URI.
    """
    return "file://" + os.path.join(root, "mlartifacts") if uri == embedded_uri(root) else None


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def setup(root: str, experiment: str) -> str:
    """Point MLflow at the tracking store and create the experiment; returns the tracking URI."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        os.makedirs(root, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_location(root, uri))
    mlflow.set_experiment(experiment)
    return uri


@contextlib.contextmanager
def stage_run(stage: str, *, params: dict, tags: dict | None = None, nested: bool = False):
    """An MLflow run for one stage, with flattened params and the git SHA as a tag."""
    import mlflow

    with mlflow.start_run(run_name=stage, nested=nested) as run:
        mlflow.set_tags({"stage": stage, "git_sha": git_sha(), **(tags or {})})
        log_params(params)
        yield run


def log_params(params: dict) -> None:
    import mlflow

    items = [(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


class MetricLogger:
    """Rank 0's metric sink: namespaced names with units, e.g. loss/ce, throughput/tokens_per_s."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        self._run_id = run_id
        self._failed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()]
        try:
            self._client.log_batch(self._run_id, metrics=batch)
        except Exception as e:  # noqa: BLE001 -- tracking must never stop training
            if not self._failed:
                log.warning("MLflow logging failed at step %d (%s); training goes on, these metrics are dropped", step, e)
            self._failed = True


def make_logger(uri: str | None, run_id: str | None, *, is_rank0: bool):
    if not (is_rank0 and uri and run_id):
        return NullLogger()
    return MetricLogger(uri, run_id)
