"""What the driver prints: pipeline/runtime.py's output set-up, in a real process whose stdout is a pipe."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_log_file_gets_no_ansi_colour_codes_from_ray():
    # Ray colours its log deduplication's "[repeated 2x across cluster]" note whatever stdout is; in a log file
    # that is raw escape codes. The line is printed through Ray's own formatter, as its log monitor does.
    code = ("from pipeline import runtime; runtime.configure_output(verbose=False)\n"
            "from ray._private import ray_logging\n"
            "print('(RayTrainWorker pid=1) line' + ray_logging._color(' [repeated 2x across cluster]'), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(RayTrainWorker pid=1) line [repeated 2x across cluster]" in out.stdout
    assert "\x1b" not in out.stdout
