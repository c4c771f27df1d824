"""The five stages, as the jobs run them: prepare → teacher → distill → sweep → register.

Each stage opens its own MLflow run, does its work on Ray, and writes a small JSON record under
``<run.root>/<run.name>/stages/``; the next stage reads the records it depends on. A Ray Train run's name
carries a hash of the settings that shape it, so resubmitting the same config resumes that run from its
latest checkpoint, while a changed config starts a new one. A stage that already finished with the same
settings on the same prepared corpus, its checkpoints still in place, is skipped (`_finished`): a job
resubmitted after a crash redoes only the unfinished work and opens no second MLflow run for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from pipeline import checkpoint as checkpoint_lib, models, registry, storage, tracking, trainer
from pipeline.config import RunConfig, flatten
from pipeline.corpus import loading, prepare as prepare_lib


def record_path(cfg: RunConfig, stage: str) -> str:
    return os.path.join(cfg.run_dir, "stages", f"{stage}.json")


def read_record(cfg: RunConfig, stage: str, *, needed_by: str) -> dict:
    record = storage.read_json(record_path(cfg, stage))
    if record is None:
        raise ValueError(
            f"the {needed_by} stage needs the {stage} stage's output, and {record_path(cfg, stage)} does not exist: "
            f"run `python -m jobs.{stage} --config <the same config>` first, or `python -m jobs.pipeline`"
        )
    return record


def _write_record(cfg: RunConfig, stage: str, record: dict) -> dict:
    storage.write_json(record_path(cfg, stage), record)
    return record


def _finished(cfg: RunConfig, stage: str, *, name: str, manifest: dict) -> dict | None:
    """The stage's record if it finished earlier under this Ray Train/Tune name (same settings), on the same
    prepared corpus, and its checkpoints are still there; the caller then skips the stage."""
    path = record_path(cfg, stage)
    try:
        record = storage.read_json(path)
    except storage.DamagedFile as e:
        print(f"[distil] {stage}: {e}; running the stage again", flush=True)
        return None
    if not record or record.get("name") != name or record.get("manifest_key") != manifest["key"]:
        return None
    ckpts = [record["checkpoint"]] if "checkpoint" in record else [c["checkpoint"] for c in record.get("candidates", [])]
    missing = [c for c in ckpts if _checkpoint_gone(c)]
    if missing:
        print(f"[distil] {stage}: the record {path} names checkpoints that are gone or damaged ({missing[0]}): running "
              "the stage again", flush=True)
        return None
    print(f"[distil] {stage}: finished earlier with these settings ({path}); skipped. Delete that file to run it again.", flush=True)
    return {**record, "skipped": True}


def _checkpoint_gone(uri: str) -> bool:
    try:
        return storage.read_json(storage.join(uri, checkpoint_lib.STATE_FILE)) is None
    except storage.DamagedFile:
        return True


def _run_name(cfg: RunConfig, role: str, sections: tuple[str, ...], extra: str = "") -> str:
    d = cfg.to_dict()
    shaping = json.dumps({k: d[k] for k in sections} | {"extra": extra, "seed": cfg.run.seed}, sort_keys=True)
    return f"{cfg.run.name}-{role}-{hashlib.sha256(shaping.encode()).hexdigest()[:8]}"


TRAIN_SECTIONS = ("data", "masking", "optim", "deepspeed", "scaling", "checkpoint", "eval", "student", "loss", "teacher")


def prepare_data(cfg: RunConfig) -> dict:
    """The prepared corpus's manifest: prepared now, or the cached one (no MLflow run)."""
    tokenizer_path = models.resolve_local(cfg.data.tokenizer, os.path.join(cfg.run.root, "cache"))
    return prepare_lib.prepare(cfg.data, data_dir=cfg.data_dir, run_root=cfg.run.root,
                               tokenizer_path=tokenizer_path, tokenizer_name=cfg.data.tokenizer)


