"""The six stages, as the jobs run them: prepare → teacher → distill → sweep → evaluate → register.

Each stage opens its own MLflow run, does its work on Ray, and writes a small JSON record under
``<run.root>/<run.name>/stages/``; the next stage reads the records it depends on. A Ray Train run's name
carries a hash of the settings that shape it, so resubmitting the same config resumes that run from its
latest checkpoint, while a changed config starts a new one. A stage that already finished with the same
settings on the same prepared corpus, its checkpoints still in place, is skipped (`_finished`): a job
resubmitted after a crash redoes only the unfinished work and opens no second MLflow run for the rest.
Records are the typed dataclasses of pipeline/records.py; training runs through pipeline/train/driver.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from pipeline import checkpoint as checkpoint_lib, models, registry, storage, tracking
from pipeline.config import RunConfig, flatten, sweep_checks
from pipeline.corpus import loading, prepare as prepare_lib
from pipeline.records import (Candidate, EvaluateRecord, Manifest, PrepareRecord, Record, RecordError, RegisterRecord,
                              SweepParent, TeacherRecord, TrainRecord, TrialConfig)
from pipeline.train import driver

RECORDS: dict[str, type[Record]] = {"prepare": PrepareRecord, "teacher": TeacherRecord, "distill": TrainRecord,
                                    "sweep": TrainRecord, "evaluate": EvaluateRecord, "register": RegisterRecord}


def record_path(cfg: RunConfig, stage: str) -> str:
    """Where ``stage`` writes its record: ``<run.root>/<run.name>/stages/<stage>.json``."""
    return os.path.join(cfg.run_dir, "stages", f"{stage}.json")


def load_record(cfg: RunConfig, stage: str) -> Record | None:
    """The stage's record, or None when it never ran. Raises ``storage.DamagedFile`` (not JSON) and
    ``RecordError`` (another version's record), both ValueErrors naming the file."""
    path = record_path(cfg, stage)
    raw = storage.read_json(path)
    if raw is None:
        return None
    try:
        return RECORDS[stage].from_dict(raw, where=path)
    except RecordError as e:
        raise RecordError(f"{e}: delete {path} to run the {stage} stage again") from None


def read_record(cfg: RunConfig, stage: str, *, needed_by: str) -> Record:
    """The record a later stage needs; one clear ValueError when it is missing, damaged or from another version."""
    record = load_record(cfg, stage)
    if record is None:
        raise ValueError(
            f"the {needed_by} stage needs the {stage} stage's output, and {record_path(cfg, stage)} does not exist: "
            f"run `python -m jobs.{stage} --config <the same config>` first, or `python -m jobs.pipeline`"
        )
    return record


# What each training stage reads from the stages before it: checked by its job before Ray starts.
INPUTS = {"teacher": ("prepare",), "distill": ("prepare", "teacher"), "sweep": ("prepare", "teacher")}


def require_inputs(cfg: RunConfig, stage: str) -> None:
    """Raise :func:`read_record`'s one-line ValueError when a record ``stage`` needs is missing (jobs call this
    before they start Ray, so a stage run out of order costs no cluster start)."""
    for earlier in INPUTS.get(stage, ()):
        read_record(cfg, earlier, needed_by=stage)


def _write_record(cfg: RunConfig, stage: str, record: Record) -> Record:
    storage.write_json(record_path(cfg, stage), record.to_dict())
    return record


def _finished(cfg: RunConfig, stage: str, *, name: str, manifest_key: str) -> Record | None:
    """The stage's record if it finished earlier under this Ray Train/Tune name (same settings), on the same
    prepared corpus, and its checkpoints are still there; the caller then skips the stage."""
    path = record_path(cfg, stage)
    try:
        record = load_record(cfg, stage)
    except ValueError as e:  # damaged, or written by another version: the stage runs again
        print(f"[distil] {stage}: {e}; running the stage again", flush=True)
        return None
    if record is None or record.name != name or record.manifest_key != manifest_key:
        return None
    ckpts = [record.checkpoint] if isinstance(record, TeacherRecord) else [c.checkpoint for c in record.candidates]
    missing = [c for c in ckpts if _checkpoint_gone(c)]
    if missing:
        print(f"[distil] {stage}: the record {path} names checkpoints that are gone or damaged ({missing[0]}): running "
              "the stage again", flush=True)
        return None
    print(f"[distil] {stage}: finished earlier with these settings ({path}); skipped. Delete that file to run it again.", flush=True)
    return dataclasses.replace(record, skipped=True)


def _checkpoint_gone(uri: str | None) -> bool:
    try:
        return uri is None or storage.read_json(storage.join(uri, checkpoint_lib.STATE_FILE)) is None
    except storage.DamagedFile:
        return True


def _run_name(cfg: RunConfig, role: str, sections: tuple[str, ...], extra: str = "") -> str:
    d = cfg.to_dict()
    shaping = json.dumps({k: d[k] for k in sections} | {"extra": extra, "seed": cfg.run.seed}, sort_keys=True)
    return f"{cfg.run.name}-{role}-{hashlib.sha256(shaping.encode()).hexdigest()[:8]}"


# compute too: a padded vocabulary changes the checkpoint's shapes, so it must never resume a run made without it
TRAIN_SECTIONS = ("data", "masking", "optim", "deepspeed", "scaling", "checkpoint", "eval", "student", "loss", "teacher",
                  "compute")


def prepare_data(cfg: RunConfig) -> Manifest:
    """The prepared corpus's manifest: prepared now, or the cached one (no MLflow run)."""
    tokenizer_path = models.resolve_local(cfg.data.tokenizer, cfg.cache_dir)
    return prepare_lib.prepare(cfg.data, data_dir=cfg.data_dir, run_root=cfg.run.root,
                               tokenizer_path=tokenizer_path, tokenizer_name=cfg.data.tokenizer)


def prepare(cfg: RunConfig) -> PrepareRecord:
    """Stage 1: prepare the corpus (pipeline/corpus/prepare.py), or find it prepared; log its counts to MLflow."""
    t0 = time.perf_counter()
    manifest = prepare_data(cfg)
    if manifest.rows("val") < 1:  # the corpus stays cached: a rerun with more val is cheap
        raise ValueError(f"the prepared corpus has {manifest.rows('train')} training rows and no "
                         f"validation rows (data.val_fraction={cfg.data.val_fraction} put no document there), so no "
                         "val/* metric could be measured: raise data.val_fraction or add documents")
    try:
        earlier = load_record(cfg, "prepare")
    except ValueError:
        earlier = None
    if manifest.cached and earlier and earlier.manifest.key == manifest.key:
        print(f"[distil] prepare: the corpus is prepared already (cache key {manifest.key}); skipped", flush=True)
        return dataclasses.replace(earlier, skipped=True)
    with tracking.stage_run("prepare", params=flatten({"data": cfg.to_dict()["data"]})):
        import mlflow

        mlflow.log_metrics({
            **{f"data/{k}": v for k, v in manifest.counts.items()},
            **{f"data/{s}_sequences": v.num_sequences for s, v in manifest.splits.items()},
            **{f"data/{s}_tokens": v.num_tokens for s, v in manifest.splits.items()},
            "time/stage_s": time.perf_counter() - t0,
        })
        mlflow.set_tags(_manifest_tags(manifest))
    return _write_record(cfg, "prepare", PrepareRecord(manifest=manifest, seconds=time.perf_counter() - t0))


def teacher(cfg: RunConfig, *, cluster_cpus: float) -> TeacherRecord:
    """Stage 2: pre-train the teacher with MLM (``teacher.source: pretrain``), or check a pretrained one."""
    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="teacher").manifest
    if cfg.teacher.source != "pretrain":
        # A pretrained teacher: check here, at the edge, that it loads and is a supported kind.
        models.load_teacher(cfg.teacher.source, cache_root=cfg.cache_dir)
        return _write_record(cfg, "teacher", TeacherRecord(teacher_uri=cfg.teacher.source, metrics={}, seconds=0.0))
    name = _run_name(cfg, "teacher", ("data", "masking", "teacher", "teacher_optim", "deepspeed", "scaling"))
    if earlier := _finished(cfg, "teacher", name=name, manifest_key=manifest.key):
        return earlier
    driver.check_fits(cfg, cluster_cpus, streamed=not _replicated(cfg, manifest))
    driver.check_batches(cfg, manifest, cfg.teacher_optim)
    params = flatten({k: cfg.to_dict()[k] for k in ("teacher", "teacher_optim", "masking", "deepspeed", "scaling")})
    with tracking.stage_run("teacher", params=params, tags=_lineage(cfg, manifest, None)) as run:
        metrics, ckpt = _fit(cfg, manifest, task="mlm", name=name, teacher_uri=None, run_id=run.info.run_id, t0=t0)
    return _write_record(cfg, "teacher", TeacherRecord(
        teacher_uri=driver.model_uri(ckpt), checkpoint=ckpt, metrics=metrics, run_id=run.info.run_id,
        seconds=time.perf_counter() - t0, name=name, manifest_key=manifest.key))


