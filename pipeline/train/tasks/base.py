"""The interface every task of the one training loop implements: :class:`Task` and where it runs,
:class:`WorkerContext`.

A task builds its models, turns a raw batch into a step :class:`~pipeline.step.Batch`, counts the supervised
units of a micro-batch, computes ``(loss, metrics)`` for one micro-batch, measures held-out batches and exports
the trained model. Pure math and model code: no Ray, no logging, no collectives (the loop in
pipeline/train/worker.py all-reduces the counts and the held-out sums and owns the engine, the data position,
checkpoints, numerics, timing and reporting).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from pipeline import assets, step as step_lib
from pipeline.batches import digest
from pipeline.config import OptimSection, RunConfig
from pipeline.records import WorkerConfig

# input_ids, attention_mask: B×T int64 on the worker's device; "packed" (a host bool, when the loop knows it): every
# attention-mask entry is 1
RawBatch = dict[str, torch.Tensor | bool]


@dataclass(frozen=True)
class WorkerContext:
    """Where a task runs: the config, this worker's rank and device, the tokenizer and the driver's settings."""

    cfg: RunConfig
    work: WorkerConfig
    rank: int
    world_size: int
    device: torch.device
    tokenizer: object  # a transformers tokenizer

    @property
    def is_rank0(self) -> bool:
        """Whether this worker is global rank 0."""
        return self.rank == 0


class Task(abc.ABC):
    """One kind of training for the loop. Subclasses set ``role`` (the progress label: "teacher" | "student")."""

    role: str = ""
    num_eval_sums: int = 0  # the length S of :meth:`eval_sums`
    columns: dict[str, torch.dtype] = {"input_ids": torch.long, "attention_mask": torch.long}  # read from the datasets

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    @property
    @abc.abstractmethod
    def optim(self) -> OptimSection:
        """The optimizer section this task trains with (steps, batch sizes, learning rate)."""

    @abc.abstractmethod
    def build(self) -> torch.nn.Module:
        """The trainable model, on the CPU (the engine places it); frozen models stay on the task."""

    @abc.abstractmethod
    def train_batch(self, raw: RawBatch, generator: torch.Generator) -> step_lib.Batch:
        """A training micro-batch from raw rows; ``generator`` is seeded by the loop from (seed, rank, step)."""

    @abc.abstractmethod
    def val_batch(self, raw: RawBatch, index: int) -> step_lib.Batch:
        """The ``index``-th held-out batch, the same in every run with the same seed."""

    @abc.abstractmethod
    def count(self, batch: step_lib.Batch) -> torch.Tensor:
        """Supervised units of a micro-batch, float [K]: the loop sums them over micro-batches and ranks."""

    @abc.abstractmethod
    def loss(self, model, batch: step_lib.Batch, norms_K: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of one micro-batch; ``norms_K`` = global counts / (W·A) (pipeline/losses.py)."""

    @abc.abstractmethod
    def eval_sums(self, model, batch: step_lib.Batch) -> torch.Tensor:
        """Additive held-out sums of one batch, float [S] on the batch's device; the loop all-reduces them."""

    @abc.abstractmethod
    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        """Held-out metrics from the summed :meth:`eval_sums` of every rank; {} when nothing was measured."""

    @abc.abstractmethod
    def flops_per_token(self, model) -> float:
        """Model FLOPs of one training step per token (pipeline/flops.py), for the MFU metric."""

    def digest(self, batch) -> str:
        """A short fingerprint of a prepared micro-batch: equal digests mean the same tokens and the same labels."""
        return digest(batch.input_ids_BT, batch.labels_BT)

    def export(self, model, out_dir: str) -> str:
        """The trained model as a standard Hugging Face folder, with the tokenizer it was trained with."""
        return assets.export_model(model, self.ctx.tokenizer, out_dir)
