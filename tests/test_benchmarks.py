"""The GPU benchmark runs unchanged anywhere: it skips cleanly without CUDA, and its code path runs on CPU."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _run(*args: str) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_mfu.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_mfu_skips_cleanly_without_a_gpu():
    out = _run()
    assert out["skipped"] is True and "CUDA" in out["reason"]


def test_gpu_mfu_code_path_runs_on_cpu():
    out = _run("--smoke")
    (r,) = out["results"]
    assert r["tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0
