"""Connecting to Ray: a running cluster when one is named, else the embedded local default; and what a run prints.

A run prints its stage headers, one progress line per log step and training run (pipeline/progress.py), our
own ``[distil] ...`` notices, real errors and the summary. Ray's, DeepSpeed's, MLflow's and transformers' own
chatter is off unless ``DISTIL_VERBOSE=1`` (or ``--verbose`` on any job, which sets it). Where each kind comes
from, and the switch that quiets it:

- Ray Train's INFO lines ("Checkpoint successfully created", worker-group start-up):
  ``ray.train.RunConfig(logging_config=LoggingConfig("WARNING"))`` (pipeline/train/driver.py, :func:`train_log_level`);
  its ``Reporting training result N: TrainingReport(...)`` lines, whose logger that setting misses, by their
  logger's level in each worker (:func:`quiet_worker_logs`).
- Ray Tune's status tables and per-trial config tables: ``tune.RunConfig(verbose=0)`` (pipeline/train/sweep.py,
  :func:`tune_verbosity`); a trial's error is still printed.
- Ray's own driver logger ("Started a local Ray instance"): ``ray.init(logging_level=WARNING)``; the dashboard's
  address is printed once by us instead.
- Ray Data's INFO lines (execution plans, "Dataset ... execution finished") and its "Progress bars disabled"
  notice: ``RAY_DATA_LOG_LEVEL`` and the level of its progress logger.
- MLflow's INFO lines (system-metrics monitor, database set-up): ``MLFLOW_LOGGING_LEVEL``; its two
  warnings on every registration (no Hub model card, no licence) from ``mlflow.transformers``.
- transformers' "Loading weights" / "Writing model shards" bars: ``HF_HUB_DISABLE_PROGRESS_BARS``.
- Library deprecation notices (``FutureWarning``/``DeprecationWarning`` from torch.distributed, Ray Data):
  ``PYTHONWARNINGS`` in workers, the warnings filters in the driver.
- DeepSpeed's warnings about its own defaults ("Setting accelerator to CPU", "get learning rate from
  scheduler before it has started"): only its errors pass (:func:`quiet_worker_logs`).

Workers don't see the driver's arguments: the settings reach them as environment variables in the job's
``runtime_env`` (:func:`worker_env`), given to ``ray.init``. Ray Train's print patch stays off in both modes:
it sent each ``print`` of a worker both to stdout and to its logger, so every line reached the driver twice.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from pipeline import progress
from pipeline.config import RunSection

VERBOSE_ENV = "DISTIL_VERBOSE"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

# Settings every worker of the job gets, whatever the verbosity.
ALWAYS_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Settings that quiet the libraries' own output (see the module docstring), unless verbose.
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars of every registry download
}
# The variable `ray job submit` gives the driver: the submitted job's config, runtime_env included.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def is_verbose(environ=None) -> bool:
    """``DISTIL_VERBOSE`` as a switch: 1/true/yes/on or 0/false/no/off (unset: off). Anything else is an error."""
    value = (os.environ if environ is None else environ).get(VERBOSE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{VERBOSE_ENV}={value!r}: use 1 (show Ray's, DeepSpeed's and MLflow's own logs) or 0")


def worker_env(environ, *, verbose: bool, progress_mode: str) -> dict[str, str]:
    """The environment variables every Ray worker of this job gets (``runtime_env["env_vars"]``).

    A variable the driver's environment already sets keeps the driver's value (a user's own
    ``PYTHONWARNINGS`` wins). Variables that a submitted job's own runtime_env sets are left out: its workers
    have them already, and Ray refuses a ``ray.init`` runtime_env that sets them again.
    """
    wanted = {VERBOSE_ENV: "1" if verbose else "0", progress.PROGRESS_ENV: progress_mode, **ALWAYS_ENV,
              **({} if verbose else QUIET_ENV)}
    job = json.loads(environ[_JOB_CONFIG_ENV]) if environ.get(_JOB_CONFIG_ENV) else {}
    from_job = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: environ.get(k, v) for k, v in wanted.items() if k not in from_job}


def progress_mode(environ, *, stdout_is_tty: bool) -> str:
    """``DISTIL_PROGRESS`` if set (checked), else a bar on a terminal and lines in a pipe or a log file."""
    if environ.get(progress.PROGRESS_ENV):
        return progress.mode_from(environ)
    return "bar" if stdout_is_tty else "lines"


def configure_output(*, verbose: bool) -> dict[str, str]:
    """Set up what the driver prints, before Ray starts; returns the env for the workers (:func:`worker_env`).

    Exports the settings into the driver's own environment too (keeping any value the user set), so the
    libraries the driver imports later (MLflow) and Ray Train's controller read the same ones.
    """
    env = worker_env(os.environ, verbose=verbose, progress_mode=progress_mode(os.environ, stdout_is_tty=sys.stdout.isatty()))
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
        # Ray colours some lines whatever the output is (the "[repeated 2x across cluster]" note of its log
        # deduplication): colorama's wrapper strips ANSI codes from a stream that is not a terminal.
        import ray  # noqa: F401  (Ray ships colorama in its thirdparty_files, which importing Ray puts on sys.path)
        import colorama

        colorama.init(strip=True)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return env
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # Modules the driver imported already read their settings at import: set them directly.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    _quiet_shared_loggers()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    return env


def _quiet_shared_loggers() -> None:
    """Loggers quieted the same way in the driver and the workers."""
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled. To enable..."
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # no Hub model card / licence for a local model
    logging.getLogger("DeepSpeed").addFilter(_errors_only)  # a filter: DeepSpeed resets its level when imported


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_worker_logs(environ=None) -> None:
    """In a Ray Train worker, at its start: quiet what only a setting inside the process can (see the module
    docstring), unless the driver said ``DISTIL_VERBOSE=1``."""
    if is_verbose(environ):
        return
    _quiet_shared_loggers()
    from ray.train.v2._internal.execution import context

    # "Reporting training result N: TrainingReport(...)": Ray 2.60 names this logger by its file path, not
    # "ray.train.*", so LoggingConfig(log_level) (pipeline/train/driver.py) misses it.
    context.logger.setLevel(logging.WARNING)


# MLflow's HTTP retries and timeout for the metric logger of a training worker: fail fast on each try, because
# the logger's thread retries with its own backoff and never blocks training (pipeline/tracking.py MetricLogger);
# MLflow's default backs off for minutes. Read by MLflow from the environment at each request, so they are set
# for the worker process, once, here, where a reader looks for what a worker sets; a user's own values win.
WORKER_TRACKING_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def worker_tracking_settings(environ=None) -> None:
    """Set :data:`WORKER_TRACKING_ENV` in a training worker's environment (keeping values already set)."""
    environ = os.environ if environ is None else environ
    for key, value in WORKER_TRACKING_ENV.items():
        environ.setdefault(key, value)


