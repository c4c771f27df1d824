"""The evaluate stage's units of work: one (model, task, seed) each, spread over the cluster by Ray.

- **finetune** (the paper's protocol): a Ray Train run of the loop's ``finetune`` task (pipeline/train/tasks/finetune.py)
  per unit, HF's run_glue recipe; a plain Ray task drives each run, as many at once as the cluster's CPUs (or
  GPUs) hold. A unit's scores are written as a small JSON file when it ends, so a resubmitted stage redoes only
  the units that did not finish; its checkpoints are deleted then (the scores are the result).
- **probe**: a Ray task per (model, task): mean-pooled features of the frozen encoder (one forward pass per
  example), then scikit-learn's logistic regression (ridge regression for a regression task) per seed.

Examples are tokenised once per task on the driver with the run's tokenizer (every evaluated model was trained
with it), pairs truncated longest-first to ``evaluate.max_seq_len`` and padded to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

from pipeline import assets, runtime, storage
from pipeline.config import RunConfig
from pipeline.corpus import data_context
from pipeline import glue_metrics as metrics
from pipeline.evaluate.loaders import TaskData
from pipeline.train import driver


@dataclass(frozen=True)
class Model:
    """A model to evaluate: its short key (tables, unit names), what it is, and its Hugging Face folder's URI."""

    key: str  # "teacher", "distill", "trial-<id>", "given"
    source: str  # the candidate's source, or "teacher"
    uri: str  # an exported HF folder, local or s3://
    checkpoint: str = ""  # the final checkpoint it came from ("" for a teacher from the Hub or a folder)
    is_teacher: bool = False


@dataclass(frozen=True)
class Unit:
    """One fine-tuning run: a model on a task with a seed."""

    model: Model
    task: str
    seed: int
    name: str  # the Ray Train run name, and the unit's result file name
    training: str = "finetune"  # the loop's task (pipeline/train/tasks/): finetune | task_distill
    table: str = ""  # the key of its examples in the tables and data given to run_finetune; "" for ``task``
    extra: dict = field(default_factory=dict)  # more WorkerConfig.extra settings (the teacher of task_distill, …)


def tokenize(data: TaskData, tokenizer, max_seq_len: int) -> dict:
    """train/dev as pyarrow tables: input_ids, attention_mask, token_type_ids (N×max_seq_len int32), labels (int64,
    float32 for regression), index (the example's position in its split)."""
    import numpy as np
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray  # Ray Data's fixed-shape tensor column: N×T numpy batches

    out = {}
    for split, ex in (("train", data.train), ("dev", data.dev)):
        enc = tokenizer(ex.texts, ex.pairs, truncation="longest_first", max_length=max_seq_len, padding="max_length",
                        return_token_type_ids=True)
        labels = np.asarray(ex.labels, dtype=np.float32 if data.spec.regression else np.int64)
        cols = {k: ArrowTensorArray.from_numpy(np.asarray(enc[k], dtype=np.int32)) for k in ("input_ids", "attention_mask", "token_type_ids")}
        out[split] = pa.table({**cols, "labels": labels, "index": np.arange(len(ex), dtype=np.int64)})
    return out


def unit_config(cfg: RunConfig, data: TaskData, seed: int) -> RunConfig:
    """The RunConfig of one fine-tuning run: run_glue's recipe (AdamW β=(0.9, 0.999), ε=1e-8, no weight decay, no
    warmup, linear decay, clip 1.0), ``epochs`` over the training examples, one evaluation of the whole dev set at
    the end, one checkpoint."""
    e, spec = cfg.evaluate, data.spec
    world, batch = e.workers_per_unit, int(spec.batch_size or e.batch_size)
    steps_per_epoch = max(1, len(data.train) // (batch * world))
    max_steps = max(1, round((spec.epochs or e.epochs) * steps_per_epoch))
    return cfg.with_overrides({
        "run.seed": seed, "optim.max_steps": max_steps, "optim.micro_batch_size": batch, "optim.grad_accum": 1,
        "optim.lr": spec.lr or e.lr, "optim.warmup_steps": 0, "optim.weight_decay": 0.0, "optim.betas": [0.9, 0.999],
        "optim.eps": 1e-8, "optim.grad_clip": 1.0, "optim.global_batch_size": 0, "scaling.num_workers": world,
        "checkpoint.every_steps": max_steps, "checkpoint.keep": 1, "eval.every_steps": max_steps,
        "eval.max_batches": math.ceil(len(data.dev) / (batch * world)), "data.max_seq_len": max_seq_len(cfg, spec),
        "data.shuffle_buffer_rows": min(cfg.data.shuffle_buffer_rows, len(data.train)), "faults.fail_at_step": 0,
        "tracking.log_every_steps": max(1, min(cfg.tracking.log_every_steps, max_steps)),
    })


def max_seq_len(cfg: RunConfig, spec) -> int:
    """Tokens per example of a task: its own ``max_seq_len``, else ``evaluate.max_seq_len``."""
    return int(spec.max_seq_len or cfg.evaluate.max_seq_len)


def settings_hash(cfg: RunConfig) -> str:
    """8 hex digits over what shapes every unit's result: the evaluate section, the tokenizer and the seed."""
    evaluate = cfg.to_dict()["evaluate"]
    if evaluate["skip_bad_rows"] == "train":  # the default is left out: it keeps the hashes of earlier evaluations
        del evaluate["skip_bad_rows"]
    shaping = {"evaluate": evaluate, "tokenizer": cfg.data.tokenizer, "seed": cfg.run.seed,
               "precision": cfg.deepspeed.precision, "sources": cfg.data.sources, "val_fraction": cfg.data.val_fraction,
               "max_line_chars": cfg.data.max_line_chars}
    if cfg.scaling.strategy != "deepspeed":  # only when set: the default keeps the hashes of earlier evaluations
        shaping["strategy"] = cfg.scaling.strategy
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:8]


