"""Jobs that start at once on one fresh embedded MLflow store (pipeline/tracking.py setup): the sqlite database is
created and migrated once, under a file lock, and every job finds its experiment."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import sys, time
from pipeline import tracking

root, start_at = sys.argv[1], float(sys.argv[2])
import mlflow  # before the start line: every process then opens the store at the same moment
while time.time() < start_at:
    time.sleep(0.001)
tracking.setup(root, "distil-race")
print("ready", mlflow.get_experiment_by_name("distil-race").experiment_id)
"""


def test_two_jobs_starting_at_once_on_a_fresh_store_all_start(tmp_path):
    at = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", SETUP, str(tmp_path), str(at)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    failed = [err[-2000:] for p, (_, err) in zip(procs, results) if p.returncode != 0]
    assert not failed, "a job failed to open the store:\n" + "\n".join(failed)
    assert len({out.strip() for out, _ in results}) == 1, [out for out, _ in results]  # one experiment, same id
    assert (tmp_path / "mlflow.db").exists()
