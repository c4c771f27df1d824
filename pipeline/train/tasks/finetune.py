"""Fine-tuning a sequence classifier: the downstream-evaluation task of the one training loop.

The model is Hugging Face's own head on the evaluated encoder (``BertForSequenceClassification`` or
``DistilBertForSequenceClassification``, a new classifier; ``num_labels=1`` and MSE for regression, as HF's
``run_glue``). The loss is the cross-entropy (or squared error) summed over the examples of a micro-batch and
divided by the global example count of the step (pipeline/losses.py's normalisation). Evaluation gathers one
prediction per dev example into fixed slots (3 × N_dev sums: prediction, label, seen), so the all-reduce of the
loop yields every prediction and the metrics are GLUE's (pipeline/glue_metrics.py), not an average of
per-batch values.

The task's settings come in ``WorkerConfig.extra``: ``model_uri``, ``task``, ``num_labels``, ``regression``,
``metrics``, ``num_dev``; ``keep`` and ``label_names`` to export the classifier (a task distillation teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import assets, families, flops
from pipeline.batches import digest
from pipeline.config import OptimSection
from pipeline import glue_metrics as metrics
from pipeline.train.tasks.base import Task, WorkerContext


@dataclass(frozen=True)
class ClassifyBatch:
    """A micro-batch of labelled examples: token ids, mask and segment ids B×T, labels B (ids, or floats), the
    examples' dev indices B."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    token_type_ids_BT: torch.Tensor
    labels_B: torch.Tensor
    index_B: torch.Tensor


class FinetuneTask(Task):
    """Fine-tune the encoder at ``extra.model_uri`` on one downstream task; held-out metrics are ``eval/<task>/*``."""

    role = "finetune"

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        extra = ctx.work.extra
        self.name, self.num_labels = extra["task"], int(extra["num_labels"])
        self.regression, self.metric_names = bool(extra["regression"]), tuple(extra["metrics"])
        self.num_dev = int(extra["num_dev"])
        self.num_eval_sums = 3 * self.num_dev
        self.columns = {"input_ids": torch.long, "attention_mask": torch.long, "token_type_ids": torch.long,
                        "labels": torch.float32 if self.regression else torch.long, "index": torch.long}
        self.takes_segments = False

    @property
    def optim(self) -> OptimSection:
        return self.ctx.cfg.optim

    def build(self) -> torch.nn.Module:
        torch.manual_seed(self.ctx.cfg.run.seed)  # the new head's initialisation is part of the seed's draw
        path = assets.resolve_local(self.ctx.work.extra["model_uri"], self.ctx.cfg.cache_dir)
        model, line = assets.load_for_downstream(path, num_labels=self.num_labels, regression=self.regression)
        if self.ctx.is_rank0:
            print(f"[distil] finetune {self.name}: {line}", flush=True)
        self.takes_segments = families.takes_segments(model)  # DistilBERT has none; GPT-2 would embed them as words
        return model

    def train_batch(self, raw, generator: torch.Generator) -> ClassifyBatch:
        return ClassifyBatch(input_ids_BT=raw["input_ids"], attention_mask_BT=raw["attention_mask"],
                             token_type_ids_BT=raw["token_type_ids"], labels_B=raw["labels"], index_B=raw["index"])

    def val_batch(self, raw, index: int) -> ClassifyBatch:
        return self.train_batch(raw, None)

    def count(self, batch: ClassifyBatch) -> torch.Tensor:
        return torch.ones_like(batch.labels_B, dtype=torch.float32).sum().reshape(1)  # [N_examples]

    def _logits(self, model, batch: ClassifyBatch) -> torch.Tensor:
        kwargs = {"token_type_ids": batch.token_type_ids_BT} if self.takes_segments else {}
        return model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, **kwargs).logits

    def loss(self, model, batch: ClassifyBatch, norms_K: torch.Tensor):
        logits = self._logits(model, batch).float()
        if self.regression:
            total = (logits.squeeze(-1) - batch.labels_B.float()).square().sum()
        else:
            total = F.cross_entropy(logits, batch.labels_B, reduction="sum")
        loss = total / norms_K[0]
        return loss, {"loss/finetune": loss.detach(), "loss/total": loss.detach()}

    def eval_sums(self, model, batch: ClassifyBatch) -> torch.Tensor:
        with torch.no_grad():
            logits = self._logits(model, batch).float()
        pred = logits.squeeze(-1) if self.regression else logits.argmax(-1).float()
        out = torch.zeros(self.num_eval_sums, device=logits.device)
        n = self.num_dev
        out[batch.index_B] = pred
        out[n + batch.index_B] = batch.labels_B.float()
        out[2 * n + batch.index_B] = 1.0
        return out

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        n = self.num_dev
        seen = [i for i in range(n) if sums[2 * n + i] > 0]
        if not seen:
            return {}
        preds = [sums[i] if self.regression else int(round(sums[i])) for i in seen]
        labels = [sums[n + i] if self.regression else int(round(sums[n + i])) for i in seen]
        scores = metrics.scores(self.metric_names, preds, labels)
        out = {f"eval/{self.name}/{k}": v for k, v in scores.items()}
        out[f"eval/{self.name}/num_dev"] = float(len(seen))
        return out

    def flops_per_token(self, model) -> float:
        shape = flops.shape_of(model.config)
        return 3 * flops.forward_flops_per_token(**shape, seq_len=self.ctx.cfg.data.max_seq_len, head_fraction=0.0)

    def digest(self, batch: ClassifyBatch) -> str:
        return digest(batch.input_ids_BT, batch.labels_B)

    def export(self, model, out_dir: str) -> str:
        """With ``extra.keep`` (a teacher for task distillation), the classifier as a Hugging Face folder with the
        task's label names; else nothing: the fine-tuned classifier's scores are the result."""
        if not self.ctx.work.extra.get("keep"):
            return out_dir
        return export_classifier(model, self.ctx.tokenizer, out_dir, self.ctx.work.extra.get("label_names") or [])


def export_classifier(model, tokenizer, out_dir: str, label_names: list[str]) -> str:
    """A classifier as a standard HF folder (pipeline/assets.py export_model) with ``id2label``/``label2id`` set to
    ``label_names`` (class id order; left as is for a one-output regression head)."""
    if label_names and model.config.num_labels == len(label_names):
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
    return assets.export_model(model, tokenizer, out_dir)