def results_dir(cfg: RunConfig, stage_name: str) -> str:
    """Where the units' result files of one evaluation (settings hash ``stage_name``) go."""
    return os.path.join(cfg.run_dir, "evaluate", stage_name)


def units_at_once(cfg: RunConfig, cluster_cpus: float) -> int:
    """How many fine-tuning units fit on the cluster at once: each takes ``evaluate.workers_per_unit`` workers of
    ``scaling.cpus_per_worker`` CPUs (and one GPU each with ``scaling.use_gpu``), plus 0.01 CPU for its driver task.
    Raises ValueError when not even one fits: its TorchTrainer would wait for workers that never start."""
    e, s = cfg.evaluate, cfg.scaling
    per_unit = e.workers_per_unit * s.cpus_per_worker + 0.01
    at_once = math.floor((cluster_cpus + 1e-9) / per_unit)
    if at_once < 1:
        raise ValueError(f"one fine-tuning unit of the evaluate stage needs {per_unit:g} CPUs (evaluate.workers_per_unit="
                         f"{e.workers_per_unit} × scaling.cpus_per_worker={s.cpus_per_worker:g} + 0.01 for its driver) but "
                         f"the cluster has {cluster_cpus:g}: lower evaluate.workers_per_unit or scaling.cpus_per_worker, or "
                         "raise run.ray_num_cpus for the local Ray")
    if s.use_gpu:  # 8 GPUs and 1 worker a unit: 8 fine-tunings at once
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < e.workers_per_unit:
            raise ValueError(f"evaluate.workers_per_unit={e.workers_per_unit} with scaling.use_gpu=true needs as many "
                             f"GPUs, and the cluster has {gpus:g}: lower evaluate.workers_per_unit or add GPUs")
        at_once = min(at_once, math.floor(gpus / e.workers_per_unit))
    return at_once


def run_finetune(cfg: RunConfig, units: list[Unit], tables: dict, data: dict[str, TaskData], *, cluster_cpus: float,
                 out_dir: str, stage: str = "evaluate") -> list[dict]:
    """Run every unit not finished before (its result file in ``out_dir``), as many at once as fit; returns every
    unit's result dict {model, task, seed, scores, seconds, steps, model_dir}: ``model_dir`` is the exported
    model of a unit whose extra settings say ``keep`` (its final checkpoint is kept), else None. ``stage`` names
    the stage in the progress lines."""
    import ray

    done = {u.name: _read_result(out_dir, u) for u in units}
    todo = [u for u in units if done[u.name] is None]
    at_once = units_at_once(cfg, cluster_cpus)
    table_refs = {key: ray.put(t) for key, t in tables.items()}  # in the object store once per task
    remote = ray.remote(num_cpus=0.01)(_finetune_unit)
    pending, running = list(todo), {}
    print(f"[distil] {stage}: {len(units)} fine-tuning units ({len(units) - len(todo)} finished earlier), "
          f"{at_once} at a time", flush=True)
    while pending or running:
        while pending and len(running) < at_once:
            u = pending.pop(0)
            key = u.table or u.task
            unit_cfg = unit_config(cfg, data[key], u.seed)
            running[remote.remote(unit_cfg.to_dict(), u, table_refs[key], _extra(data[key], u))] = u
        ready, _ = ray.wait(list(running), num_returns=1)
        u = running.pop(ready[0])
        result = ray.get(ready[0])
        storage.write_json(os.path.join(out_dir, f"{u.name}.json"), result)
        done[u.name] = result
        print(f"[distil] {stage}: {u.model.key} on {u.task} (seed {u.seed}): score {result['scores'].get('score', float('nan')):.4f} "
              f"in {result['seconds']:.0f} s", flush=True)
    return [done[u.name] for u in units]


