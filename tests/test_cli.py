"""How a job ends when something unexpected stops it (pipeline/cli.py main_guard): one line naming the root
cause and a log file holding the traceback, the traceback on screen only with --verbose; Ray's wrappers
unwrapped; an interrupt a clean one-line stop."""

import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[distil\] (\w+) failed: (\w+): (.+) \(full traceback (in|above and in) (\S+?)(; rerun with "
                  r"--verbose to print it)?\)$")


def _damaged_mlflow_db(root: Path) -> None:
    """The embedded MLflow store cut off or overwritten: SQLAlchemy's DatabaseError, which no check expects."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mlflow.db").write_bytes(b"not a database\0" * 300)


def test_an_unexpected_exception_ends_a_job_with_one_line_and_a_log(tmp_path):
    _damaged_mlflow_db(tmp_path / "runs")
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", "configs/tiny.yaml", "--set",
                           f"run.root={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m, last
    assert m.group(1, 2, 3, 4) == ("prepare", "DatabaseError", "(sqlite3.DatabaseError) file is not a database", "in")
    log = Path(m.group(5))
    assert log.parent == tmp_path / "runs" / "tiny" / "logs" and log.name.startswith("prepare-")
    text = log.read_text()
    assert text.startswith("distil prepare failed at ") and "-m jobs.prepare --config configs/tiny.yaml" in text
    assert "Traceback (most recent call last)" in text and "sqlalchemy.exc.DatabaseError" in text


def _fail_on_a_damaged_db(path: Path):
    def body():
        _damaged_mlflow_db(path.parent)
        sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    return body


def test_verbose_prints_the_traceback_above_the_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTIL_VERBOSE", "1")
    cfg = RunConfig().with_overrides({"run.root": str(tmp_path), "run.name": "v"})
    assert cli.main_guard(_fail_on_a_damaged_db(tmp_path / "x" / "mlflow.db"), cfg, job="distill") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "sqlite3.DatabaseError: file is not a database" in err
    m = LINE.match(err[-1])
    assert m and m.group(4) == "above and in" and m.group(6) is None
    assert Path(m.group(5)).parent == tmp_path / "v" / "logs"


@pytest.mark.parametrize("root", ["s3://bucket/runs", "{tmp}/a-file/runs"])
def test_without_a_writable_local_run_folder_the_log_is_a_temporary_file(tmp_path, capsys, root):
    (tmp_path / "a-file").write_text("x")  # a regular file where a folder should be: no run folder can be made
    cfg = RunConfig().with_overrides({"run.root": root.format(tmp=tmp_path)})
    assert cli.main_guard(_fail_on_a_damaged_db(tmp_path / "db" / "mlflow.db"), cfg, job="sweep") == 1
    m = LINE.match(capsys.readouterr().err.strip())
    assert m and m.group(1, 2) == ("sweep", "DatabaseError")
    log = Path(m.group(5))
    assert log.parent == Path(tempfile.gettempdir()) and log.name.startswith("distil-sweep-")
    assert "sqlite3.DatabaseError: file is not a database" in log.read_text()
    log.unlink()


def _ray_wrapped(cause: BaseException):
    """Ray's own wrappers around ``cause``, as a Ray Train run and a Ray task return them."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    task = RayTaskError("read_shard", "Traceback (most recent call last):\n  …", cause).as_instanceof_cause()
    group = WorkerGroupError("[Rank 0]: …\n[Rank 1]: …", {1: ConnectionError("peer gone"), 0: task})
    return [task, group, ControllerError(group)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_line_names_the_root_cause_behind_rays_wrappers(tmp_path, capsys, index):
    cause = FloatingPointError("step 3: loss/ce is nan\nmore detail")
    wrapped = _ray_wrapped(cause)[index]
    assert cli.root_cause(wrapped) is cause

    def body():
        raise wrapped

    cfg = RunConfig().with_overrides({"run.root": str(tmp_path)})
    assert cli.main_guard(body, cfg, job="distill") == 1
    m = LINE.match(capsys.readouterr().err.strip())
    assert m and m.group(2, 3) == ("FloatingPointError", "step 3: loss/ce is nan")
    assert "The root cause, behind Ray's wrappers:" in Path(m.group(5)).read_text()


def test_a_value_error_from_a_ray_task_is_its_own_one_line_error(capsys):
    wrapped = _ray_wrapped(ValueError("data.sources: no file matches /nowhere/*.txt"))[0]

    def body():
        raise wrapped

    assert cli.main_guard(body, None, job="prepare") == 2
    assert capsys.readouterr().err == "error: data.sources: no file matches /nowhere/*.txt\n"


def test_an_interrupt_is_a_clean_one_line_stop(capsys):
    def body():
        signal.raise_signal(signal.SIGINT)  # Python's own handler turns it into KeyboardInterrupt

    # A process started in the background (as CI runners start jobs) inherits SIGINT ignored, and Python then
    # installs no handler of its own: set it, as an interactive terminal has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main_guard(body, None, job="pipeline") == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == ("[distil] pipeline stopped by an interrupt (Ctrl-C): run the same command "
                                       "again to resume it\n")


@pytest.mark.parametrize("sets,cpus,message", [
    ({"scaling.num_workers": 2, "scaling.cpus_per_worker": 2.0}, 4,
     "one sweep trial needs 4.01 CPUs (2 workers × 2 + 0.01 for the trial driver) but the cluster has 4"),
    ({"scaling.num_workers": 3}, 2, "the run needs 3 CPUs (3 workers × 1) but the cluster has 2"),
    ({"evaluate.workers_per_unit": 4}, 3, "one fine-tuning unit of the evaluate stage needs 4.01 CPUs "
                                          "(evaluate.workers_per_unit=4 × scaling.cpus_per_worker=1 + 0.01 for its "
                                          "driver) but the cluster has 3"),
])
def test_a_stage_that_cannot_fit_the_cluster_is_found_before_the_first_stage(sets, cpus, message):
    """The sweep's trials (a driver beside the workers) and the evaluate stage's units were measured against the
    cluster only when their stage started, after the stages before them; a unit that could not fit waited for
    workers that never start."""
    cfg = RunConfig().with_overrides({**sets, "evaluate.tasks": ["package:rotten_tomatoes"]})
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.check_cluster(cfg, cpus, sweep=True, evaluate=True)
    if "sweep" in message:  # without the sweep (--skip-sweep) the same run fits
        cli.check_cluster(cfg, cpus, sweep=False, evaluate=True)
