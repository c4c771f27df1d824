"""The tasks of the one training loop: what differs between pre-training a teacher, distilling a student and
fine-tuning a classifier downstream.

- ``base.py``: the :class:`~pipeline.train.tasks.base.Task` interface and its
  :class:`~pipeline.train.tasks.base.WorkerContext`.
- ``mlm.py``: masked-LM pre-training of a fresh BERT teacher (Devlin et al. 2019), and the masking and held-out
  metrics it shares with distillation.
- ``distill.py``: DistilBERT's distillation (Sanh et al. 2019).
- ``finetune.py``: fine-tuning a sequence classifier, the evaluate stage's unit of work.
- ``task_distill.py``: a small classifier taught by a fine-tuned teacher classifier (DistilBERT's Table 2).

Adding a task is a new module here with a :class:`~pipeline.train.tasks.base.Task` subclass, one entry in
:data:`TASKS`, and its config section; the loop (pipeline/train/worker.py) does not change.
"""

from __future__ import annotations

from pipeline.train.tasks.base import Task, WorkerContext
from pipeline.train.tasks.distill import DistillTask
from pipeline.train.tasks.finetune import FinetuneTask
from pipeline.train.tasks.mlm import MLMTask
from pipeline.train.tasks.task_distill import TaskDistillTask

# Every task of the loop by name: ``WorkerConfig.task`` picks one.
TASKS: dict[str, type[Task]] = {"mlm": MLMTask, "distill": DistillTask, "finetune": FinetuneTask,
                               "task_distill": TaskDistillTask}


def build(name: str, ctx: WorkerContext) -> Task:
    """The task registered under ``name``; raises ValueError naming the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown training task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](ctx)