def distill(cfg: RunConfig, *, cluster_cpus: float) -> TrainRecord:
    """Stage 3: distil a student from the teacher stage's teacher with the config's settings."""
    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="distill").manifest
    teacher_uri = read_record(cfg, "teacher", needed_by="distill").teacher_uri
    name = _run_name(cfg, "distill", TRAIN_SECTIONS, extra=teacher_uri)
    if earlier := _finished(cfg, "distill", name=name, manifest_key=manifest.key):
        return earlier
    driver.check_fits(cfg, cluster_cpus, streamed=not _replicated(cfg, manifest))
    driver.check_batches(cfg, manifest, cfg.optim)
    with tracking.stage_run("distill", params=flatten(cfg.to_dict()), tags=_lineage(cfg, manifest, teacher_uri)) as run:
        metrics, ckpt = _fit(cfg, manifest, task="distill", name=name, teacher_uri=teacher_uri, run_id=run.info.run_id, t0=t0)
    candidate = Candidate(source="distill", checkpoint=ckpt, metrics=metrics, run_id=run.info.run_id)
    return _write_record(cfg, "distill", TrainRecord(candidates=(candidate,), seconds=time.perf_counter() - t0, name=name,
                                                     manifest_key=manifest.key))


def _fit(cfg: RunConfig, manifest: Manifest, *, task: str, name: str, teacher_uri, run_id: str, t0: float):
    """Fit one TorchTrainer inside the stage's MLflow run; returns its final numeric metrics and checkpoint URI."""
    work = driver.worker_config(cfg, task=task, teacher_uri=teacher_uri, run_id=run_id,
                                replicated_data=_replicated(cfg, manifest), manifest_path=manifest_path(manifest))
    result = driver.fit(cfg, name=name, datasets=datasets(cfg, manifest), work=work)
    ckpt = driver.checkpoint_uri(result.checkpoint.path, cfg.storage_path)
    metrics = _numeric(result.metrics)
    _log_final(metrics, time.perf_counter() - t0, ckpt)
    return metrics, ckpt


