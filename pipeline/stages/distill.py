"""The distill stage: distil a student from the teacher stage's teacher with the config's settings (the loop's
``distill`` task, pipeline/train/tasks/distill.py). Run by ``jobs.distill``."""

from __future__ import annotations

import time

from pipeline import tracking
from pipeline.config import RunConfig, flatten
from pipeline.records import Candidate, TrainRecord
from pipeline.stages.store import finished, read_record, write_record
from pipeline.stages.training import TRAIN_SECTIONS, fit, lineage, replicated, run_name
from pipeline.train import driver


def run(cfg: RunConfig, *, cluster_cpus: float) -> TrainRecord:
    """Distil a student from the teacher stage's teacher with the config's settings."""
    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="distill").manifest
    teacher_uri = read_record(cfg, "teacher", needed_by="distill").teacher_uri
    name = run_name(cfg, "distill", TRAIN_SECTIONS, extra=teacher_uri)
    if earlier := finished(cfg, "distill", name=name, manifest_key=manifest.key):
        return earlier
    driver.check_fits(cfg, cluster_cpus, streamed=not replicated(cfg, manifest))
    driver.check_batches(cfg, manifest, cfg.optim)
    with tracking.stage_run("distill", params=flatten(cfg.to_dict()), tags=lineage(cfg, manifest, teacher_uri)) as run:
        metrics, ckpt = fit(cfg, manifest, task="distill", name=name, teacher_uri=teacher_uri, run_id=run.info.run_id, t0=t0)
    candidate = Candidate(source="distill", checkpoint=ckpt, metrics=metrics, run_id=run.info.run_id)
    return write_record(cfg, "distill", TrainRecord(candidates=(candidate,), seconds=time.perf_counter() - t0, name=name,
                                                     manifest_key=manifest.key))
