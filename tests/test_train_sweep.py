"""A sweep saved by an earlier layout of the code is restored by this one.

Ray Tune keeps the Tuner (its ASHA scheduler included) pickled in ``<sweep>/tuner.pkl``, with references to the
module that built it. tests/golden/tuner-saved-by-pipeline-sweep.pkl is one such file, written by a sweep of
configs/tiny.yaml before the sweep's code moved from pipeline/sweep.py to pipeline/train/sweep.py.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "tests" / "golden" / "tuner-saved-by-pipeline-sweep.pkl"

RESTORE = f"""
import math, pickle, sys
from types import SimpleNamespace
try:
    pickle.loads(open({str(SAVED)!r}, "rb").read())
    print("loaded without the alias")
except ModuleNotFoundError as e:
    print("without the alias:", e)
from pipeline.train import sweep
sweep.alias_moved_modules()
tune_config = pickle.loads(open({str(SAVED)!r}, "rb").read())["_tune_config"]
scheduler = tune_config.scheduler
scheduler.set_search_properties(tune_config.metric, tune_config.mode)  # as Tune does on restore
trial = SimpleNamespace(trial_id="t0")
scheduler.on_trial_add(None, trial)
print("a NaN result:", scheduler.on_trial_result(None, trial, {{"step": 1, scheduler._metric: math.nan}}))
"""


def test_a_sweep_saved_before_its_module_moved_restores_with_its_scheduler():
    out = subprocess.run([sys.executable, "-c", RESTORE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "without the alias: No module named 'pipeline.sweep'"  # the file does reference the old place
    assert lines[-1] == "a NaN result: STOP"  # ASHA as the old code built it, working: a NaN trial stops at once


def test_tunes_tensorboard_hint_only_where_tensorboard_is_installed(monkeypatch):
    # Tune adds its TensorBoard logger (and prints "To visualize your results with TensorBoard, run: ...") whenever
    # tensorboardX imports; this stack has tensorboardX but not the tensorboard command.
    import importlib.util
    import os

    from pipeline.train import sweep as sweep_lib

    env = sweep_lib.AUTO_LOGGERS_ENV
    monkeypatch.delenv(env, raising=False)
    with sweep_lib._tensorboard_hint_only_with_tensorboard():
        assert os.environ.get(env) == ("1" if importlib.util.find_spec("tensorboard") is None else None)
    assert env not in os.environ
    monkeypatch.setenv(env, "0")  # the user's own choice stands
    with sweep_lib._tensorboard_hint_only_with_tensorboard():
        assert os.environ[env] == "0"
