"""Ray Tune over the temperature and the α weights, with Ray's Train-V2 pattern.

Each trial is a function that builds and fits its own distributed TorchTrainer. TuneReportCallback forwards
the workers' reports to Tune, so ASHA can stop a trial early on the validation loss. Every trial runs with
the same seed, so it sees the same data order and the same masks: differences come from the hyperparameters.
A trial whose metric is not finite (NaN, ±inf) is stopped at once and is never a rung's reference
(:func:`scheduler`); the candidates come back best first, non-finite scores last.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import numbers
import sys

from pyarrow import fs as pafs

from pipeline import checkpoint, progress, registry, runtime, storage, tracking
from pipeline.config import RunConfig, checks, sweep_checks
from pipeline.records import Candidate, TrialConfig
from pipeline.train import driver

# Tune keeps the Tuner, ASHA included, pickled in <sweep>/tuner.pkl, with references to the module that made it; a
# sweep saved before a module moved is restored with the old name pointing at the new place (old name → new).
MOVED_MODULES = {"pipeline.sweep": "pipeline.train.sweep"}
KEY_SEP = "__"  # Tune flattens config keys on "/", and we keep dots out of its way too


def search_space(space: dict) -> dict:
    """``sweep.space`` ({dotted name: {type, values|low|high}}) as Tune's param space: choice, grid_search,
    uniform, loguniform; dotted names become ``__``-joined keys."""
    from ray import tune

    samplers = {
        "choice": lambda s: tune.choice(s["values"]),
        "grid": lambda s: tune.grid_search(s["values"]),
        "uniform": lambda s: tune.uniform(s["low"], s["high"]),
        "loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
    }
    return {key.replace(".", KEY_SEP): samplers[spec["type"]](spec) for key, spec in space.items()}


def overrides_from_sample(sample: dict) -> dict:
    """A trial's sampled point back as dotted config overrides (``loss__temperature`` → ``loss.temperature``)."""
    return {key.replace(KEY_SEP, "."): value for key, value in sample.items()}


def max_concurrent_trials(cfg: RunConfig, cluster_cpus: float) -> int:
    """How many trials fit at once: each needs its workers plus a sliver of CPU for its driver."""
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.sweep.trial_driver_cpus
    fits = math.floor((cluster_cpus + 1e-9) / per_trial)
    if fits < 1:
        raise ValueError(
            f"one sweep trial needs {per_trial:g} CPUs ({cfg.scaling.num_workers} workers × "
            f"{cfg.scaling.cpus_per_worker:g} + {cfg.sweep.trial_driver_cpus:g} for the trial driver) but the "
            f"cluster has {cluster_cpus:g}: lower scaling.num_workers or scaling.cpus_per_worker"
        )
    return min(fits, cfg.sweep.max_concurrent) if cfg.sweep.max_concurrent else fits


