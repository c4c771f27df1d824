"""MLflow tracking behind one narrow interface.

The convention everywhere: if ``MLFLOW_TRACKING_URI`` is set, it is used (with ``MLFLOW_S3_ENDPOINT_URL`` and
``AWS_*`` for S3 artifacts). Otherwise the embedded default applies: sqlite at ``<run.root>/mlflow.db`` with
artifacts under ``<run.root>/mlartifacts``.

The driver of each stage owns an MLflow run; it hands the run id to the Ray workers, and rank 0 logs metrics
into it through :class:`MetricLogger`. Every other rank gets :class:`NullLogger`. A tracking server that
fails mid-run never stops training: the logger holds the metrics and sends them when the server is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time

log = logging.getLogger(__name__)


def embedded_uri(root: str) -> str:
    """The embedded store's URI: sqlite at ``<root>/mlflow.db``."""
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def tracking_uri(root: str) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else :func:`embedded_uri` of ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(root)


def artifact_location(root: str, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside the embedded store, or wherever a server decides.

    Decided from the URI, not the environment: ``mlflow.set_tracking_uri`` itself exports MLFLOW_TRACKING_URI.
    """
    return "file://" + os.path.join(root, "mlartifacts") if uri == embedded_uri(root) else None


def git_sha() -> str:
    """The commit of the code checkout this module lives in (``git rev-parse HEAD``); "unknown" without git or
    outside a repository. Never raises."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_hash(path: str, *, length: int = 16) -> str:
    """sha256 of a file (the teacher's weights, a data manifest), shortened: a lineage tag."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def model_hash(model_dir: str) -> str:
    """The hash of an exported HF model's weights (model.safetensors, else pytorch_model.bin)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return file_hash(path)
    return "unknown"


def start_system_metrics(uri: str | None, run_id: str | None, node_id: str):
    """MLflow's system metrics (CPU, memory, disk, network, GPU) for this node, into the stage's run; None if off."""
    if not (uri and run_id):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, node_id=node_id, tracking_uri=uri, resume_logging=True)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 -- observability must never stop training
        log.warning("MLflow system metrics are off on %s: %s", node_id, e)
        return None


def setup(root: str, experiment: str, uri: str | None = None) -> str:
    """Point MLflow at the tracking store (``uri``, else the environment's, else the embedded one) and create the
    experiment; returns the tracking URI. Code running in Ray workers passes the driver's ``uri``: on a running
    cluster, workers do not inherit the driver's environment."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = uri or tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        try:
            found = mlflow.get_experiment_by_name(experiment)
        except (mlflow.exceptions.MlflowException, ImportError) as e:  # a store MLflow cannot use (driver, scheme)
            first = " ".join(str(e).split())[:300]
            raise ValueError(f"the MLflow tracking store {uri} cannot be used ({type(e).__name__}: {first}): use an "
                             "http(s) server or sqlite, or unset MLFLOW_TRACKING_URI for the embedded store") from None
        if found is not None and found.lifecycle_stage == "deleted":
            raise ValueError(
                f"the MLflow experiment {experiment!r} was deleted (id {found.experiment_id}, store {uri}): restore it "
                f"(`mlflow experiments restore --experiment-id {found.experiment_id}` or the UI's trash) or set "
                "tracking.experiment to another name"
            )
        if found is None:
            try:
                mlflow.create_experiment(experiment, artifact_location=artifact_location(root, uri))
            except mlflow.exceptions.MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job on another machine created it first
                    raise
    mlflow.set_experiment(experiment)
    return uri


@contextlib.contextmanager
def _store_lock(uri: str, timeout_s: float = 600.0):
    """For a sqlite store: an exclusive file lock beside the database (``<db>.lock``) while this process opens
    it, so that one process creates its tables and runs MLflow's migrations, and the others find them done.
    MLflow's ``SqlAlchemyStore`` checks for its tables and creates them without a lock: two jobs starting on one
    fresh ``mlflow.db`` otherwise both migrate it, and one fails in alembic. Nothing for a server, which creates
    its store once at its own start."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import filelock

    path = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with filelock.FileLock(f"{path}.lock", timeout=timeout_s):
            yield
    except filelock.Timeout:
        raise ValueError(f"the MLflow store {uri} stayed locked by another job for {timeout_s:.0f} s ({path}.lock): "
                         "check that no job hangs while it opens the store, then try again") from None


