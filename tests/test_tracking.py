"""A tracking server that goes down mid-run costs no metrics and never blocks training."""

import threading
import time

import pytest

import servers
from pipeline import runtime, tracking

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _as_in_a_worker(monkeypatch):
    """MLflow's fail-fast HTTP settings, which a training worker sets (runtime.worker_tracking_settings)."""
    for key, value in runtime.WORKER_TRACKING_ENV.items():
        monkeypatch.setenv(key, value)


def test_metrics_logged_during_a_server_outage_arrive_after_it_returns(tmp_path):
    from mlflow.tracking import MlflowClient

    port = servers.free_port()
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server, uri = servers.start_mlflow(tmp_path, port=port, backend=backend)
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        logger = tracking.MetricLogger(uri, run_id, retry_max_s=2.0)
        for step in (1, 2, 3):
            logger.log({"loss/total": 10.0 - step}, step)
        deadline = time.time() + 30
        while logger.pending and time.time() < deadline:
            time.sleep(0.2)
        assert logger.pending == 0

        servers.stop(server)  # the server dies mid-run
        # The sender thread is held inside its call to the dead server: logging must still return, from the
        # training thread, without calling the server itself.
        send, in_send, release, callers = logger._client.log_batch, threading.Event(), threading.Event(), []

        def held_send(*args, **kwargs):
            callers.append(threading.current_thread())
            if threading.current_thread() is logger._thread:
                in_send.set()
                release.wait()
            return send(*args, **kwargs)

        logger._client.log_batch = held_send
        logger.log({"loss/total": 6.0}, 4)
        assert in_send.wait(30), "the sender thread never tried to send"
        training = threading.Thread(target=lambda: [logger.log({"loss/total": 10.0 - s}, s) for s in (5, 6)])
        training.start()
        training.join(30)
        blocked = training.is_alive()
        release.set()
        assert not blocked, "log() waited for the sender, which was stuck on the server"
        assert set(callers) == {logger._thread}, "only the sender thread calls the server"
        time.sleep(3)
        assert logger.failures >= 1 and logger.pending == 3, "held, not dropped"

        server, uri = servers.start_mlflow(tmp_path, port=port, backend=backend)  # back, same store
        logger.log({"loss/total": 3.0}, 7)
        logger.close(timeout_s=60)
        history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss/total")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 7]
        assert logger.dropped == 0
    finally:
        servers.stop(server)


def test_the_buffer_is_bounded_and_counts_what_it_drops(tmp_path):
    port = servers.free_port()  # nothing listens here
    logger = tracking.MetricLogger(f"http://127.0.0.1:{port}", "0" * 32, max_pending=5, retry_max_s=1.0)
    for step in range(8):
        logger.log({"a": step}, step)
    time.sleep(2)
    logger.close(timeout_s=1)
    assert logger.dropped == 3 and logger.pending == 5
