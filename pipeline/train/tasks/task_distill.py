"""Task distillation: a small classifier learns one downstream task from a fine-tuned teacher classifier and from
the gold labels (Sanh et al. 2019 §4.2, "DistilBERT (D)" of Table 2; Hinton et al. 2015, eq. 2).

Shape legend: B examples, C classes (1 for regression), D hidden size.

    L = α_kd · L_kd + α_ce · L_ce (+ α_cos · L_cos)

    classification:  L_kd = T² · Σ_i KL(softmax(t_i / T) ‖ softmax(s_i / T)) / N_all
                     L_ce = Σ_i −log softmax(s_i)[y_i] / N_labelled
    regression:      L_kd = Σ_i (s_i − t_i)² / N_all,   L_ce = Σ_i (s_i − y_i)² / N_labelled
                     L_cos = Σ_i (1 − cos(h^s_i, h^t_i)) / N_all   (the first token's last hidden state; equal widths)

N_all counts every example of the step, N_labelled those with a gold label: the transfer set's texts (unlabelled
in-domain text the teacher labels, ``task_distill.transfer``) add to L_kd and L_cos only. Both are global counts
of the optimizer step, as in pipeline/losses.py. The teacher is frozen and stays on the task.

The task's settings come in ``WorkerConfig.extra`` as for the fine-tuning task, plus ``teacher_uri`` (a fine-tuned
classifier folder), ``temperature``, ``alpha_kd``, ``alpha_ce``, ``alpha_cos`` and ``label_names``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import assets, families
from pipeline.train.tasks.finetune import ClassifyBatch, FinetuneTask, export_classifier


def task_distill_terms(student_BC: torch.Tensor, teacher_BC: torch.Tensor, labels_B: torch.Tensor,
                       labelled_B: torch.Tensor, *, temperature: float, regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd_sum, ce_sum): L_kd and L_ce of the module docstring before normalisation, summed over the batch's
    examples (kd) and over its labelled examples (ce). ``labelled_B`` is bool; ``labels_B`` holds class ids (or
    floats for regression) where labelled, anything elsewhere. Logits are upcast to float32."""
    s, t = student_BC.float(), teacher_BC.detach().float()
    if regression:
        kd = (s.squeeze(-1) - t.squeeze(-1)).square().sum()
        ce = ((s.squeeze(-1) - labels_B.float()).square() * labelled_B).sum()
        return kd, ce
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * temperature**2
    safe = torch.where(labelled_B, labels_B, torch.zeros_like(labels_B)).long()
    ce = (F.cross_entropy(s, safe, reduction="none") * labelled_B).sum()
    return kd, ce


class TaskDistillTask(FinetuneTask):
    """The student classifier at ``extra.model_uri`` (a new head on its encoder, or a classifier) learns from the
    frozen teacher classifier at ``extra.teacher_uri``; held-out metrics ``eval/<task>/*`` as fine-tuning's."""

    role = "task-student"

    def __init__(self, ctx):
        super().__init__(ctx)
        extra = ctx.work.extra
        self.temperature = float(extra["temperature"])
        self.alphas = {"kd": float(extra["alpha_kd"]), "ce": float(extra["alpha_ce"]), "cos": float(extra["alpha_cos"])}
        self.columns = {**self.columns, "labelled": torch.bool}
        self.teacher, self.teacher_segments = None, False

    def build(self) -> torch.nn.Module:
        """The student classifier (a new head, seeded by ``run.seed``), with the teacher classifier loaded frozen on
        the worker's device. ValueError when ``alpha_cos`` is set and the widths differ."""
        cfg, extra = self.ctx.cfg, self.ctx.work.extra
        teacher, _ = assets.quiet_from_pretrained(_classifier_class(), assets.resolve_local(extra["teacher_uri"], cfg.cache_dir))
        self.teacher = teacher.eval().requires_grad_(False).to(self.ctx.device)
        self.teacher_segments = families.takes_segments(teacher)
        student = super().build()
        if self.alphas["cos"] and student.config.hidden_size != teacher.config.hidden_size:
            raise ValueError(f"task_distill.alpha_cos={self.alphas['cos']:g} compares hidden states, and the student's "
                             f"width {student.config.hidden_size} is not the teacher's {teacher.config.hidden_size}: "
                             "set task_distill.alpha_cos=0")
        return student

    def train_batch(self, raw, generator: torch.Generator) -> ClassifyBatch:
        """The raw rows as a classification micro-batch with ``labelled_B`` (bool B) from the ``labelled`` column."""
        batch = super().train_batch(raw, generator)
        return _Labelled(**vars(batch), labelled_B=raw["labelled"].bool())

    def val_batch(self, raw, index: int) -> ClassifyBatch:
        """A dev micro-batch: as :meth:`train_batch` (every dev row is labelled)."""
        return self.train_batch(raw, None)

    def count(self, batch) -> torch.Tensor:
        """float [2]: N_all (every example: the teacher's terms) and N_labelled (the cross-entropy's)."""
        labelled = batch.labelled_B.float()
        return torch.stack([torch.ones_like(labelled).sum(), labelled.sum()])  # [N_all, N_labelled]

    def loss(self, model, batch, norms_K):
        """``(loss, metrics)``: the module docstring's L with ``norms_K`` = (N_all, N_labelled) / (W·A); metrics
        ``loss/kd``, ``loss/ce`` (and ``loss/cos``) and ``loss/total``."""
        want_hidden = bool(self.alphas["cos"])
        kwargs = {"token_type_ids": batch.token_type_ids_BT} if self.takes_segments else {}
        out = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                    output_hidden_states=want_hidden, **kwargs)
        t_kwargs = {"token_type_ids": batch.token_type_ids_BT} if self.teacher_segments else {}
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                                 output_hidden_states=want_hidden, **t_kwargs)
        kd, ce = task_distill_terms(out.logits, t_out.logits, batch.labels_B, batch.labelled_B,
                                    temperature=self.temperature, regression=self.regression)
        terms = {"kd": kd / norms_K[0], "ce": ce / norms_K[1].clamp(min=1e-9)}
        if want_hidden:
            h_s, h_t = out.hidden_states[-1][:, 0].float(), t_out.hidden_states[-1][:, 0].float()
            terms["cos"] = (1 - F.cosine_similarity(h_s, h_t, dim=-1)).sum() / norms_K[0]
        total = sum(self.alphas[k] * v for k, v in terms.items())
        return total, {**{f"loss/{k}": v.detach() for k, v in terms.items()}, "loss/total": total.detach()}

    def export(self, model, out_dir: str) -> str:
        """The trained classifier as a Hugging Face folder whose ``id2label`` holds the task's label names, so that
        ``pipeline("text-classification")`` answers with them."""
        return export_classifier(model, self.ctx.tokenizer, out_dir, self.ctx.work.extra["label_names"])


@dataclass(frozen=True)
class _Labelled(ClassifyBatch):
    """A classification micro-batch whose examples may lack a gold label (the transfer set's): ``labelled_B`` bool."""

    labelled_B: torch.Tensor


def _classifier_class():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification
