"""The tasks of the one training loop: what differs between pre-training a teacher and distilling a student.

A task builds its models, turns a raw batch into a step :class:`~pipeline.step.Batch`, counts the supervised
units of a micro-batch, computes ``(loss, metrics)`` for one micro-batch, evaluates held-out batches and exports
the trained model. Pure math and model code: no Ray, no logging, no collectives (the loop in
pipeline/train/worker.py all-reduces the counts and the evaluation sums and owns the engine, the data position,
checkpoints, numerics, timing and reporting).

Adding a task is a new subclass of :class:`Task` registered in :func:`tasks`, plus its config section; the loop
does not change (pipeline/train/finetune.py, the downstream fine-tuning, is one).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass

import torch

from pipeline import flops, models, step as step_lib, storage
from pipeline.batches import Masker, digest
from pipeline.config import OptimSection, RunConfig
from pipeline.masking import step_generator
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
        return models.export_model(model, self.ctx.tokenizer, out_dir)


class _MaskedLM(Task):
    """What teacher pre-training and distillation share: dynamic masking and masked-LM held-out metrics."""

    num_eval_sums = 4  # [CE sum, correct, count, teacher agreement] (pipeline.step.eval_sums)

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        # Validation always masks as BERT does (uniform, token by token): comparable across runs and tasks.
        uniform = dataclasses.replace(ctx.cfg.masking, smoothing=0.0, whole_word=False)
        self.val_masker = Masker.build(uniform, ctx.tokenizer, device=ctx.device)
        self.masker = self._train_masker()

    @abc.abstractmethod
    def _train_masker(self) -> Masker:
        """The masker of training batches (the task's masking recipe)."""

    def train_batch(self, raw: RawBatch, generator: torch.Generator) -> step_lib.Batch:
        return _masked(self.masker, raw, generator)

    def val_batch(self, raw: RawBatch, index: int) -> step_lib.Batch:
        return _masked(self.val_masker, raw, step_generator(self.ctx.cfg.run.seed, 0, 10**9 + index, self.ctx.device))

    def eval_sums(self, model, batch: step_lib.Batch) -> torch.Tensor:
        return step_lib.eval_sums(model, self._teacher(), batch)

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        return masked_lm_metrics(sums, with_teacher=self._teacher() is not None)

    def _teacher(self):
        return None


class MLMTask(_MaskedLM):
    """Masked-LM pre-training of a fresh BERT teacher (Devlin et al. 2019), uniform masking."""

    role = "teacher"

    def _train_masker(self) -> Masker:
        # HF's frequency smoothing is a distillation recipe: the teacher's own pre-training masks as BERT does.
        plain = dataclasses.replace(self.ctx.cfg.masking, smoothing=0.0)
        return Masker.build(plain, self.ctx.tokenizer, device=self.ctx.device)

    @property
    def optim(self) -> OptimSection:
        return self.ctx.cfg.teacher_optim

    def build(self) -> torch.nn.Module:
        tok, cfg = self.ctx.tokenizer, self.ctx.cfg
        if cfg.teacher.init_from:  # continued pre-training of a pretrained encoder, every parameter trained
            model, line = models.teacher_from_encoder(cfg.teacher.init_from, cache_root=cfg.cache_dir, vocab_size=len(tok),
                                                      max_seq_len=cfg.data.max_seq_len, seed=cfg.run.seed)
            if self.ctx.is_rank0:
                print(f"[distil] teacher: {line}", flush=True)
            return model
        return models.build_teacher_for_pretraining(cfg.teacher, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                    seed=cfg.run.seed)

    def count(self, batch: step_lib.Batch) -> torch.Tensor:
        return step_lib.count_supervised(batch, self.ctx.cfg.loss.kd_positions)[1:]  # [N_mlm]

    def loss(self, model, batch, norms_K):
        return step_lib.mlm_step(model, batch, norm_mlm=norms_K[0])

    def flops_per_token(self, model) -> float:
        cfg = self.ctx.cfg
        return flops.step_flops_per_token(model.config, None, seq_len=cfg.data.max_seq_len, mask_prob=cfg.masking.mask_prob)


class DistillTask(_MaskedLM):
    """DistilBERT's distillation (Sanh et al. 2019): α_ce·L_ce + α_mlm·L_mlm + α_cos·L_cos (+ α_mse·L_mse)."""

    role = "student"

    def __init__(self, ctx: WorkerContext):
        self.teacher, self.real_vocab = None, 0
        super().__init__(ctx)

    def _train_masker(self) -> Masker:
        return Masker.build(self.ctx.cfg.masking, self.ctx.tokenizer, token_counts=self._token_counts(),
                            device=self.ctx.device)

    def _token_counts(self):
        """The training corpus's token counts (frequency-smoothed masking), from the prepare stage's manifest."""
        path = self.ctx.work.manifest_path
        if not self.ctx.cfg.masking.smoothing or not path:
            return None
        manifest = storage.read_json(path)
        return manifest.get("token_counts") if manifest else None

    @property
    def optim(self) -> OptimSection:
        return self.ctx.cfg.optim

    def build(self) -> torch.nn.Module:
        """The student, from a teacher padded to ``compute.pad_vocab_multiple`` rows (the student inherits the padded
        table); with ``compute.compile`` the teacher's encoder and head and the student are compiled in place
        (``nn.Module.compile``: their state_dict keys, checkpoints and exports do not change)."""
        cfg, vocab = self.ctx.cfg, len(self.ctx.tokenizer)
        self.teacher = models.load_teacher(self.ctx.work.teacher_uri, cache_root=cfg.cache_dir,
                                           dtype=cfg.teacher.dtype).to(self.ctx.device)
        if self.teacher.config.vocab_size < vocab:
            raise ValueError(f"teacher vocab ({self.teacher.config.vocab_size}) is smaller than the tokenizer's ({vocab})")
        self.real_vocab = models.pad_vocab(self.teacher, cfg.compute.pad_vocab_multiple)
        student = models.build_student(cfg.student, self.teacher, seed=cfg.run.seed)
        models.mask_padded_logits(student, self.real_vocab)  # a random-init student has no −inf bias to copy
        if cfg.compute.compile != "none":
            for module in (self.teacher.bert, self.teacher.cls, student):
                module.compile(mode=cfg.compute.compile)
        return student

    def export(self, model, out_dir: str) -> str:
        return models.export_model(models.unpadded(model, self.real_vocab), self.ctx.tokenizer, out_dir)

    def _teacher(self):
        return self.teacher

    def count(self, batch: step_lib.Batch) -> torch.Tensor:
        return step_lib.count_supervised(batch, self.ctx.cfg.loss.kd_positions)  # [N_ce, N_mlm]

    def loss(self, model, batch, norms_K):
        return step_lib.distill_step(model, self.teacher, batch, loss_cfg=self.ctx.cfg.loss, norm_ce=norms_K[0],
                                     norm_mlm=norms_K[1])

    def flops_per_token(self, model) -> float:
        cfg = self.ctx.cfg
        return flops.step_flops_per_token(model.config, self.teacher.config, seq_len=cfg.data.max_seq_len,
                                          mask_prob=cfg.masking.mask_prob)


def tasks() -> dict[str, type[Task]]:
    """Every task of the loop by name: ``WorkerConfig.task`` picks one. A new task is one more entry here."""
    from pipeline.train.finetune import FinetuneTask  # in its own module, which imports this one

    return {"mlm": MLMTask, "distill": DistillTask, "finetune": FinetuneTask}


def build(name: str, ctx: WorkerContext) -> Task:
    """The task registered under ``name``; raises ValueError naming the known ones."""
    known = tasks()
    if name not in known:
        raise ValueError(f"unknown training task {name!r}; known: {sorted(known)}")
    return known[name](ctx)


def masked_lm_metrics(sums: list[float], *, with_teacher: bool) -> dict[str, float]:
    """val/mlm_loss (nats per masked token), val/mlm_acc, val/perplexity and val/teacher_agreement (the share
    of masked positions where student and teacher predict the same token), from the summed
    [CE sum, correct, count, agreement] of :func:`pipeline.step.eval_sums`. No masked token: no value, never
    a perfect-looking 0.0 loss."""
    ce, correct, count, agree = sums
    if count == 0:
        return {}
    out = {"val/mlm_loss": ce / count, "val/mlm_acc": correct / count, "val/perplexity": math.exp(min(ce / count, 50.0))}
    if with_teacher:
        out["val/teacher_agreement"] = agree / count
    return out


def _masked(masker: Masker, raw: RawBatch, generator: torch.Generator) -> step_lib.Batch:
    ids_BT, labels_BT = masker(raw["input_ids"], raw["attention_mask"], generator)
    return step_lib.Batch(input_ids_BT=ids_BT, attention_mask_BT=raw["attention_mask"], labels_BT=labels_BT,
                          packed=bool(raw.get("packed", False)))
