"""A job runs under `ray job submit --working-dir .` against a real head on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` as a child process, on free ports, beside any other Ray on this machine.

    It is stopped by terminating that process, not with `ray stop`, which would kill every Ray instance
    here, the test session's own included.
    """
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the jobs must fall back to the embedded store under run.root
    dash = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    info = {"env": env, "address": f"http://127.0.0.1:{dash}", "bin": bin_dir}
    try:
        _wait_for_agent(info)
        yield info
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


def _wait_for_agent(head, timeout_s=180):
    """The job API answers before its agent is up: poll until `ray job list` succeeds."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        proc = subprocess.run([str(head["bin"] / "ray"), "job", "list", "--address", head["address"]],
                              env=head["env"], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return
        time.sleep(3)
    raise TimeoutError(f"the Ray head at {head['address']} did not come up in {timeout_s} s")


def _submit(head, *args, timeout=600):
    cmd = [str(head["bin"] / "ray"), "job", "submit", "--address", head["address"], "--working-dir", ".", "--", *args]
    for _ in range(20):  # the agent may still be registering right after start
        proc = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


def test_prepare_job_succeeds_under_ray_job_submit(ray_head, tmp_path):
    root = tmp_path / "runs"
    proc = _submit(ray_head, "python", "-m", "jobs.prepare", "--config", "configs/tiny.yaml",
                   "--set", f"run.root={root}", "--set", "data.max_docs=2000", "--set", "run.name=submitted")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout.lower()
    assert (root / "submitted" / "stages" / "prepare.json").exists(), "outputs land in run.root, not the job's temp dir"
    assert (root / "mlflow.db").exists()


def test_bad_config_fails_the_job_with_one_clear_line(ray_head):
    proc = _submit(ray_head, "python", "-m", "jobs.prepare", "--config", "configs/tiny.yaml", "--set", "loss.temprature=3",
                   timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown config key 'loss.temprature'" in out
    assert "Traceback" not in out
