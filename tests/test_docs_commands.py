"""The commands the docs tell a new user to type, run from a shell the way the page gives them.

docs/stages.md's `ray job submit` flow: a shell that has not activated the project's environment follows the page
line by line. Three things differ from a user's machine, each for the test session's sake, never for the flow's:
the head's ports and temp dir are free ones (the session's own Ray holds the defaults); the submitted job is the
prepare stage on a few hundred documents instead of the whole pipeline (the flow is the same: the head runs the
job's `python` from the activated PATH, in an uploaded copy of the directory, with the token); and the head is
stopped by ending its processes, since `ray stop` would stop every Ray here, the session's own included.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import servers

from conftest import ROOT

pytestmark = pytest.mark.slow

SUBMIT_FLOW = [
    "source .venv/bin/activate",
    "ray get-auth-token --generate > /dev/null",
    "export RAY_AUTH_MODE=token",
    "ray start --head --dashboard-host=127.0.0.1",
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
    "python -m jobs.pipeline --config configs/tiny.yaml --set run.root=$PWD/runs",
    "ray stop",
]


def fenced_commands(page: Path, heading: str) -> list[str]:
    """The commands of the first ```bash block under ``heading``: comments dropped, continuations joined."""
    text = page.read_text()
    section = text[text.index(f"## {heading}\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    commands = (re.split(r"\s+#", line.strip())[0] for line in joined.splitlines())
    return [c for c in commands if c and not c.startswith("#")]


def test_the_submit_flow_on_the_page_is_the_one_this_test_runs():
    assert fenced_commands(ROOT / "docs" / "stages.md", "Submitting to a Ray cluster") == SUBMIT_FLOW


def _activated_env(shell_env: dict) -> dict:
    """The environment after the page's first line, in a shell whose PATH does not hold the project's Python."""
    out = subprocess.run(["bash", "-c", f"{SUBMIT_FLOW[0]} && {SUBMIT_FLOW[1]} && {SUBMIT_FLOW[2]} && env -0"],
                         cwd=ROOT, env=shell_env, capture_output=True, check=True, timeout=120).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_a_job_submitted_as_the_page_says_runs_in_the_projects_python(tmp_path, tmp_path_factory):
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the page's flow starts from `make demo`'s .venv, which this checkout does not have")
    venv_bin = str(ROOT / ".venv" / "bin")
    shell_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_AUTH_MODE", "RAY_ADDRESS",
                                                                  "MLFLOW_TRACKING_URI")}
    shell_env["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                        if p not in (venv_bin, str(Path(sys.executable).parent)))
    env = _activated_env(shell_env)
    assert env["PATH"].split(os.pathsep)[0] == venv_bin and env["RAY_AUTH_MODE"] == "token"

    port, dash = servers.free_port(), servers.free_port()
    start = SUBMIT_FLOW[3].split() + ["--block", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                                      f"--temp-dir={tmp_path_factory.mktemp('ray')}",  # short: a socket path holds at most 107 bytes
                                      f"--object-store-memory={300 * 2**20}", *servers.ray_node_ports()]
    head_log = tmp_path / "head.log"
    with head_log.open("w") as log:
        head = subprocess.Popen(start, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = tmp_path / "runs"
    submit = (SUBMIT_FLOW[4].replace(":8265", f":{dash}").replace("jobs.pipeline", "jobs.prepare")
              .replace("run.root=$PWD/runs", f"run.root={root} --set data.max_docs=300"))
    try:
        deadline = time.time() + 180
        while subprocess.run(["ray", "job", "list", "--address", f"http://127.0.0.1:{dash}"], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, f"the head did not start:\n{head_log.read_text()[-3000:]}"
            time.sleep(2)
        proc = subprocess.run(["bash", "-c", submit], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        try:
            for child in psutil.Process(head.pid).children(recursive=True):
                child.kill()
        except psutil.Error:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ModuleNotFoundError" not in out, out[-4000:]
    manifest = json.loads((root / "tiny" / "stages" / "prepare.json").read_text())["manifest"]
    assert manifest["splits"]["train"]["num_sequences"] > 0  # Ray Data and torch: the project's Python ran it
