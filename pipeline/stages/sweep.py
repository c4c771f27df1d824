"""The sweep stage: Ray Tune over ``sweep.space`` with ASHA (pipeline/train/sweep.py); one candidate per trial
with a final checkpoint. Run by ``jobs.sweep``."""

from __future__ import annotations

import json
import os
import time

from pipeline import storage, tracking
from pipeline.config import RunConfig, checks, flatten, sweep_checks
from pipeline.records import SweepParent, TrainRecord, TrialConfig
from pipeline.stages.store import finished, read_record, write_record
from pipeline.stages.training import TRAIN_SECTIONS, datasets, lineage, manifest_path, replicated, run_name
from pipeline.train import driver, sweep as sweep_lib


def check(cfg: RunConfig) -> None:
    """Raise one ValueError listing what would stop the sweep (:func:`pipeline.config.checks.sweep_stage_problems`:
    an empty space, a grace period longer than a trial). The jobs that run the stage call it before Ray starts,
    so that the sweep does not fail after the stages before it."""
    if problems := checks.sweep_stage_problems(cfg):
        raise ValueError("the sweep cannot run:\n  - " + "\n  - ".join(problems))


def run(cfg: RunConfig, *, cluster_cpus: float) -> TrainRecord:
    """Ray Tune over ``sweep.space`` (pipeline/train/sweep.py); one candidate per trial with a final checkpoint.
    ValueError first for what :func:`check` refuses."""
    t0 = time.perf_counter()
    check(cfg)
    manifest = read_record(cfg, "prepare", needed_by="sweep").manifest
    teacher_uri = read_record(cfg, "teacher", needed_by="sweep").teacher_uri
    driver.check_batches(cfg, manifest, cfg.optim)
    for sample in sweep_checks.probe_samples(cfg):  # a sampled micro-batch size must fit the data too
        try:
            trial_cfg = cfg.with_overrides(sample)
            driver.check_batches(trial_cfg, manifest, trial_cfg.optim)
        except ValueError as e:
            raise ValueError(f"sweep.space can produce a trial with {sample}: {e}") from None
    params = {**flatten(cfg.to_dict()), "sweep.space": json.dumps(cfg.sweep.space)}
    name = run_name(cfg, "sweep", TRAIN_SECTIONS + ("sweep",), extra=teacher_uri)
    if earlier := finished(cfg, "sweep", name=name, manifest_key=manifest.key):
        return earlier
    # A restored sweep (Tuner.restore) continues in the MLflow parent run its trials already log under.
    parent_path = os.path.join(cfg.run_dir, "sweeps", f"{name}.json")
    parent = _sweep_parent(parent_path)
    resume_id = parent.run_id if parent and sweep_lib.is_restorable(cfg, name) else None
    with tracking.stage_run("sweep", params=params, tags=lineage(cfg, manifest, teacher_uri), run_id=resume_id) as run:
        storage.write_json(parent_path, SweepParent(name=name, run_id=run.info.run_id).to_dict())
        trial = TrialConfig(cfg=cfg.to_dict(), teacher_uri=teacher_uri, parent_run_id=run.info.run_id, sweep_name=name,
                            replicated_data=replicated(cfg, manifest), manifest_path=manifest_path(manifest),
                            tracking_uri=tracking.tracking_uri(cfg.run.root))
        found = sweep_lib.run(cfg, trial, datasets=datasets(cfg, manifest), cluster_cpus=cluster_cpus)
        import mlflow

        mlflow.log_metrics({"sweep/num_trials_with_checkpoint": len(found), "time/stage_s": time.perf_counter() - t0})
    return write_record(cfg, "sweep", TrainRecord(candidates=tuple(found), seconds=time.perf_counter() - t0, name=name,
                                                   manifest_key=manifest.key))


def _sweep_parent(path: str) -> SweepParent | None:
    try:
        raw = storage.read_json(path)
        return SweepParent.from_dict(raw, where=path) if raw is not None else None
    except ValueError as e:  # damaged or another version's: a new parent run (trials restored still resume)
        print(f"[distil] sweep: {e}; opening a new MLflow parent run", flush=True)
        return None
