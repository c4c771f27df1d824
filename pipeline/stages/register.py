"""The register stage: register the best candidate of the distill and sweep stages (or one given by hand) in
MLflow's model registry, with its model card, and move the champion/challenger aliases. Run by ``jobs.register``."""

from __future__ import annotations

import dataclasses
import time

from pipeline import assets, checkpoint as checkpoint_lib, families, registry, storage, teachers, tracking
from pipeline.config import RunConfig
from pipeline.records import Candidate, EvaluateRecord, RegisterRecord
from pipeline.stages.store import load_record, optional, write_record
from pipeline.stages.training import manifest_tags, teacher_tags
from pipeline.train import driver


def run(cfg: RunConfig, *, stages: tuple[str, ...] = ("distill", "sweep"), candidate: Candidate | None = None) -> RegisterRecord:
    """Register the best candidate of the given stages, or one ``candidate`` given by hand.

    Its checkpoint (or model directory) is the idempotency key; the model card carries size, latency, metrics,
    lineage and the config it was trained with.
    """
    t0 = time.perf_counter()
    evaluated = optional(cfg, "evaluate")
    scored = with_eval_metrics([candidate] if candidate else _candidates(cfg, stages), evaluated)
    best = scored[0] if candidate else registry.choose(scored, cfg.tracking)
    model_dir = best.model_dir or registry.local_model_dir(driver.model_uri(best.checkpoint), cfg.cache_dir)
    student, tokenizer = registry.load_student(model_dir)  # refused here, before the stage's run, if it does not fit
    lineage = {"source": best.source, "checkpoint": best.checkpoint, "git_sha": tracking.git_sha()}
    teacher_model = None
    prepare_rec, teacher_rec = optional(cfg, "prepare"), optional(cfg, "teacher")
    if prepare_rec:
        lineage.update(manifest_tags(prepare_rec.manifest))
    if teacher_rec:
        lineage.update(teacher_tags(teacher_rec.teacher_uri, cfg.cache_dir))
        teacher_model = teachers.load_teacher(teacher_rec.teacher_uri, cache_root=cfg.cache_dir,
                                              num_tokens=assets.tokenizer_rows(tokenizer))  # sizes without padded rows
    ckpt_config = storage.read_json(storage.join(best.checkpoint, checkpoint_lib.CONFIG_FILE)) if best.model_dir is None else None
    card = registry.model_card(name=cfg.tracking.model_name, model=student, teacher=teacher_model, metrics=best.metrics,
                               lineage=lineage, config=(ckpt_config or {}).get("config"),
                               evaluation=evaluated.markdown if evaluated else None)
    with tracking.stage_run("register", params={"chosen": best.source, "checkpoint": best.checkpoint}, tags=lineage):
        if ckpt_config and ckpt_config.get("config"):
            import mlflow

            mlflow.log_dict(ckpt_config["config"], registry.CONFIG_ARTIFACT)
        reg = registry.register(cfg.tracking, model_dir=model_dir, checkpoint=best.checkpoint, metrics=best.metrics,
                                tags=lineage, description=card, task=families.get(cfg.teacher.family).pipeline_task)
    return write_record(cfg, "register", RegisterRecord(**reg, chosen=best, seconds=time.perf_counter() - t0))


def _candidates(cfg: RunConfig, stages: tuple[str, ...]) -> list[Candidate]:
    candidates = [c for stage in stages if (record := load_record(cfg, stage)) for c in record.candidates]
    if not candidates:
        raise ValueError(f"no student to register: run the distill or sweep stage first (looked in {', '.join(stages)})")
    return candidates


def with_eval_metrics(candidates: list[Candidate], evaluated: EvaluateRecord | None) -> list[Candidate]:
    """The candidates with the evaluate stage's eval/* metrics of their checkpoint added (eval/macro, …)."""
    if evaluated is None:
        return candidates
    return [dataclasses.replace(c, metrics={**c.metrics, **evaluated.metrics.get(c.checkpoint, {})}) for c in candidates]