def trial_fn(config: dict, datasets: dict) -> None:
    """One trial: apply the sampled overrides, open a nested MLflow run, build and fit a TorchTrainer.

    A trial resumed by Tuner.restore continues in the nested run it opened before the driver died, as its
    TorchTrainer (same name, same storage) continues from its latest checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = TrialConfig.from_dict(config["trial"], where="the sweep's param_space")
    overrides = overrides_from_sample(config["sample"])
    cfg = RunConfig.from_dict(trial.cfg).with_overrides(overrides)
    checks.validate(cfg, check_sweep=False)  # the driver probed the space; this is the sampled point
    trial_id = ray.tune.get_context().get_trial_id()
    tracking.setup(cfg.run.root, cfg.tracking.experiment, uri=trial.tracking_uri)
    import mlflow

    with mlflow.start_run(run_id=trial.parent_run_id):
        earlier = tracking.find_nested_run(trial.parent_run_id, tags={"trial_id": trial_id})
        with tracking.stage_run(f"trial-{trial_id}", params={**overrides, "trial_id": trial_id}, nested=True,
                                tags={"trial_id": trial_id}, run_id=earlier) as run:
            work = driver.worker_config(cfg, task="distill", teacher_uri=trial.teacher_uri, run_id=run.info.run_id,
                                        replicated_data=trial.replicated_data, manifest_path=trial.manifest_path)
            result = driver.fit(cfg, name=f"{trial.sweep_name}-{trial_id}", datasets=datasets, work=work,
                                callbacks=[TuneReportCallback()])
            mlflow.set_tag("checkpoint", driver.checkpoint_uri(result.checkpoint.path, cfg.storage_path))


def run(cfg: RunConfig, trial: TrialConfig, *, datasets: dict, cluster_cpus: float) -> list:
    """Run the sweep ``trial.sweep_name`` (or restore it); returns one :class:`~pipeline.records.Candidate` per
    trial that finished with a checkpoint, best first."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    concurrency = max_concurrent_trials(cfg, cluster_cpus)
    # with_parameters puts the datasets in the object store once, for every trial.
    trainable = tune.with_resources(tune.with_parameters(trial_fn, datasets=datasets), {"CPU": cfg.sweep.trial_driver_cpus})
    name = trial.sweep_name
    param_space = {"sample": search_space(cfg.sweep.space), "trial": trial.to_dict()}
    fs = storage.pyarrow_filesystem(cfg.storage_path)
    if is_restorable(cfg, name):
        # The same sweep was started before (the driver crashed, or the job is resubmitted): finished trials keep
        # their results, unfinished and errored ones resume from their latest checkpoints.
        print(f"[distil] restoring sweep {name} from {storage.join(cfg.storage_path, name)}", flush=True)
        alias_moved_modules()
        tuner = tune.Tuner.restore(storage.join(cfg.storage_path, name), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.sweep.metric, mode=cfg.sweep.mode, num_samples=cfg.sweep.num_samples,
                scheduler=scheduler(cfg), max_concurrent_trials=concurrency,
            ),
            # verbose=0 drops Tune's status and trial tables (a trial's error still prints) unless --verbose;
            # one line says how each trial ended.
            run_config=tune.RunConfig(name=name, storage_path=cfg.storage_path, storage_filesystem=fs,
                                      verbose=runtime.tune_verbosity(),
                                      callbacks=[progress.trial_end_lines(metric=cfg.sweep.metric, total=cfg.optim.max_steps),
                                                 CSVLoggerCallback(), JsonLoggerCallback()]),
        )
    with _tensorboard_hint_only_with_tensorboard():
        results = tuner.fit()
    return candidates(results, cfg, run_ids=close_trial_runs(results, cfg, parent_run_id=trial.parent_run_id))


@contextlib.contextmanager
def _tensorboard_hint_only_with_tensorboard():
    """Tune adds its TensorBoard logger whenever tensorboardX imports (it comes with Ray's dependencies) and then
    prints "To visualize your results with TensorBoard, run: tensorboard --logdir ..." although the tensorboard
    command is not installed. Without tensorboard, Tune's automatic loggers are turned off for the fit and its CSV
    and JSON loggers are added back by hand (the same per-trial files as before, without the hint)."""
    if importlib.util.find_spec("tensorboard") is not None or os.environ.get(AUTO_LOGGERS_ENV) is not None:
        yield
        return
    os.environ[AUTO_LOGGERS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(AUTO_LOGGERS_ENV, None)


AUTO_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def close_trial_runs(results, cfg: RunConfig, *, parent_run_id: str) -> dict[str, str]:
    """End each trial's nested MLflow run as the trial ended, whatever became of the process that opened it: Tune
    ends a trial that ASHA stops (early, or at its last rung) by killing the trial's actor, which leaves the run
    RUNNING, or FAILED when the process exits. FINISHED for a trial that ran all its steps (with its ``checkpoint``
    tag), KILLED with a ``distil.stopped_early`` tag saying where for one the scheduler stopped, FAILED for one
    that raised. Returns {trial id: run id} for :func:`candidates`."""
    import mlflow

    client = mlflow.MlflowClient()
    out = {}
    for r in results:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id")
        run_id = trial_id and tracking.find_nested_run(parent_run_id, tags={"trial_id": trial_id})
        if not run_id:
            continue  # a trial that failed before its first report: Tune's own error says why
        out[trial_id] = run_id
        steps = cfg.with_overrides(overrides_from_sample(r.config["sample"])).optim.max_steps
        step = int(metrics.get("step", 0))
        status = "FAILED" if r.error else "FINISHED" if step >= steps else "KILLED"
        if status == "KILLED":
            client.set_tag(run_id, "distil.stopped_early", f"the scheduler (ASHA on {cfg.sweep.metric}) stopped it "
                                                           f"at step {step} of {steps}")
        if status == "FINISHED" and "checkpoint_path" in metrics:
            client.set_tag(run_id, "checkpoint", driver.checkpoint_uri(metrics["checkpoint_path"], cfg.storage_path))
        client.set_terminated(run_id, status)
    return out


def max_steps(cfg: RunConfig) -> int:
    """The longest trial's steps: the config's, or the largest ``optim.max_steps`` the space can sample."""
    spec = cfg.sweep.space.get("optim.max_steps")
    return max([cfg.optim.max_steps, *(int(v) for v in sweep_checks.probe_values(spec))] if spec else [cfg.optim.max_steps])


def scheduler(cfg: RunConfig):
    """ASHA (asynchronous successive halving) on ``cfg.sweep.metric``, which stops a non-finite trial at once.

    Ray 2.60's AsyncHyperBandScheduler would keep it: a rung stops a trial when ``reward < cutoff``, which is
    False for a NaN reward, so a NaN trial runs to the end; and a ±inf reward recorded in a rung turns that
    rung's percentile cutoff into −inf or NaN, after which the rung stops nothing. Here a result whose metric
    is NaN or ±inf (for either mode: a loss of −inf is not a result either) stops its trial and is kept out
    of the rungs, so the other trials are still ranked against real scores.
    """
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class FiniteASHAScheduler(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if self._metric in result and not _is_finite(result[self._metric]):
                print(f"[distil] sweep: stopping trial {trial.trial_id} at {self._time_attr} "
                      f"{result.get(self._time_attr)}: {self._metric} is {result[self._metric]}", flush=True)
                self._num_stopped += 1
                return TrialScheduler.STOP
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            if self._metric in result and not _is_finite(result[self._metric]):
                self._trial_info.pop(trial.trial_id, None)
                return
            super().on_trial_complete(tune_controller, trial, result)

    return FiniteASHAScheduler(
        time_attr="step", max_t=max_steps(cfg), grace_period=cfg.sweep.grace_period, reduction_factor=2
    )


def _is_finite(value) -> bool:
    return registry.finite_score(value) is not None


def alias_moved_modules() -> None:
    """Make each old module name of :data:`MOVED_MODULES` import as its new module (in ``sys.modules``), so that
    unpickling a sweep saved by an earlier layout finds what it references."""
    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))


