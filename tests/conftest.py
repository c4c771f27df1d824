"""Shared fixtures: the environment every test runs under, one in-process Ray, and one end-to-end run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Explicit, so behaviour does not depend on leftovers such as ~/.ray/auth_token (see ENVIRONMENT.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dummy credentials for the local S3-compatible server, set before Ray starts so that its workers inherit them.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests pick their tracking store themselves
os.environ.pop("RAY_ADDRESS", None)

# The end-to-end run: the demo config, shortened. Several slow tests inspect its outputs.
E2E_OVERRIDES = [
    "run.name=e2e",
    "data.max_docs=6000",
    "teacher_optim.max_steps=60",
    "optim.max_steps=12",
    "checkpoint.every_steps=6",
    "eval.every_steps=6",
    "sweep.grace_period=6",
    "tracking.model_name=e2e-student",
    "masking.smoothing=0.7",  # HF's frequency smoothing: the workers read the manifest's token counts
]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process test that needs it."""
    import ray

    ray.init(num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a sqlite backend, its artifacts on a local S3-compatible store: two real processes."""
    import servers

    work = tmp_path_factory.mktemp("servers")
    s3, endpoint = servers.start_s3(work, ["mlflow-artifacts"])
    env = {**servers.S3_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    try:
        server, uri = servers.start_mlflow(work, artifacts="s3://mlflow-artifacts/artifacts", env=env)
    except Exception:
        servers.stop(s3)
        raise
    yield {"uri": uri, "s3_endpoint": endpoint, "bucket": "mlflow-artifacts", "s3_env": env, "workdir": work}
    servers.stop(server)
    servers.stop(s3)


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory, tracking_server):
    """Run `python -m jobs.pipeline` once, as a user would, against the tracking server, and hand its run
    folder to the tests."""
    root = tmp_path_factory.mktemp("e2e")
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", "configs/tiny.yaml", "--set", f"run.root={root}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server["uri"]}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    (root / "pipeline.log").write_text(proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, f"pipeline failed ({proc.returncode}); log tail:\n{(proc.stdout + proc.stderr)[-6000:]}"
    records = {p.stem: json.loads(p.read_text()) for p in (root / "e2e" / "stages").glob("*.json")}
    return {"root": root, "stdout": proc.stdout, "records": records, "tracking_uri": tracking_server["uri"], "env": env}


@pytest.fixture(autouse=True)
def _isolate_mlflow_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; keep one test's store from leaking into the next."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