def prepare(cfg: RunConfig) -> dict:
    t0 = time.perf_counter()
    manifest = prepare_data(cfg)
    if manifest["splits"]["val"]["num_sequences"] < 1:  # the corpus stays cached: a rerun with more val is cheap
        raise ValueError(f"the prepared corpus has {manifest['splits']['train']['num_sequences']} training rows and no "
                         f"validation rows (data.val_fraction={cfg.data.val_fraction} put no document there), so no "
                         "val/* metric could be measured: raise data.val_fraction or add documents")
    earlier = storage.read_json(record_path(cfg, "prepare"))
    if manifest.get("cached") and earlier and earlier["manifest"]["key"] == manifest["key"]:
        print(f"[distil] prepare: the corpus is prepared already (cache key {manifest['key']}); skipped", flush=True)
        return {**earlier, "skipped": True}
    with tracking.stage_run("prepare", params=flatten({"data": cfg.to_dict()["data"]})):
        import mlflow

        splits = manifest["splits"]
        mlflow.log_metrics({
            **{f"data/{k}": v for k, v in manifest["counts"].items()},
            **{f"data/{s}_sequences": v["num_sequences"] for s, v in splits.items()},
            **{f"data/{s}_tokens": v["num_tokens"] for s, v in splits.items()},
            "time/stage_s": time.perf_counter() - t0,
        })
        mlflow.set_tags(_manifest_tags(manifest))
    return _write_record(cfg, "prepare", {"manifest": manifest, "seconds": time.perf_counter() - t0})


def teacher(cfg: RunConfig, *, cluster_cpus: float) -> dict:
    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="teacher")["manifest"]
    if cfg.teacher.source != "pretrain":
        # A pretrained teacher: check here, at the edge, that it loads and is a supported kind.
        models.load_teacher(cfg.teacher.source, cache_root=os.path.join(cfg.run.root, "cache"))
        return _write_record(cfg, "teacher", {"teacher_uri": cfg.teacher.source, "metrics": {}, "seconds": 0.0})
    name = _run_name(cfg, "teacher", ("data", "masking", "teacher", "teacher_optim", "deepspeed", "scaling"))
    if earlier := _finished(cfg, "teacher", name=name, manifest=manifest):
        return earlier
    trainer.check_fits(cfg, cluster_cpus, streamed=not _replicated(cfg, manifest))
    trainer.check_batches(cfg, manifest, role="teacher")
    params = flatten({k: cfg.to_dict()[k] for k in ("teacher", "teacher_optim", "masking", "deepspeed", "scaling")})
    with tracking.stage_run("teacher", params=params, tags=_lineage(cfg, manifest, None)) as run:
        result, ckpt = _fit(cfg, manifest, role="teacher", name=name, teacher_uri=None, run_id=run.info.run_id, t0=t0)
    return _write_record(cfg, "teacher", {
        "teacher_uri": trainer.model_uri(ckpt), "checkpoint": ckpt, "metrics": _numeric(result.metrics),
        "run_id": run.info.run_id, "seconds": time.perf_counter() - t0, "name": name, "manifest_key": manifest["key"],
    })


def distill(cfg: RunConfig, *, cluster_cpus: float) -> dict:
    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="distill")["manifest"]
    teacher_uri = read_record(cfg, "teacher", needed_by="distill")["teacher_uri"]
    name = _run_name(cfg, "distill", TRAIN_SECTIONS, extra=teacher_uri)
    if earlier := _finished(cfg, "distill", name=name, manifest=manifest):
        return earlier
    trainer.check_fits(cfg, cluster_cpus, streamed=not _replicated(cfg, manifest))
    trainer.check_batches(cfg, manifest, role="student")
    with tracking.stage_run("distill", params=flatten(cfg.to_dict()), tags=_lineage(cfg, manifest, teacher_uri)) as run:
        result, ckpt = _fit(cfg, manifest, role="student", name=name, teacher_uri=teacher_uri, run_id=run.info.run_id, t0=t0)
    candidate = {"source": "distill", "checkpoint": ckpt, "metrics": _numeric(result.metrics), "run_id": run.info.run_id}
    return _write_record(cfg, "distill", {"candidates": [candidate], "seconds": time.perf_counter() - t0, "name": name,
                                          "manifest_key": manifest["key"]})