def _check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """One quick request to the server, so an unreachable one is one line now, not MLflow's minutes of retries."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy may refuse /health): reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"cannot reach the MLflow tracking server {uri} ({reason}): start it, fix "
                         "MLFLOW_TRACKING_URI, or unset it to use the embedded sqlite store") from None


@contextlib.contextmanager
def stage_run(stage: str, *, params: dict, tags: dict | None = None, nested: bool = False, run_id: str | None = None):
    """An MLflow run for one stage (or the continuation of ``run_id``), with flattened params and the git SHA."""
    import mlflow

    # Tags go in with the run's creation, so no run ever exists without them (find_nested_run relies on it).
    tags = {"stage": stage, "git_sha": git_sha(), **(tags or {})}
    with mlflow.start_run(run_name=None if run_id else stage, nested=nested, run_id=run_id, tags=tags) as run:
        log_params(params)
        yield run


def find_nested_run(parent_run_id: str, *, tags: dict) -> str | None:
    """The id of the oldest run nested under ``parent_run_id`` that carries ``tags``; None if there is none."""
    import mlflow

    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    filters = [f"tags.mlflow.parentRunId = '{parent_run_id}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=" and ".join(filters),
                              order_by=["attributes.start_time ASC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def log_params(params: dict) -> None:
    """Log ``params`` to the active MLflow run, each value as text cut to 6000 characters (MLflow's limit), in
    batches of 100 (``mlflow.log_params``' limit). MLflow raises MlflowException for a key this run logged
    before with another value."""
    import mlflow

    items = [(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


class NullLogger:
    """The logger of every rank but 0, and of a run without MLflow: :class:`MetricLogger`'s interface, doing
    nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Nothing: the metrics are dropped."""
        pass

    def close(self, timeout_s: float = 0.0) -> None:
        """Nothing to flush."""
        pass


_STOP = object()


class MetricLogger:
    """Rank 0's metric sink: namespaced names with units, e.g. loss/ce, throughput/tokens_per_s.

    ``log`` never blocks training: it stamps the points with their step and time and queues them; a
    background thread sends them in batches. While the tracking server is unreachable the thread keeps the
    points (up to ``max_pending``; beyond that the oldest are dropped and counted), warns once per outage,
    and retries with backoff up to ``retry_max_s``. When the server comes back, the held points are sent with
    their original steps and timestamps, so a short outage loses nothing. ``close`` flushes what it can.
    """

    BATCH = 1000  # MLflow's log_batch limit on metrics per call

    def __init__(self, uri: str, run_id: str, *, max_pending: int = 200_000, retry_max_s: float = 30.0):
        import collections
        import queue
        import threading

        from mlflow.tracking import MlflowClient

        # Each try should fail fast (this thread retries): workers set that up in
        # pipeline/runtime.py worker_tracking_settings, not here, as a side effect on the whole process.
        self._client = MlflowClient(tracking_uri=uri)
        self._run_id = run_id
        self._max_pending, self._retry_max_s = max_pending, retry_max_s
        self._queue: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()
        self.dropped = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` (name → number) at optimizer step ``step``, stamped now (ms since the epoch); never
        blocks. Raises TypeError or ValueError for a value ``float()`` does not take."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue.put([Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()])

    @property
    def pending(self) -> int:
        """Metric points not yet sent: queued and held."""
        return len(self._pending) + sum(len(item) for item in list(self._queue.queue) if item is not _STOP)

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is queued (waiting up to ``timeout_s`` for the server), then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        self._stop.set()
        self._thread.join(5.0)
        if self.pending or self.dropped:
            log.warning("MLflow: %d metric points could not be sent and %d were dropped (server unreachable)",
                        self.pending, self.dropped)

    def _take(self, block: bool) -> bool:
        """Move queued points to the pending buffer; False once close() was called and the queue is drained."""
        import queue

        alive = True
        try:
            item = self._queue.get(timeout=1.0) if block else self._queue.get_nowait()
            while True:
                if item is _STOP:
                    alive = False
                else:
                    self._pending.extend(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        while len(self._pending) > self._max_pending:
            self._pending.popleft()
            self.dropped += 1
        return alive

    def _send_loop(self) -> None:
        backoff, alive, down_since = 1.0, True, None
        while not self._stop.is_set():
            alive = self._take(block=not self._pending) and alive
            if not self._pending:
                if not alive:
                    return
                continue
            batch = [self._pending[i] for i in range(min(self.BATCH, len(self._pending)))]
            try:
                self._client.log_batch(self._run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 -- tracking must never stop training
                self.failures += 1
                if down_since is None:
                    down_since = time.time()
                    log.warning("MLflow unreachable (%s): training goes on; holding metrics and retrying", e)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self._retry_max_s)
                continue
            for _ in batch:
                self._pending.popleft()
            if down_since is not None:
                log.warning("MLflow reachable again after %.0f s: sending the held metrics", time.time() - down_since)
                down_since, backoff = None, 1.0


def make_logger(uri: str | None, run_id: str | None, *, is_rank0: bool):
    """A :class:`MetricLogger` into run ``run_id`` at ``uri`` on rank 0; a :class:`NullLogger` on other ranks or
    when either is None."""
    if not (is_rank0 and uri and run_id):
        return NullLogger()
    return MetricLogger(uri, run_id)
