"""Language-model tasks: pre-training a fresh teacher of the configured family (masked LM, or causal LM for GPT-2) (:class:`MLMTask`) and what it shares with distillation
(:class:`MaskedLMTask`: dynamic masking, masked-LM held-out metrics)."""

from __future__ import annotations

import abc
import dataclasses
import math

import torch

from pipeline import families, flops, models, step as step_lib, teachers
from pipeline.batches import labeler
from pipeline.config import OptimSection
from pipeline.masking import step_generator
from pipeline.train.tasks.base import RawBatch, Task, WorkerContext


class MaskedLMTask(Task):
    """What teacher pre-training and distillation share: dynamic masking and masked-LM held-out metrics."""

    num_eval_sums = 4  # [CE sum, correct, count, teacher agreement] (pipeline.step.eval_sums)

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        self.family = families.get(ctx.cfg.teacher.family)
        # Validation always masks as BERT does (uniform, token by token): comparable across runs and tasks. A causal
        # family's labels are the next tokens, drawn from nothing.
        uniform = dataclasses.replace(ctx.cfg.masking, smoothing=0.0, whole_word=False)
        self.val_masker = labeler(self.family.objective, uniform, ctx.tokenizer, device=ctx.device)
        self.masker = self._train_masker()

    @abc.abstractmethod
    def _train_masker(self):
        """The labeler of training batches (the task's masking recipe; :func:`pipeline.batches.labeler`)."""

    def train_batch(self, raw: RawBatch, generator: torch.Generator) -> step_lib.Batch:
        return _masked(self.masker, raw, generator)

    def val_batch(self, raw: RawBatch, index: int) -> step_lib.Batch:
        return _masked(self.val_masker, raw, step_generator(self.ctx.cfg.run.seed, 0, 10**9 + index, self.ctx.device))

    def eval_sums(self, model, batch: step_lib.Batch) -> torch.Tensor:
        return step_lib.eval_sums(model, self._teacher(), batch)

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        return masked_lm_metrics(sums, with_teacher=self._teacher() is not None, objective=self.family.objective)

    def _named(self, loss_and_metrics):
        """(loss, metrics) with the label term named by the objective: loss/mlm, or loss/clm for a causal family."""
        loss, metrics = loss_and_metrics
        if self.family.objective != "mlm" and "loss/mlm" in metrics:
            metrics = {("loss/" + self.family.objective if k == "loss/mlm" else k): v for k, v in metrics.items()}
        return loss, metrics

    def _teacher(self):
        return None


class MLMTask(MaskedLMTask):
    """Masked-LM pre-training of a fresh teacher (Devlin et al. 2019; Liu et al. 2019 for RoBERTa), uniform masking."""

    role = "teacher"

    def _train_masker(self):
        # HF's frequency smoothing is a distillation recipe: the teacher's own pre-training masks as BERT does.
        plain = dataclasses.replace(self.ctx.cfg.masking, smoothing=0.0)
        return labeler(self.family.objective, plain, self.ctx.tokenizer, device=self.ctx.device,
                       starts_word=self.family.starts_word)

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
        return self._named(step_lib.mlm_step(model, batch, norm_mlm=norms_K[0]))

    def flops_per_token(self, model) -> float:
        cfg = self.ctx.cfg
        share = cfg.masking.mask_prob if self.family.objective == "mlm" else 1.0  # a causal LM predicts every position
        return flops.step_flops_per_token(model.config, None, seq_len=cfg.data.max_seq_len, mask_prob=share)


def masked_lm_metrics(sums: list[float], *, with_teacher: bool, objective: str = "mlm") -> dict[str, float]:
    """val/mlm_loss (nats per masked token), val/mlm_acc, val/perplexity and val/teacher_agreement (the share
    of masked positions where student and teacher predict the same token), from the summed
    [CE sum, correct, count, agreement] of :func:`pipeline.step.eval_sums`; for a causal LM (``objective`` "clm")
    val/clm_loss and val/clm_acc over every next-token prediction instead. No labelled token: no value, never
    a perfect-looking 0.0 loss."""
    ce, correct, count, agree = sums
    if count == 0:
        return {}
    out = {f"val/{objective}_loss": ce / count, f"val/{objective}_acc": correct / count,
           "val/perplexity": math.exp(min(ce / count, 50.0))}
    if with_teacher:
        out["val/teacher_agreement"] = agree / count
    return out


def _masked(masker, raw: RawBatch, generator: torch.Generator) -> step_lib.Batch:
    ids_BT, labels_BT = masker(raw["input_ids"], raw["attention_mask"], generator)
    return step_lib.Batch(input_ids_BT=ids_BT, attention_mask_BT=raw["attention_mask"], labels_BT=labels_BT,
                          packed=bool(raw.get("packed", False)))
