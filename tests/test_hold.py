"""One job at a time on a run folder (pipeline/hold.py), with real processes: two jobs started at once, a job
refused in one line, a killed holder taken over, a crashed one that gave its hold back, and the same on S3 (a real
S3-compatible server), where a holder on another host that stops renewing its lease loses it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

# A job's hold as jobs take it (pipeline/cli.py start), in a process of its own: argv root, name, when to take it
# (epoch seconds, so that two start together), lease seconds, and what to do once it holds.
HOLDER = """
import os, sys, time
from pipeline import hold
from pipeline.config import RunConfig

root, name, start_at, lease_s, then = sys.argv[1:6]
cfg = RunConfig().with_overrides({"run.root": root, "run.name": name})
while time.time() < float(start_at):
    time.sleep(0.001)
try:
    taken = hold.take(cfg, job="test-holder", lease_s=float(lease_s))
except ValueError as e:
    print(f"refused: {e}", flush=True)
    sys.exit(3)
child = os.fork() if then == "fork" else None  # e.g. a multiprocessing worker: it outlives its killed parent
if child == 0:
    time.sleep(60)
    os._exit(0)
print(f"held {os.getpid()}" + (f" child {child}" if child else ""), flush=True)
if then in ("wait", "fork"):
    time.sleep(120)
elif then == "crash":
    with taken:
        raise RuntimeError("the job crashed")