def _fit(cfg: RunConfig, manifest: dict, *, role: str, name: str, teacher_uri, run_id: str, t0: float):
    """Fit one TorchTrainer inside the stage's MLflow run; returns the result and its final checkpoint URI."""
    config = trainer.loop_config(cfg, role=role, teacher_uri=teacher_uri, run_id=run_id,
                                 replicated_data=_replicated(cfg, manifest), manifest_path=manifest_path(manifest))
    result = trainer.build_trainer(cfg, name=name, datasets=datasets(cfg, manifest), config=config).fit()
    ckpt = trainer.checkpoint_uri(result.checkpoint, cfg.storage_path)
    _log_final(result.metrics, time.perf_counter() - t0, ckpt)
    return result, ckpt


def sweep(cfg: RunConfig, *, cluster_cpus: float) -> dict:
    from pipeline import sweep as sweep_lib

    t0 = time.perf_counter()
    manifest = read_record(cfg, "prepare", needed_by="sweep")["manifest"]
    teacher_uri = read_record(cfg, "teacher", needed_by="sweep")["teacher_uri"]
    if not cfg.sweep.space:
        raise ValueError("sweep.space is empty: declare at least one parameter, e.g. loss.temperature: {type: choice, values: [1, 2, 4]}")
    trainer.check_batches(cfg, manifest, role="student")
    from pipeline import config_checks

    for sample in config_checks.probe_samples(cfg):  # a sampled micro-batch size must fit the data too
        try:
            trainer.check_batches(cfg.with_overrides(sample), manifest, role="student")
        except ValueError as e:
            raise ValueError(f"sweep.space can produce a trial with {sample}: {e}") from None
    params = {**flatten(cfg.to_dict()), "sweep.space": json.dumps(cfg.sweep.space)}
    name = _run_name(cfg, "sweep", TRAIN_SECTIONS + ("sweep",), extra=teacher_uri)
    if earlier := _finished(cfg, "sweep", name=name, manifest=manifest):
        return earlier
    # A restored sweep (Tuner.restore) continues in the MLflow parent run its trials already log under.
    parent_path = os.path.join(cfg.run_dir, "sweeps", f"{name}.json")
    parent = storage.read_json(parent_path)
    resume_id = parent["run_id"] if parent and sweep_lib.is_restorable(cfg, name) else None
    with tracking.stage_run("sweep", params=params, tags=_lineage(cfg, manifest, teacher_uri), run_id=resume_id) as run:
        storage.write_json(parent_path, {"name": name, "run_id": run.info.run_id})
        found = sweep_lib.run(cfg, datasets=datasets(cfg, manifest), replicated_data=_replicated(cfg, manifest), teacher_uri=teacher_uri, parent_run_id=run.info.run_id,
                              cluster_cpus=cluster_cpus, name=name, manifest_path=manifest_path(manifest))
        import mlflow

        mlflow.log_metrics({"sweep/num_trials_with_checkpoint": len(found), "time/stage_s": time.perf_counter() - t0})
    return _write_record(cfg, "sweep", {"candidates": found, "seconds": time.perf_counter() - t0, "name": name,
                                        "manifest_key": manifest["key"]})


