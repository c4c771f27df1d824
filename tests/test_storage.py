"""Writers of one file at once (pipeline/storage.py): every record write is atomic whoever else writes it, and two
jobs that download one s3:// model into a shared cache keep one copy, the one already in use."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import storage

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys, time
from pipeline import storage

path, start_at, me = sys.argv[1], float(sys.argv[2]), sys.argv[3]
while time.time() < start_at:
    time.sleep(0.001)
failures = 0
for i in range(300):
    try:
        storage.write_json(path, {"writer": me, "i": i, "padding": "x" * 4000})
    except OSError as e:
        failures += 1
print(failures)
"""


def test_two_processes_writing_one_record_never_fail_and_leave_a_whole_file(tmp_path):
    path = tmp_path / "stages" / "prepare.json"
    at = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(at), name], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in "ab"]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["0", "0"], f"failed writes per writer: {outs}"
    final = json.loads(path.read_text())
    assert final["writer"] in "ab" and final["i"] == 299
    assert sorted(os.listdir(path.parent)) == ["prepare.json"], "no temporary file is left behind"


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    storage.write_json(str(path), {"v": 1})
    with pytest.raises(RuntimeError):
        with storage.replacing(str(path)) as tmp:
            Path(tmp).write_text('{"v": 2, "cut')
            raise RuntimeError("the writer died mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["record.json"]


def test_two_jobs_downloading_one_model_at_once_keep_the_copy_already_in_use(s3_server, tmp_path, monkeypatch):
    """The first download to finish is returned and read at once; the second must not replace it under its reader."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    for i in range(40):
        client.put_object(Bucket="runs", Key=f"models/student/part-{i:02d}.bin", Body=os.urandom(20_000))
    cache = tmp_path / "cache"
    cache.mkdir()
    barrier, seen, errors = threading.Barrier(2), [], []

    def job():
        try:
            barrier.wait()
            local = storage.download_dir("s3://runs/models/student", str(cache))
            seen.append(os.stat(local).st_ino)  # the copy this job reads from now on
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    (folder,) = [p for p in cache.iterdir()]  # one copy, no leftover download
    assert len(os.listdir(folder)) == 41 and (folder / ".complete").read_text() == "40"
    assert seen == [os.stat(folder).st_ino] * 2, "a copy in use was replaced by the second download"