# then == "exit": the hold is given back at exit
"""


def _holder(root, *, name="tiny", start_at=0.0, lease_s=60.0, then="wait", env=None, prefix=()):
    cmd = [*prefix, sys.executable, "-c", HOLDER, str(root), name, str(start_at), str(lease_s), then]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _first_line(proc) -> str:
    return proc.stdout.readline().strip()


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _race(root, env=None) -> tuple[list[str], list]:
    """Two holders started at the same moment; their first lines."""
    at = time.time() + 1.0
    procs = [_holder(root, start_at=at, env=env) for _ in range(2)]
    return [_first_line(p) for p in procs], procs


def test_two_jobs_started_at_once_one_holds_and_the_other_is_refused_naming_it(tmp_path):
    lines, procs = _race(tmp_path)
    try:
        held = [line for line in lines if line.startswith("held ")]
        refused = [line for line in lines if line.startswith("refused: ")]
        assert len(held) == 1 and len(refused) == 1, lines
        pid = held[0].split()[1]
        assert f"run folder {tmp_path / 'tiny'} is held by test-holder (pid {pid} on host " in refused[0], refused
        assert "since " in refused[0] and "--set run.name=" in refused[0] and f"kill {pid}" in refused[0], refused
    finally:
        _stop(*procs)


def test_a_job_on_a_held_run_folder_stops_in_one_line_and_a_killed_holder_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        pid = _first_line(holder).split()[1]
        job = subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", "configs/tiny.yaml", "--set",
                              f"run.root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert job.returncode == 2, job.stdout + job.stderr
        errors = [line for line in job.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith(f"error: run folder {tmp_path / 'tiny'} is held by "
                                                         f"test-holder (pid {pid} on host "), job.stderr
        assert sorted(os.listdir(tmp_path / "tiny")) == ["hold.json", "hold.lock"], "the refused job wrote nothing"

        holder.send_signal(signal.SIGKILL)  # a job killed holding the folder: the kernel drops its lock
        holder.wait(timeout=30)
        nxt = _holder(tmp_path, then="exit")
        out = nxt.communicate(timeout=60)[0]
        assert nxt.returncode == 0, out
        assert f"took over the hold of test-holder (pid {pid} on host " in out and "ended without releasing" in out, out
    finally:
        _stop(holder)


def test_a_child_the_killed_holder_forked_does_not_keep_the_folder(tmp_path):
    holder = _holder(tmp_path, then="fork")
    words = _first_line(holder).split()
    pid, child = words[1], int(words[3])
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # still running
        out = _holder(tmp_path, then="exit").communicate(timeout=60)[0]
        assert f"took over the hold of test-holder (pid {pid} " in out and "\nheld " in out, out
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("then", ["crash", "exit"])
def test_a_job_that_crashes_or_just_ends_gives_its_hold_back(tmp_path, then):
    first = _holder(tmp_path, then=then)
    out = first.communicate(timeout=60)[0]
    assert first.returncode == (1 if then == "crash" else 0), out
    assert not (tmp_path / "tiny" / "hold.json").exists(), "a clean release removes the holder's name"
    nxt = _holder(tmp_path, then="exit")
    out = nxt.communicate(timeout=60)[0]
    assert out.startswith("held ") and "took over" not in out, out


def test_a_process_takes_its_own_hold_again_and_keeps_it_until_the_last_release(tmp_path):
    from pipeline import hold
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.root={tmp_path}"])
    outer = hold.take(cfg, job="outer")
    try:
        with hold.take(cfg, job="a stage of the same job"):  # jobs.pipeline's stages never refuse their own job
            pass
        other = _holder(tmp_path, then="exit")
        assert other.communicate(timeout=60)[0].startswith("refused: "), "released too early"
    finally:
        outer.release()
    other = _holder(tmp_path, then="exit")
    assert other.communicate(timeout=60)[0].startswith("held ")


def test_a_run_storage_outside_the_run_folder_is_held_too(tmp_path):
    from pipeline import hold
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.root={tmp_path}", f"run.storage={tmp_path / 'shared'}"])
    assert [p[:2] for p in hold.places(cfg)] == [(str(tmp_path / "tiny"), "hold"), (str(tmp_path / "shared"), "tiny.hold")]
    inside = load_config(ROOT / "configs" / "tiny.yaml", [f"run.root={tmp_path}", f"run.storage={tmp_path / 'tiny' / 'r'}"])
    assert len(hold.places(inside)) == 1


# ---- S3 ----------------------------------------------------------------------------------------------------
def _lease(env, key):
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    try:
        return client.get_object(Bucket="runs", Key=key)["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return None


def test_on_s3_one_of_two_jobs_holds_and_a_killed_holder_on_this_host_is_taken_over_at_once(s3_server):
    root = "s3://runs/race"
    lines, procs = _race(root, env=s3_server)
    try:
        assert sorted(line.split()[0] for line in lines) == ["held", "refused:"], lines
        (pid,) = [line.split()[1] for line in lines if line.startswith("held ")]
        assert f"run folder {root}/tiny is held by test-holder (pid {pid} on host " in "".join(lines)
        os.kill(int(pid), signal.SIGKILL)  # its lease stays behind, unexpired
        assert f'"pid": {pid}' in _lease(s3_server, "race/tiny/hold.json")
        nxt = _holder(root, env=s3_server, then="exit")
        out = nxt.communicate(timeout=60)[0]
        assert f"took over the hold of test-holder (pid {pid} on host " in out and "\nheld " in out, out
        assert _lease(s3_server, "race/tiny/hold.json") is None, "a clean release deletes the lease"
    finally:
        _stop(*procs)


def test_on_s3_a_holder_on_another_host_keeps_its_lease_while_it_renews_it_and_loses_it_after(s3_server):
    """Another host: its pid means nothing here, so only the lease's age counts (by the store's clock)."""
    root = "s3://runs/lease"
    prefix = ["unshare", "--user", "--map-root-user", "--uts", "sh", "-c", 'hostname other-node && exec "$@"', "sh"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and UTS namespaces here (unshare) to run a holder under another host name")
    elsewhere, nxt = _holder(root, env=s3_server, lease_s=2.0, prefix=prefix), None
    try:
        pid = _first_line(elsewhere).split()[1]
        time.sleep(3.2)  # over its lease by more than the store clock's 1 s grain: it renews
        refused = _holder(root, env=s3_server, then="exit").communicate(timeout=60)[0]
        assert refused.startswith(f"refused: run folder {root}/tiny is held by test-holder (pid {pid} on host "
                                  "other-node"), refused
        elsewhere.send_signal(signal.SIGSTOP)  # a host that stops answering: no more renewals
        time.sleep(3.5)
        nxt = _holder(root, env=s3_server)
        assert "took over the hold of test-holder" in _first_line(nxt), "an expired lease is taken over"
        assert _first_line(nxt).startswith("held ")
        elsewhere.send_signal(signal.SIGCONT)  # it comes back: its next renewal finds the lease gone to another
        assert "this job lost its hold" in _first_line(elsewhere)
    finally:
        _stop(*[p for p in (elsewhere, nxt) if p is not None])
