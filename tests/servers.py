"""Real servers for tests, each a child process on 127.0.0.1: an S3-compatible store (moto) and `mlflow server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
# Dummy credentials for the local S3-compatible server; distinctive, so that a scan for them finds only leaks.
S3_ENV = {"AWS_ACCESS_KEY_ID": "distil-test-key-id-5c1e", "AWS_SECRET_ACCESS_KEY": "distil-test-secret-9b7d4f",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node_ports() -> list[str]:
    """`ray start` flags giving a node's agents free ports: beside the session's own Ray, the defaults are taken."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def wait_http(url: str, timeout_s: float = 120, *, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until ``url`` answers; with ``proc``, fail at once (with ``log``'s tail) when that server exits first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"the server for {url} exited ({proc.returncode}) before it answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def start_s3(workdir: Path, buckets: list[str]) -> tuple[subprocess.Popen, str]:
    """moto in server mode; returns the process and its endpoint URL, with the buckets created."""
    import boto3

    port = free_port()
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/")
    s3 = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
                      region_name=S3_ENV["AWS_DEFAULT_REGION"])
    for b in buckets:
        s3.create_bucket(Bucket=b)
    return proc, endpoint


def start_mlflow(workdir: Path, *, port: int | None = None, backend: str | None = None,
                 artifacts: str | None = None, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a sqlite backend; artifacts proxied to ``artifacts`` (e.g. s3://bucket/prefix)."""
    port = port or free_port()
    backend = backend or f"sqlite:///{workdir / 'mlflow-server.db'}"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend]
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    # No background job runner (huey consumers): the tests need none, and it costs seven processes.
    proc = start(cmd, workdir / "mlflow-server.log", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health")
    return proc, uri
