"""A job runs under `ray job submit --working-dir .` against a real head on 127.0.0.1."""

import os
import shutil
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
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the jobs must fall back to the embedded store under run.root
    port, dash = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "bin": bin_dir}
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(head, *args, timeout=600):
    cmd = [str(head["bin"] / "ray"), "job", "submit", "--address", head["address"], "--working-dir", ".", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=timeout)


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