def sweep(cfg: RunConfig, *, cluster_cpus: float) -> TrainRecord:
    """Stage 4: Ray Tune over ``sweep.space`` (pipeline/sweep.py); one candidate per trial with a final checkpoint."""
    from pipeline import sweep as sweep_lib

    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="sweep").manifest
    teacher_uri = read_record(cfg, "teacher", needed_by="sweep").teacher_uri
    if not cfg.sweep.space:
        raise ValueError("sweep.space is empty: declare at least one parameter, e.g. loss.temperature: {type: choice, values: [1, 2, 4]}")
    driver.check_batches(cfg, manifest, cfg.optim)
    for sample in sweep_checks.probe_samples(cfg):  # a sampled micro-batch size must fit the data too
        try:
            trial_cfg = cfg.with_overrides(sample)
            driver.check_batches(trial_cfg, manifest, trial_cfg.optim)
        except ValueError as e:
            raise ValueError(f"sweep.space can produce a trial with {sample}: {e}") from None
    params = {**flatten(cfg.to_dict()), "sweep.space": json.dumps(cfg.sweep.space)}
    name = _run_name(cfg, "sweep", TRAIN_SECTIONS + ("sweep",), extra=teacher_uri)
    if earlier := _finished(cfg, "sweep", name=name, manifest_key=manifest.key):
        return earlier
    # A restored sweep (Tuner.restore) continues in the MLflow parent run its trials already log under.
    parent_path = os.path.join(cfg.run_dir, "sweeps", f"{name}.json")
    parent = _sweep_parent(parent_path)
    resume_id = parent.run_id if parent and sweep_lib.is_restorable(cfg, name) else None
    with tracking.stage_run("sweep", params=params, tags=_lineage(cfg, manifest, teacher_uri), run_id=resume_id) as run:
        storage.write_json(parent_path, SweepParent(name=name, run_id=run.info.run_id).to_dict())
        trial = TrialConfig(cfg=cfg.to_dict(), teacher_uri=teacher_uri, parent_run_id=run.info.run_id, sweep_name=name,
                            replicated_data=_replicated(cfg, manifest), manifest_path=manifest_path(manifest),
                            tracking_uri=tracking.tracking_uri(cfg.run.root))
        found = sweep_lib.run(cfg, trial, datasets=datasets(cfg, manifest), cluster_cpus=cluster_cpus)
        import mlflow

        mlflow.log_metrics({"sweep/num_trials_with_checkpoint": len(found), "time/stage_s": time.perf_counter() - t0})
    return _write_record(cfg, "sweep", TrainRecord(candidates=tuple(found), seconds=time.perf_counter() - t0, name=name,
                                                   manifest_key=manifest.key))