def _extra(data: TaskData, u: Unit) -> dict:
    """The WorkerConfig.extra settings of unit ``u`` on ``data``: the model, the task and its labels, and the
    unit's own (its teacher, loss settings, keep)."""
    return {"model_uri": u.model.uri, "task": data.spec.name, "num_labels": data.num_labels,
            "regression": data.spec.regression, "metrics": list(data.spec.metrics), "num_dev": len(data.dev),
            "label_names": list(data.label_names), **u.extra}


def _read_result(out_dir: str, u: Unit) -> dict | None:
    try:
        return storage.read_json(os.path.join(out_dir, f"{u.name}.json"))
    except storage.DamagedFile:
        return None


def _finetune_unit(cfg_dict: dict, unit: Unit, tables: dict, extra: dict) -> dict:
    """In a Ray task: fit one fine-tuning run and return its dev scores; its checkpoints are deleted after."""
    import ray.data

    runtime.quiet_worker_logs()
    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(cfg_dict)
    with data_context.scoped(enable_progress_bars=False):  # the datasets keep the option (no bars in job logs)
        datasets = {"train": ray.data.from_arrow(tables["train"]), "val": ray.data.from_arrow(tables["dev"])}
    work = driver.worker_config(cfg, task=unit.training, teacher_uri=None, run_id=None, replicated_data=True, extra=extra)
    result = driver.fit(cfg, name=unit.name, datasets=datasets, work=work)
    prefix = f"eval/{extra['task']}/"
    scores = {k.removeprefix(prefix): float(v) for k, v in (result.metrics or {}).items() if k.startswith(prefix)}
    model_dir = None
    if extra.get("keep"):
        model_dir = driver.model_uri(driver.checkpoint_uri(result.checkpoint.path, cfg.storage_path))
    else:
        delete_run(cfg, unit.name)
    return {"model": unit.model.key, "task": extra["task"], "seed": unit.seed, "scores": scores,
            "seconds": time.perf_counter() - t0, "steps": int((result.metrics or {}).get("step", 0)), "model_dir": model_dir}


def delete_run(cfg: RunConfig, name: str) -> None:
    """Delete the Ray Train run ``name`` (its checkpoints) from the run's storage, local or s3://."""
    fs = storage.pyarrow_filesystem(cfg.storage_path)
    path = storage.join(cfg.storage_path, name)
    if fs is None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        fs.delete_dir_contents(storage.fs_path(path), missing_dir_ok=True)


# ---- probe ----------------------------------------------------------------------------------------------
def run_probe(cfg: RunConfig, models: list, data: dict[str, TaskData], tables: dict, *, out_dir: str) -> list[dict]:
    """One Ray task per (model, task): frozen features, then a linear model per seed; returns one result per unit."""
    import ray

    remote = ray.remote(num_cpus=1)(_probe_unit)
    refs = {(m.key, t): remote.remote(cfg.to_dict(), m, ray.put(tables[t]), data[t].spec) for m in models for t in data}
    out = []
    for (key, task), ref in refs.items():
        for result in ray.get(ref):
            storage.write_json(os.path.join(out_dir, f"probe-{key}-{task}-s{result['seed']}.json"), result)
            out.append(result)
    return out


def _probe_unit(cfg_dict: dict, model: Model, tables: dict, spec) -> list[dict]:
    """Mean-pooled last hidden states (over real tokens), standardised → LogisticRegression / Ridge, one fit per
    seed (scikit-learn's defaults: L2, C=1 / alpha=1)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(cfg_dict)
    encoder, _ = assets.load_for_downstream(assets.resolve_local(model.uri, cfg.cache_dir))
    encoder.eval()
    features = {split: _features(encoder, tables[split]) for split in ("train", "dev")}
    y = {split: tables[split]["labels"].to_numpy() for split in ("train", "dev")}
    out = []
    for seed in range(cfg.run.seed, cfg.run.seed + cfg.evaluate.seeds):
        head = Ridge(alpha=1.0, random_state=seed) if spec.regression else LogisticRegression(max_iter=2000, random_state=seed)
        clf = make_pipeline(StandardScaler(), head)  # features of a small encoder vary little: scale them first
        clf.fit(features["train"], y["train"])
        pred = clf.predict(features["dev"])
        out.append({"model": model.key, "task": spec.name, "seed": seed, "steps": 0,
                    "scores": metrics.scores(spec.metrics, pred, y["dev"]), "seconds": time.perf_counter() - t0})
    return out


def _features(encoder, table, batch: int = 64):
    import numpy as np
    import torch

    ids, mask = (table[k].combine_chunks().to_numpy_ndarray() for k in ("input_ids", "attention_mask"))
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            m = torch.as_tensor(mask[i:i + batch], dtype=torch.long)
            h = encoder(input_ids=torch.as_tensor(ids[i:i + batch], dtype=torch.long), attention_mask=m).last_hidden_state
            out.append(((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)).numpy())
    return np.concatenate(out)
