"""The driver side of training: check, build and fit a Ray Train TorchTrainer for one run (the teacher's, the
student's or a sweep trial's), whose workers run pipeline/train/worker.py.

Resources are checked before anything starts: a run that can never be scheduled is a clear error here, not
a silent hang waiting for workers.
"""

from __future__ import annotations

import os

from pipeline import checkpoint, runtime, storage, tracking
from pipeline.corpus import data_context
from pipeline.config import OptimSection, RunConfig
from pipeline.records import Manifest, WorkerConfig


def check_fits(cfg: RunConfig, cluster_cpus: float, *, extra_cpus: float = 0.0, streamed: bool = False) -> None:
    """Raise ValueError when the run's workers (``extra_cpus`` beside them) cannot all be placed on the cluster."""
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + extra_cpus
    if streamed and need + 1 > cluster_cpus + 1e-9 and need <= cluster_cpus + 1e-9:
        raise ValueError(
            f"the corpus is larger than data.materialize_max_gib={cfg.data.materialize_max_gib:g}, so it streams from "
            f"parquet, and Ray Data's read tasks need a CPU beside the {need:g} the training workers take; the cluster "
            f"has {cluster_cpus:g}: lower scaling.cpus_per_worker, add a node, or raise data.materialize_max_gib"
        )
    if need > cluster_cpus + 1e-9:
        raise ValueError(
            f"the run needs {need:g} CPUs ({cfg.scaling.num_workers} workers × {cfg.scaling.cpus_per_worker:g}"
            f"{f' + {extra_cpus:g}' if extra_cpus else ''}) but the cluster has {cluster_cpus:g}: lower "
            "scaling.num_workers or scaling.cpus_per_worker, or raise run.ray_num_cpus for the local Ray"
        )


def check_batches(cfg: RunConfig, manifest: Manifest, optim: OptimSection) -> None:
    """Raise ValueError when the prepared corpus cannot fill one micro-batch per worker, or has no validation rows."""
    rows = manifest.rows("train")
    per_step = cfg.scaling.num_workers * optim.micro_batch_size
    if rows < per_step:
        raise ValueError(
            f"{rows} training sequences cannot fill one micro-batch of {optim.micro_batch_size} on each of "
            f"{cfg.scaling.num_workers} workers: lower the micro-batch size or the number of workers, or add data"
        )
    if manifest.rows("val") < 1:
        raise ValueError(
            f"the prepared validation split is empty (data.val_fraction={cfg.data.val_fraction} put no document in "
            "it), so no val/* metric could be measured: raise data.val_fraction or add documents"
        )


def worker_config(cfg: RunConfig, *, task: str, teacher_uri: str | None, run_id: str | None, replicated_data: bool,
                  manifest_path: str | None = None, extra: dict | None = None) -> WorkerConfig:
    """Everything a worker needs, as plain data: it rebuilds its RunConfig from it. ``task``: "mlm" | "distill" |
    "finetune"; ``extra``: the task's own settings. ValueError when frequency-smoothed distillation has no manifest."""
    if task == "distill" and cfg.masking.smoothing and not manifest_path:
        raise ValueError("masking.smoothing needs the prepared corpus's token counts: pass the manifest (run prepare first)")
    return WorkerConfig(cfg=cfg.to_dict(), task=task, teacher_uri=teacher_uri, run_id=run_id,
                        tracking_uri=tracking.tracking_uri(cfg.run.root) if run_id else None, git_sha=tracking.git_sha(),
                        replicated_data=replicated_data, manifest_path=manifest_path, extra=extra or {})


def fit(cfg: RunConfig, *, name: str, datasets: dict, work: WorkerConfig, callbacks=None):
    """Build the TorchTrainer and fit it; returns Ray Train's Result. Ray Data keeps the order of the rows (the
    same data order in every run with the same seed: a resumed run and every sweep trial see it too)."""
    with data_context.scoped(preserve_order=True, enable_progress_bars=False):
        return build_trainer(cfg, name=name, datasets=datasets, work=work, callbacks=callbacks).fit()


def build_trainer(cfg: RunConfig, *, name: str, datasets: dict, work: WorkerConfig, callbacks=None):
    """The TorchTrainer of one run (use :func:`fit`, which also sets Ray Data's options for it)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.worker import train_loop_per_worker  # deferred: the driver never imports the worker side (DeepSpeed)

    storage_path = cfg.storage_path
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=work.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        datasets=datasets,
        # An in-memory corpus is replicated and sliced per rank in the loop (deterministic order, exact resume);
        # a streamed one is split across ranks with equal shards.
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if work.replicated_data else ["train"]),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage.pyarrow_filesystem(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # A preempted node (drained by the cloud's reclaim notice) is counted apart from real failures.
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures,
                                                   max_preemption_failures=cfg.scaling.max_preemptions),
            callbacks=callbacks,
            # Each report and checkpoint is an INFO line on the console: only with --verbose (pipeline/runtime.py).
            logging_config=ray.train.LoggingConfig(log_level=runtime.train_log_level()),
        ),
    )


def checkpoint_uri(path: str, storage_path: str) -> str:
    """A URI for a Ray checkpoint path that other processes (and `ray job submit` drivers) can open: Ray reports
    paths on S3 without their scheme."""
    return f"s3://{path}" if storage.is_s3(storage_path) and not path.startswith("s3://") else path


def model_uri(ckpt_uri: str) -> str:
    """The exported Hugging Face model inside a final checkpoint."""
    return storage.join(ckpt_uri, checkpoint.HF_DIR) if storage.is_s3(ckpt_uri) else os.path.join(ckpt_uri, checkpoint.HF_DIR)