def _sweep_parent(path: str) -> SweepParent | None:
    try:
        raw = storage.read_json(path)
        return SweepParent.from_dict(raw, where=path) if raw is not None else None
    except ValueError as e:  # damaged or another version's: a new parent run (trials restored still resume)
        print(f"[distil] sweep: {e}; opening a new MLflow parent run", flush=True)
        return None


def check_evaluation_tasks(cfg: RunConfig) -> None:
    """Load every ``evaluate.tasks`` entry's examples once (no Ray): a missing file or field, an unreachable dataset
    or bad labels stop a pipeline job at its start, not after training. ValueError names the task and the fix."""
    from pipeline.evaluate import stage as evaluate_lib

    evaluate_lib.load_tasks(cfg)


def plan_evaluation(cfg: RunConfig, *, model=None):
    """The evaluate stage's work, checked without Ray or MLflow: the models (the teacher and the students, or one
    ``model``, a pipeline.evaluate.units.Model, given by hand), and every task's examples loaded, or the record of
    the same evaluation finished earlier. One ValueError for bad input."""
    from pipeline.evaluate import stage as evaluate_lib

    if not cfg.evaluate.tasks:
        raise ValueError("evaluate.tasks is empty: list the downstream tasks, e.g. evaluate: {tasks: "
                         "[package:rotten_tomatoes]} (or glue:mrpc, … with Hub access or evaluate.glue_dir)")
    chosen = evaluate_lib.models_to_evaluate(cfg, given=model)
    name = evaluate_lib.stage_name(cfg, chosen)
    earlier = _optional(cfg, "evaluate")
    if earlier is not None and earlier.name == name:
        return evaluate_lib.Plan(name=name, models=chosen, data={}, earlier=earlier)
    return evaluate_lib.Plan(name=name, models=chosen, data=evaluate_lib.load_tasks(cfg))


def evaluate(cfg: RunConfig, *, cluster_cpus: float, model=None, plan=None) -> EvaluateRecord:
    """Stage 5: fine-tune (or probe) the teacher and the students on ``evaluate.tasks`` (pipeline/evaluate/);
    Tables 1 and 3. ``plan``: :func:`plan_evaluation`'s (made here when not given)."""
    from pipeline.evaluate import stage as evaluate_lib

    t0 = time.perf_counter()
    plan = plan or plan_evaluation(cfg, model=model)
    if plan.earlier is not None:
        print(f"[distil] evaluate: finished earlier with these settings ({record_path(cfg, 'evaluate')}); skipped. "
              "Delete that file to run it again.", flush=True)
        return dataclasses.replace(plan.earlier, skipped=True)
    params = {**flatten({"evaluate": cfg.to_dict()["evaluate"]}), "evaluate.models": ", ".join(m.key for m in plan.models)}
    with tracking.stage_run("evaluate", params=params):
        out = evaluate_lib.run(cfg, plan, cluster_cpus=cluster_cpus)
    return _write_record(cfg, "evaluate", EvaluateRecord(
        name=plan.name, models=[dataclasses.asdict(m) for m in plan.models], seconds=time.perf_counter() - t0, **out))


