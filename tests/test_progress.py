"""What a run prints: the progress line and bar (pipeline/progress.py) and the quiet/verbose switch
(pipeline/runtime.py, pipeline/cli.py). Pure functions: no Ray."""

import io
import json
import logging

import pytest
import tqdm

from pipeline import cli, progress, runtime

DISTILL = {"loss/ce": 0.023503, "loss/mlm": 7.111339, "loss/cos": 0.047005, "loss/total": 14.387205,
           "throughput/tokens_per_s": 2104.2, "time/data_s": 0.008}


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_line_shows_stage_step_total_every_loss_term_throughput_and_eta():
    line = progress.format_line(stage="distill", step=20, total=60, metrics=DISTILL, eta=40.0)
    assert line == ("[distil] distill  step 20/60 (33%) | loss 14.39 (ce 0.0235, mlm 7.111, cos 0.047) "
                    "| 2.10k tok/s | ETA 40s")


def test_the_line_at_an_evaluation_step_adds_the_held_out_loss_and_pads_the_step():
    metrics = {"loss/mlm": 9.85494, "loss/total": 9.85494, "throughput/tokens_per_s": 812.4, "val/mlm_loss": 7.2297}
    line = progress.format_line(stage="teacher", step=20, total=200, metrics=metrics, eta=None)
    assert line == "[distil] teacher  step  20/200 (10%) | loss 9.855 (mlm 9.855) | val 7.23 | 812 tok/s | ETA ?"


def test_a_line_without_loss_terms_or_throughput_still_reads():
    assert progress.format_line(stage="distill", step=60, total=60, metrics={}, eta=0.0) == \
        "[distil] distill  step 60/60 (100%) | loss ? | ETA 0s"


@pytest.mark.parametrize("step,start,elapsed,expected", [
    (20, 0, 40.0, 80.0),     # 2 s a step, 40 steps left
    (30, 20, 10.0, 30.0),    # a resumed run: the pace since it resumed, not since step 0
    (60, 0, 90.0, 0.0),      # done
    (0, 0, 5.0, None),       # no step timed yet
    (20, 20, 5.0, None),     # resumed, no step since
    (10, 0, 0.0, None),      # no time measured
])
def test_eta_is_the_remaining_steps_at_the_pace_since_this_process_started(step, start, elapsed, expected):
    assert progress.eta_s(step=step, total=60, start_step=start, elapsed_s=elapsed) == expected


@pytest.mark.parametrize("seconds,text", [
    (None, "?"), (float("nan"), "?"), (float("inf"), "?"), (0, "0s"), (59.4, "59s"), (59.6, "1m00s"),
    (61, "1m01s"), (3599, "59m59s"), (3725, "1h02m"), (90061, "25h01m"),
])
def test_durations(seconds, text):
    assert progress.format_duration(seconds) == text


@pytest.mark.parametrize("rate,text", [(0, "0 tok/s"), (999.4, "999 tok/s"), (1000, "1.00k tok/s"),
                                       (1_250_000, "1.25M tok/s"), (3.2e9, "3.20G tok/s")])
def test_rates(rate, text):
    assert progress.format_rate(rate) == text


@pytest.mark.parametrize("role,name,label", [
    ("teacher", "tiny-teacher-48ca99e5", "teacher"),
    ("student", "tiny-distill-a6471754", "distill"),
    ("student", "tiny-sweep-44cd9704-c610f_00001", "sweep trial c610f_00001"),
    ("student", "my-run-with-dashes-distill-a6471754", "distill"),   # run.name may contain dashes
    ("student", "my-teacher-run-sweep-44cd9704-c610f_00000", "sweep trial c610f_00000"),
    ("student", "TorchTrainer_2026-11-30_04-18-40", "distill"),      # not a stage's name: the role decides
    ("teacher", "ray_train_run-2026-11-30", "teacher"),
])
def test_the_stage_label_comes_from_the_run_name(role, name, label):
    assert progress.stage_label(role, name) == label