def register(cfg: RunConfig, *, stages: tuple[str, ...] = ("distill", "sweep"), candidate: dict | None = None) -> dict:
    """Register the best candidate of the given stages, or one ``candidate`` given by hand.

    A candidate is {"source", "checkpoint", "metrics"} and optionally "model_dir" (an exported HF directory;
    by default the checkpoint's hf_model/). Its checkpoint (or directory) is the idempotency key.
    """
    t0 = time.perf_counter()
    if candidate is None:
        candidates = []
        for stage in stages:
            record = storage.read_json(record_path(cfg, stage))
            candidates.extend(record["candidates"] if record else [])
        if not candidates:
            raise ValueError(f"no student to register: run the distill or sweep stage first (looked in {', '.join(stages)})")
        best = registry.choose(candidates, cfg.tracking)
    else:
        best = candidate
    cache = os.path.join(cfg.run.root, "cache")
    model_dir = best.get("model_dir") or registry.local_model_dir(trainer.model_uri(best["checkpoint"]), cache)
    lineage = {"source": best["source"], "checkpoint": best["checkpoint"], "git_sha": tracking.git_sha()}
    teacher_model = None
    prepare_rec, teacher_rec = storage.read_json(record_path(cfg, "prepare")), storage.read_json(record_path(cfg, "teacher"))
    if prepare_rec:
        lineage.update(_manifest_tags(prepare_rec["manifest"]))
    if teacher_rec:
        lineage.update(_teacher_tags(teacher_rec["teacher_uri"], cache))
        teacher_model = models.load_teacher(teacher_rec["teacher_uri"], cache_root=cache)
    import transformers

    student = transformers.AutoModelForMaskedLM.from_pretrained(model_dir)
    ckpt_config = storage.read_json(storage.join(best["checkpoint"], checkpoint_lib.CONFIG_FILE)) if "checkpoint" in best else None
    card = registry.model_card(name=cfg.tracking.model_name, model=student, teacher=teacher_model, metrics=best["metrics"],
                               lineage=lineage, config=(ckpt_config or {}).get("config"))
    with tracking.stage_run("register", params={"chosen": best["source"], "checkpoint": best["checkpoint"]}, tags=lineage):
        reg = registry.register(cfg.tracking, model_dir=model_dir, checkpoint=best["checkpoint"], metrics=best["metrics"],
                                tags=lineage, description=card)
    return _write_record(cfg, "register", {**reg, "chosen": best, "seconds": time.perf_counter() - t0})


def manifest_path(manifest: dict) -> str:
    return storage.join(manifest["path"], prepare_lib.MANIFEST)


def _manifest_tags(manifest: dict) -> dict:
    text = json.dumps(storage.read_json(storage.join(manifest["path"], "manifest.json")) or manifest, sort_keys=True)
    return {"data.manifest_key": manifest["key"], "data.manifest_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _teacher_tags(teacher_uri: str, cache: str) -> dict:
    local = models.resolve_local(teacher_uri, cache)
    return {"teacher": teacher_uri, "teacher.hash": tracking.model_hash(local) if os.path.isdir(local) else "unknown"}


def _lineage(cfg: RunConfig, manifest: dict, teacher_uri: str | None) -> dict:
    tags = _manifest_tags(manifest)
    if teacher_uri:
        tags.update(_teacher_tags(teacher_uri, os.path.join(cfg.run.root, "cache")))
    return tags


_LOADED: dict[str, dict] = {}


def datasets(cfg: RunConfig, manifest: dict) -> dict:
    """Load a prepared corpus once per driver: the pipeline job reuses it across its stages.

    A streamed validation split is cut to the rows the evaluation reads at the configured sizes (the larger
    micro-batch of the teacher and the student): a sweep trial with more workers or larger micro-batches than
    the config evaluates on fewer than ``eval.max_batches`` batches per rank.
    """
    if manifest["key"] not in _LOADED:
        micro = max(cfg.optim.micro_batch_size, cfg.teacher_optim.micro_batch_size)
        _LOADED[manifest["key"]] = loading.load_splits(manifest, materialize_max_gib=cfg.data.materialize_max_gib,
                                                       val_rows=cfg.eval.max_batches * micro * cfg.scaling.num_workers)
    return _LOADED[manifest["key"]]


def _replicated(cfg: RunConfig, manifest: dict) -> bool:
    return loading.fits_in_memory(manifest, "train", cfg.data.materialize_max_gib)


def _numeric(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_final(metrics: dict | None, seconds: float, ckpt: str) -> None:
    import mlflow

    final = {f"final/{k}": v for k, v in _numeric(metrics).items() if "/" in k}
    mlflow.log_metrics({**final, "time/stage_s": seconds})
    mlflow.set_tag("checkpoint", ckpt)