def register(cfg: RunConfig, *, stages: tuple[str, ...] = ("distill", "sweep"), candidate: Candidate | None = None) -> RegisterRecord:
    """Stage 5: register the best candidate of the given stages, or one ``candidate`` given by hand.

    Its checkpoint (or model directory) is the idempotency key; the model card carries size, latency, metrics,
    lineage and the config it was trained with.
    """
    t0 = time.perf_counter()
    evaluated = _optional(cfg, "evaluate")
    scored = _with_eval_metrics([candidate] if candidate else _candidates(cfg, stages), evaluated)
    best = scored[0] if candidate else registry.choose(scored, cfg.tracking)
    model_dir = best.model_dir or registry.local_model_dir(driver.model_uri(best.checkpoint), cfg.cache_dir)
    lineage = {"source": best.source, "checkpoint": best.checkpoint, "git_sha": tracking.git_sha()}
    teacher_model = None
    prepare_rec, teacher_rec = _optional(cfg, "prepare"), _optional(cfg, "teacher")
    if prepare_rec:
        lineage.update(_manifest_tags(prepare_rec.manifest))
    if teacher_rec:
        lineage.update(_teacher_tags(teacher_rec.teacher_uri, cfg.cache_dir))
        teacher_model = models.load_teacher(teacher_rec.teacher_uri, cache_root=cfg.cache_dir)
    import transformers

    student = transformers.AutoModelForMaskedLM.from_pretrained(model_dir)
    ckpt_config = storage.read_json(storage.join(best.checkpoint, checkpoint_lib.CONFIG_FILE)) if best.model_dir is None else None
    card = registry.model_card(name=cfg.tracking.model_name, model=student, teacher=teacher_model, metrics=best.metrics,
                               lineage=lineage, config=(ckpt_config or {}).get("config"),
                               evaluation=evaluated.markdown if evaluated else None)
    with tracking.stage_run("register", params={"chosen": best.source, "checkpoint": best.checkpoint}, tags=lineage):
        reg = registry.register(cfg.tracking, model_dir=model_dir, checkpoint=best.checkpoint, metrics=best.metrics,
                                tags=lineage, description=card)
    return _write_record(cfg, "register", RegisterRecord(**reg, chosen=best, seconds=time.perf_counter() - t0))


def _candidates(cfg: RunConfig, stages: tuple[str, ...]) -> list[Candidate]:
    candidates = [c for stage in stages if (record := load_record(cfg, stage)) for c in record.candidates]
    if not candidates:
        raise ValueError(f"no student to register: run the distill or sweep stage first (looked in {', '.join(stages)})")
    return candidates


def _with_eval_metrics(candidates: list[Candidate], evaluated: EvaluateRecord | None) -> list[Candidate]:
    """The candidates with the evaluate stage's eval/* metrics of their checkpoint added (eval/macro, …)."""
    if evaluated is None:
        return candidates
    return [dataclasses.replace(c, metrics={**c.metrics, **evaluated.metrics.get(c.checkpoint, {})}) for c in candidates]


def _optional(cfg: RunConfig, stage: str) -> Record | None:
    """An earlier stage's record for lineage: None when absent, damaged or from another version."""
    try:
        return load_record(cfg, stage)
    except ValueError:
        return None


def manifest_path(manifest: Manifest) -> str:
    """The manifest.json beside the prepared shards (workers read the token counts from it)."""
    return storage.join(manifest.path, prepare_lib.MANIFEST)


def _manifest_tags(manifest: Manifest) -> dict:
    text = json.dumps(storage.read_json(manifest_path(manifest)) or manifest.to_dict(), sort_keys=True)
    return {"data.manifest_key": manifest.key, "data.manifest_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _teacher_tags(teacher_uri: str, cache: str) -> dict:
    local = models.resolve_local(teacher_uri, cache)
    return {"teacher": teacher_uri, "teacher.hash": tracking.model_hash(local) if os.path.isdir(local) else "unknown"}


def _lineage(cfg: RunConfig, manifest: Manifest, teacher_uri: str | None) -> dict:
    tags = _manifest_tags(manifest)
    if teacher_uri:
        tags.update(_teacher_tags(teacher_uri, cfg.cache_dir))
    return tags


_LOADED: dict[tuple, dict] = {}


def datasets(cfg: RunConfig, manifest: Manifest) -> dict:
    """Load a prepared corpus once per driver and per loading settings: the pipeline job reuses it across stages.

    A streamed validation split is cut to the rows the evaluation reads at the configured sizes (the larger
    micro-batch of the teacher and the student): a sweep trial with more workers or larger micro-batches than
    the config evaluates on fewer than ``eval.max_batches`` batches per rank.
    """
    micro = max(cfg.optim.micro_batch_size, cfg.teacher_optim.micro_batch_size)
    val_rows = cfg.eval.max_batches * micro * cfg.scaling.num_workers
    key = (manifest.key, manifest.path, cfg.data.materialize_max_gib, val_rows)
    if key not in _LOADED:
        _LOADED[key] = loading.load_splits(manifest, materialize_max_gib=cfg.data.materialize_max_gib, val_rows=val_rows)
    return _LOADED[key]


def _replicated(cfg: RunConfig, manifest: Manifest) -> bool:
    return loading.fits_in_memory(manifest, "train", cfg.data.materialize_max_gib)


def _numeric(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_final(metrics: dict, seconds: float, ckpt: str) -> None:
    import mlflow

    final = {f"final/{k}": v for k, v in metrics.items() if "/" in k}
    mlflow.log_metrics({**final, "time/stage_s": seconds})
    mlflow.set_tag("checkpoint", ckpt)
