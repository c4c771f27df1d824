"""What the training stages (teacher, distill, sweep) share: run names, the loaded corpus, one fit, lineage.

A Ray Train run's name carries a hash of the settings that shape it (:func:`run_name`), so resubmitting the same
config resumes that run from its latest checkpoint, while a changed config starts a new one. Training runs
through pipeline/train/driver.py; the stage's MLflow run gets the final metrics, the checkpoint and the lineage
tags (the prepared corpus's hash, the teacher's).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from pipeline import assets, storage, tracking
from pipeline.config import RunConfig
from pipeline.corpus import loading, prepare as prepare_lib
from pipeline.records import Manifest
from pipeline.train import driver


def run_name(cfg: RunConfig, role: str, sections: tuple[str, ...], extra: str = "") -> str:
    """``<run.name>-<role>-<8 hex>``: the hash covers the config ``sections`` that shape the run, ``extra`` (the
    teacher's URI for a student) and the seed, so the same settings resume the same Ray Train run."""
    d = cfg.to_dict()
    shaping = json.dumps({k: d[k] for k in sections} | {"extra": extra, "seed": cfg.run.seed}, sort_keys=True)
    return f"{cfg.run.name}-{role}-{hashlib.sha256(shaping.encode()).hexdigest()[:8]}"


# The settings that shape the teacher's pre-training run, and a student's (distill, and each sweep trial's).
TEACHER_SECTIONS = ("data", "masking", "teacher", "teacher_optim", "deepspeed", "scaling")
# compute too: a padded vocabulary changes the checkpoint's shapes, so it must never resume a run made without it
TRAIN_SECTIONS = ("data", "masking", "optim", "deepspeed", "scaling", "checkpoint", "eval", "student", "loss", "teacher",
                  "compute")


def fit(cfg: RunConfig, manifest: Manifest, *, task: str, name: str, teacher_uri, run_id: str, t0: float):
    """Fit one TorchTrainer inside the stage's MLflow run; returns its final numeric metrics and checkpoint URI."""
    work = driver.worker_config(cfg, task=task, teacher_uri=teacher_uri, run_id=run_id,
                                replicated_data=replicated(cfg, manifest), manifest_path=manifest_path(manifest))
    result = driver.fit(cfg, name=name, datasets=datasets(cfg, manifest), work=work)
    ckpt = driver.checkpoint_uri(result.checkpoint.path, cfg.storage_path)
    metrics = numeric(result.metrics)
    log_final(metrics, time.perf_counter() - t0, ckpt)
    return metrics, ckpt


def manifest_path(manifest: Manifest) -> str:
    """The manifest.json beside the prepared shards (workers read the token counts from it)."""
    return storage.join(manifest.path, prepare_lib.MANIFEST)


def manifest_tags(manifest: Manifest) -> dict:
    """MLflow tags naming the prepared corpus: its cache key and a hash of its manifest."""
    text = json.dumps(storage.read_json(manifest_path(manifest)) or manifest.to_dict(), sort_keys=True)
    return {"data.manifest_key": manifest.key, "data.manifest_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def teacher_tags(teacher_uri: str, cache: str) -> dict:
    """MLflow tags naming the teacher: its URI and a hash of its local files ("unknown" when not a folder)."""
    local = assets.resolve_local(teacher_uri, cache)
    return {"teacher": teacher_uri, "teacher.hash": tracking.model_hash(local) if os.path.isdir(local) else "unknown"}


def lineage(cfg: RunConfig, manifest: Manifest, teacher_uri: str | None) -> dict:
    """The lineage tags of a training stage's MLflow run: the prepared corpus and, for a student, the teacher."""
    tags = manifest_tags(manifest)
    if teacher_uri:
        tags.update(teacher_tags(teacher_uri, cfg.cache_dir))
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


def replicated(cfg: RunConfig, manifest: Manifest) -> bool:
    """Whether the training split fits in ``data.materialize_max_gib`` and is replicated to every worker (else
    streamed and split between them)."""
    return loading.fits_in_memory(manifest, "train", cfg.data.materialize_max_gib)


def numeric(metrics: dict | None) -> dict:
    """The int and float entries of a Ray Train result's metrics (no bools, no text)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_final(metrics: dict, seconds: float, ckpt: str) -> None:
    """Tag a training stage's MLflow run with its final values (``final.<name>``), its duration in seconds
    (``stage_seconds``) and its checkpoint. Tags, not metrics: a metric logged once is a one-point bar chart that
    MLflow's metrics tab would show beside (and, sorted by name, before) the curves, and each curve's last value
    is already the run's metric value in the runs list."""
    import mlflow

    final = {f"final.{k}": f"{v:.6g}" for k, v in metrics.items() if "/" in k}
    mlflow.set_tags({**final, "stage_seconds": f"{seconds:.1f}", "checkpoint": ckpt})