def test_the_stage_label_reads_the_names_the_stages_give(tmp_path):
    """Tie the label to the stages' own run names (pipeline/stages/training.py) (a sweep trial's TorchTrainer adds the Tune trial id)."""
    from pipeline.stages import training
    from pipeline.config import load_config

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    assert progress.stage_label("teacher", training.run_name(cfg, "teacher", ("teacher",))) == "teacher"
    assert progress.stage_label("student", training.run_name(cfg, "distill", training.TRAIN_SECTIONS)) == "distill"
    trial = training.run_name(cfg, "sweep", training.TRAIN_SECTIONS + ("sweep",)) + "-ab12c_00003"
    assert progress.stage_label("student", trial) == "sweep trial ab12c_00003"


def test_lines_mode_prints_one_line_per_update_with_the_eta_from_elapsed_time():
    lines, clock = [], Clock(100.0)
    p = progress.Progress(stage="distill", total=60, start_step=0, out=lines.append, clock=clock)
    clock.t = 120.0  # 10 steps in 20 s: 50 steps left take 100 s
    p.update(10, DISTILL)
    clock.t = 130.0  # 20 steps in 30 s: 40 left take 60 s
    p.update(20, {**DISTILL, "val/mlm_loss": 7.19})
    p.close()
    assert lines == [
        progress.format_line(stage="distill", step=10, total=60, metrics=DISTILL, eta=100.0),
        progress.format_line(stage="distill", step=20, total=60, metrics={**DISTILL, "val/mlm_loss": 7.19}, eta=60.0),
    ]
    assert lines[0].endswith("ETA 1m40s") and "val 7.19" in lines[1] and lines[1].endswith("ETA 1m00s")


def test_bar_mode_moves_the_bar_to_the_step_and_prints_no_lines():
    lines, out = [], io.StringIO()
    bar = tqdm.tqdm(total=60, file=out, unit="step")
    p = progress.Progress(stage="sweep trial ab_00001", total=60, start_step=20, bar=bar, out=lines.append)
    assert bar.n == 20  # a resumed run's bar starts where the run is
    p.update(30, DISTILL)
    # tqdm itself adds ": " between the description and the bar
    assert bar.n == 30 and bar.desc == progress.bar_description("sweep trial ab_00001", DISTILL) + ": "
    assert bar.desc == "[distil] sweep trial ab_00001 | loss 14.39 (ce 0.0235, mlm 7.111, cos 0.047) | 2.10k tok/s: "
    p.update(60, DISTILL)
    p.close()
    assert bar.n == 60 and lines == []
    assert "60/60" in out.getvalue()


def test_only_rank_0_reports_and_lines_mode_needs_no_bar():
    assert isinstance(progress.make(role="student", run_name="x-distill-0123abcd", total=5, start_step=0,
                                    is_rank0=False, mode="lines"), progress.NoProgress)
    p = progress.make(role="student", run_name="x-distill-0123abcd", total=5, start_step=0, is_rank0=True, mode="lines")
    assert isinstance(p, progress.Progress) and p.bar is None and p.stage == "distill"


def test_the_progress_mode_is_a_bar_on_a_terminal_and_lines_otherwise_unless_set():
    assert runtime.progress_mode({}, stdout_is_tty=True) == "bar"
    assert runtime.progress_mode({}, stdout_is_tty=False) == "lines"
    assert runtime.progress_mode({"DISTIL_PROGRESS": "lines"}, stdout_is_tty=True) == "lines"
    assert runtime.progress_mode({"DISTIL_PROGRESS": "bar"}, stdout_is_tty=False) == "bar"
    with pytest.raises(ValueError, match="DISTIL_PROGRESS='fancy': use one of lines, bar"):
        runtime.progress_mode({"DISTIL_PROGRESS": "fancy"}, stdout_is_tty=True)


@pytest.mark.parametrize("value,verbose", [(None, False), ("", False), ("0", False), ("false", False), ("no", False),
                                           ("1", True), ("true", True), ("YES", True), (" on ", True)])
def test_distil_verbose_is_a_switch(value, verbose):
    env = {} if value is None else {"DISTIL_VERBOSE": value}
    assert runtime.is_verbose(env) is verbose


