"""The teacher stage: pre-train a BERT teacher with MLM (``teacher.source: pretrain``, or continued from an
encoder with ``teacher.init_from``), or check a pretrained one. Run by ``jobs.teacher``."""

from __future__ import annotations

import time

from pipeline import teachers, tracking
from pipeline.config import RunConfig, flatten
from pipeline.records import TeacherRecord
from pipeline.stages.store import finished, read_record, write_record
from pipeline.stages.training import TEACHER_SECTIONS, fit, lineage, replicated, run_name
from pipeline.train import driver


def run(cfg: RunConfig, *, cluster_cpus: float) -> TeacherRecord:
    """Pre-train the teacher with MLM (``teacher.source: pretrain``), or check a pretrained one."""
    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="teacher").manifest
    if cfg.teacher.source != "pretrain":
        # A pretrained teacher: check here, at the edge, that it loads and is a supported kind.
        teachers.load_teacher(cfg.teacher.source, cache_root=cfg.cache_dir)
        return write_record(cfg, "teacher", TeacherRecord(teacher_uri=cfg.teacher.source, metrics={}, seconds=0.0))
    name = run_name(cfg, "teacher", TEACHER_SECTIONS)
    if earlier := finished(cfg, "teacher", name=name, manifest_key=manifest.key):
        return earlier
    driver.check_fits(cfg, cluster_cpus, streamed=not replicated(cfg, manifest))
    driver.check_batches(cfg, manifest, cfg.teacher_optim)
    params = flatten({k: cfg.to_dict()[k] for k in ("teacher", "teacher_optim", "masking", "deepspeed", "scaling")})
    with tracking.stage_run("teacher", params=params, tags=lineage(cfg, manifest, None)) as run:
        metrics, ckpt = fit(cfg, manifest, task="mlm", name=name, teacher_uri=None, run_id=run.info.run_id, t0=t0)
    return write_record(cfg, "teacher", TeacherRecord(
        teacher_uri=driver.model_uri(ckpt), checkpoint=ckpt, metrics=metrics, run_id=run.info.run_id,
        seconds=time.perf_counter() - t0, name=name, manifest_key=manifest.key))