def is_restorable(cfg: RunConfig, name: str) -> bool:
    """Whether Tune left an experiment named ``name`` in the run's storage (local or s3://) to restore."""
    from ray import tune

    return tune.Tuner.can_restore(storage.join(cfg.storage_path, name), storage_filesystem=storage.pyarrow_filesystem(cfg.storage_path))


def candidates(results, cfg: RunConfig, *, run_ids: dict[str, str] | None = None) -> list:
    """One registry candidate per trial that ended with a checkpoint (ASHA-stopped trials may not), best first
    by ``cfg.sweep.metric``; trials whose score is not a finite number come last (the registry never picks them).
    ``run_ids``: each trial's MLflow run ({trial id: run id}), recorded in its candidate."""
    out = []
    for r in results:
        metrics = r.metrics or {}
        if r.error or "checkpoint_path" not in metrics:
            continue
        uri = driver.checkpoint_uri(metrics["checkpoint_path"], cfg.storage_path)
        if not _has_exported_model(uri):
            # ASHA stopped it between checkpoints: its last checkpoint holds training state, not an exported
            # student (the loop exports at the final step). Its metrics stay in MLflow; it is not a candidate.
            continue
        if damage := _damage(uri):
            print(f"[distil] sweep: trial {metrics.get('trial_id', '?')} is not a candidate: its checkpoint {uri} "
                  f"is damaged ({damage})", flush=True)
            continue
        overrides = overrides_from_sample(r.config["sample"])
        out.append(Candidate(source=f"sweep trial {metrics.get('trial_id', '?')} {overrides}", checkpoint=uri,
                             metrics=_numeric_metrics(metrics), overrides=overrides,
                             run_id=(run_ids or {}).get(metrics.get("trial_id"))))
    return registry.ranked(out, cfg.sweep.metric, cfg.sweep.mode)


def _numeric_metrics(metrics: dict) -> dict[str, float]:
    """The namespaced numeric metrics (``val/…``, ``loss/…``) as plain floats: numpy scalars (np.float32 from a
    worker) count too, booleans do not."""
    return {k: float(v) for k, v in metrics.items()
            if "/" in k and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _damage(checkpoint_uri: str) -> str | None:
    filesystem = storage.pyarrow_filesystem(checkpoint_uri) or pafs.LocalFileSystem()
    return checkpoint.stored_reason(filesystem, storage.fs_path(checkpoint_uri))


def _has_exported_model(checkpoint_uri: str) -> bool:
    filesystem = storage.pyarrow_filesystem(checkpoint_uri) or pafs.LocalFileSystem()
    path = storage.fs_path(storage.join(checkpoint_uri, checkpoint.HF_DIR, "config.json"))
    return filesystem.get_file_info(path).type == pafs.FileType.File