def test_a_distil_verbose_that_is_not_a_switch_is_one_clear_error():
    with pytest.raises(ValueError, match="DISTIL_VERBOSE='maybe': use 1"):
        runtime.is_verbose({"DISTIL_VERBOSE": "maybe"})


def test_workers_get_the_quiet_settings_by_default_and_none_of_them_when_verbose():
    quiet = runtime.worker_env({}, verbose=False, progress_mode="lines")
    assert quiet == {"DISTIL_VERBOSE": "0", "DISTIL_PROGRESS": "lines", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                     "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
                     "MLFLOW_LOGGING_LEVEL": "WARNING", "RAY_DATA_LOG_LEVEL": "WARNING",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    loud = runtime.worker_env({}, verbose=True, progress_mode="bar")
    assert loud == {"DISTIL_VERBOSE": "1", "DISTIL_PROGRESS": "bar", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def test_a_users_own_setting_wins_and_a_submitted_jobs_runtime_env_is_not_set_twice():
    job = {"runtime_env": {"working_dir": "/x", "env_vars": {"DISTIL_VERBOSE": "0", "MLFLOW_LOGGING_LEVEL": "DEBUG"}}}
    environ = {"PYTHONWARNINGS": "error", "MLFLOW_LOGGING_LEVEL": "DEBUG", "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    env = runtime.worker_env(environ, verbose=False, progress_mode="lines")
    assert env["PYTHONWARNINGS"] == "error"
    # Ray refuses a ray.init runtime_env that repeats an env var of the submitted job's runtime_env.
    assert "DISTIL_VERBOSE" not in env and "MLFLOW_LOGGING_LEVEL" not in env


def test_ray_train_and_tune_are_quiet_unless_verbose(monkeypatch):
    monkeypatch.setenv("DISTIL_VERBOSE", "")
    assert runtime.train_log_level() == "WARNING" and runtime.tune_verbosity() == 0
    monkeypatch.setenv("DISTIL_VERBOSE", "1")
    assert runtime.train_log_level() == "INFO" and runtime.tune_verbosity() is None  # Tune's own default


def test_verbose_on_any_job_sets_the_one_switch_the_driver_and_workers_read(monkeypatch):
    monkeypatch.setenv("DISTIL_VERBOSE", "0")  # and restored after the test
    cli.parse("a job", ["--config", "configs/tiny.yaml"])
    assert not runtime.is_verbose()
    _, args = cli.parse("a job", ["--config", "configs/tiny.yaml", "--verbose"])
    assert args.verbose and runtime.is_verbose()


def test_a_quiet_worker_drops_ray_trains_reports_and_deepspeeds_warnings_and_keeps_errors():
    from ray.train.v2._internal.execution import context

    ds = logging.getLogger("DeepSpeed")
    warning = logging.LogRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213, "Setting accelerator to CPU", None, None)
    error = logging.LogRecord("DeepSpeed", logging.ERROR, "engine.py", 1, "a real failure", None, None)
    level = context.logger.level
    had_filter = runtime._errors_only in ds.filters  # an earlier job in this process may have quieted it already
    ds.removeFilter(runtime._errors_only)
    try:
        runtime.quiet_worker_logs({"DISTIL_VERBOSE": "1"})
        assert ds.filter(warning) and context.logger.level == level  # verbose: untouched
        runtime.quiet_worker_logs({})
        assert not ds.filter(warning) and ds.filter(error)
        # "Reporting training result N: TrainingReport(...)" is an INFO record of this logger
        assert context.logger.level == logging.WARNING
    finally:
        ds.removeFilter(runtime._errors_only)
        if had_filter:
            ds.addFilter(runtime._errors_only)
        context.logger.setLevel(level)


def test_a_sweep_trial_ends_with_one_line_saying_how_it_ended():
    assert progress.format_trial_end(trial_id="0106f_00000", step=60, total=60, metric="val/mlm_loss", value=7.18493) == \
        "[distil] sweep trial 0106f_00000 finished at step 60/60 | val/mlm_loss 7.185"
    assert progress.format_trial_end(trial_id="0106f_00001", step=20, total=60, metric="val/mlm_loss", value=7.2024) == \
        "[distil] sweep trial 0106f_00001 stopped early by the scheduler at step 20/60 | val/mlm_loss 7.202"
    assert progress.format_trial_end(trial_id="x_00002", step=None, total=60, metric="val/mlm_loss", value=None) == \
        "[distil] sweep trial x_00002 stopped early by the scheduler at step ?/60 | val/mlm_loss not reported"


def test_the_tune_callback_prints_the_trial_end_line(capsys):
    from types import SimpleNamespace

    from ray import tune

    callback = progress.trial_end_lines(metric="val/mlm_loss", total=60)
    assert isinstance(callback, tune.Callback)
    trial = SimpleNamespace(trial_id="ab_00001", last_result={"step": 20, "val/mlm_loss": 7.5, "loss/total": 14.0})
    callback.on_trial_complete(iteration=3, trials=[trial], trial=trial)
    assert capsys.readouterr().out == "[distil] sweep trial ab_00001 stopped early by the scheduler at step 20/60 | val/mlm_loss 7.5\n"
    swept = SimpleNamespace(trial_id="ab_00002", last_result={"step": 20, "val/mlm_loss": 7.5},
                            config={"sample": {"optim__max_steps": 20}})  # this trial's own budget
    callback.on_trial_complete(iteration=4, trials=[swept], trial=swept)
    assert capsys.readouterr().out == "[distil] sweep trial ab_00002 finished at step 20/20 | val/mlm_loss 7.5\n"


def test_the_driver_never_merges_two_trials_progress_lines():
    """Ray's log deduplication treats lines differing only in words with digits as repeats across processes;
    two sweep trials' lines are such lines. Ours must all print, each under its own process."""
    from ray._private import ray_logging

    a = progress.format_line(stage="sweep trial d1a38_00000", step=5, total=10, metrics=DISTILL, eta=20.0)
    b = progress.format_line(stage="sweep trial d1a38_00001", step=5, total=10, metrics=DISTILL, eta=21.0)
    other = "(some library) retrying in 5 s"
    dedup = ray_logging.LogDeduplicator(5, None, None, _timesource=lambda: 0.0)
    batches = lambda pid, *lines: {"ip": "1.2.3.4", "pid": pid, "lines": list(lines)}  # noqa: E731
    before = [dedup.deduplicate(batches(p, a if p == 1 else b, other)) for p in (1, 2)]
    assert [line for out in before for batch in out for line in batch["lines"]] == [a, other], \
        "Ray itself holds back the second trial's line (this test's premise)"

    saved = ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator
    try:
        ray_logging.stdout_deduplicator = dedup = ray_logging.LogDeduplicator(5, None, None, _timesource=lambda: 0.0)
        ray_logging.stderr_deduplicator = ray_logging.LogDeduplicator(5, "__never__", None)
        runtime.keep_our_lines_whole()
        runtime.keep_our_lines_whole()  # idempotent
        assert ray_logging.stderr_deduplicator.allow_re.pattern == "__never__|" + runtime.OUR_LINES
        after = [dedup.deduplicate(batches(p, a if p == 1 else b, other)) for p in (1, 2)]
    finally:
        ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator = saved
    printed = [(batch["pid"], line) for out in after for batch in out for line in batch["lines"]]
    assert printed == [(1, a), (1, other), (2, b)]  # the other line is still deduplicated


def test_a_fine_tuning_unit_of_the_evaluate_stage_is_labelled_as_such(tmp_path):
    from pipeline.config import load_config
    from pipeline.evaluate import units
    from pipeline.stages import evaluate as stage

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    model = units.Model(key="distill", source="distill", uri="/m")
    name = stage.stage_name(cfg, [model]) + "-distill-rotten_tomatoes-s0"
    assert progress.stage_label("finetune", name) == "finetune distill-rotten_tomatoes-s0"
    assert progress.stage_label("finetune", "hand-built") == "finetune"