OUR_LINES = r"^\[distil\] "  # what our own lines start with (progress, notices)


def keep_our_lines_whole() -> None:
    """Never let the driver's log deduplication merge our lines.

    Ray merges lines of different processes that differ only in words holding digits, printing the latest as
    "... [repeated 2x across cluster]": two sweep trials' progress lines (or two ranks' notices) are such lines,
    so a trial's line would come late, under the other trial's process, or not at all. Ray's
    ``RAY_DEDUP_LOGS_ALLOW_REGEX`` lets matching lines through, but it is read when Ray is imported, before any
    job code runs: set the same pattern on the driver's deduplicators (keeping a user's own pattern).
    """
    import re

    from ray._private import ray_logging

    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        pattern = dedup.allow_re.pattern if dedup.allow_re is not None else None
        if pattern is None or OUR_LINES not in pattern:
            dedup.allow_re = re.compile(OUR_LINES if pattern is None else f"{pattern}|{OUR_LINES}")


def train_log_level() -> str:
    """Ray Train's console log level: its INFO lines (each report, each checkpoint) only when verbose."""
    return "INFO" if is_verbose() else "WARNING"


def tune_verbosity() -> int | None:
    """Ray Tune's ``verbose``: 0 (no status tables; a trial's error still prints), or Tune's default when verbose."""
    return None if is_verbose() else 0


def init_ray(cfg: RunSection, *, object_store_gib: float = 1.0, env: dict[str, str] | None = None,
             verbose: bool = False) -> dict:
    """Connect to ``run.ray_address`` or ``RAY_ADDRESS`` (set by `ray job submit`), else start a local Ray.

    ``env``: the environment variables every worker of the job gets (:func:`configure_output`). Returns the
    cluster's resources. The local Ray keeps its dashboard on: `ray job submit` and Ray Train's controller both
    need it.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    keep_our_lines_whole()
    common = {"runtime_env": {"env_vars": env} if env else None,
              "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, log_to_driver=True, **common)
    else:
        ray.init(
            num_cpus=cfg.ray_num_cpus or os.cpu_count(),
            object_store_memory=int(object_store_gib * 2**30),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **common,
        )
    resources = ray.cluster_resources()
    if not verbose:  # Ray's own start-up line is quiet: say where the dashboard is
        where = f"cluster at {address}" if address else "a local Ray"
        print(f"[distil] {where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
              f"dashboard {dashboard_url()}", flush=True)
    return resources


def dashboard_url() -> str | None:
    """The connected Ray's dashboard URL (``http://host:port``; ``RAY_OVERRIDE_DASHBOARD_URL`` wins), or what
    Ray's ``get_dashboard_url`` gives when there is no dashboard (None or ""). Raises Ray's RaySystemError
    when this process is not connected to Ray (call it after ``ray.init``)."""
    import ray._private.worker

    url = ray._private.worker.get_dashboard_url()  # the public `ray.worker` alias warns that it is private
    return f"http://{url}" if url and not url.startswith("http") else url
