"""Masked-LM tasks: pre-training a fresh teacher of the configured family (:class:`MLMTask`) and what it shares with distillation
(:class:`MaskedLMTask`: dynamic masking, masked-LM held-out metrics)."""

from __future__ import annotations

import abc
import dataclasses
import math

import torch

from pipeline import families, flops, models, step as step_lib, teachers
from pipeline.batches import Masker
from pipeline.config import OptimSection
from pipeline.masking import step_generator
from pipeline.train.tasks.base import RawBatch, Task, WorkerContext


class MaskedLMTask(Task):
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


class MLMTask(MaskedLMTask):
    """Masked-LM pre-training of a fresh teacher (Devlin et al. 2019; Liu et al. 2019 for RoBERTa), uniform masking."""

    role = "teacher"

    def _train_masker(self) -> Masker:
        # HF's frequency smoothing is a distillation recipe: the teacher's own pre-training masks as BERT does.
        plain = dataclasses.replace(self.ctx.cfg.masking, smoothing=0.0)
        return Masker.build(plain, self.ctx.tokenizer, device=self.ctx.device,
                            starts_word=families.get(self.ctx.cfg.teacher.family).starts_word)

    @property
    def optim(self) -> OptimSection:
        return self.ctx.cfg.teacher_optim

    def build(self) -> torch.nn.Module:
        tok, cfg = self.ctx.tokenizer, self.ctx.cfg
        if cfg.teacher.init_from:  # continued pre-training of a pretrained encoder, every parameter trained
            model, line = teachers.teacher_from_encoder(cfg.teacher.init_from, cache_root=cfg.cache_dir, vocab_size=len(tok),
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
