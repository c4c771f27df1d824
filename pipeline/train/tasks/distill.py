"""DistilBERT's distillation task (Sanh et al. 2019), for every masked-LM family: the student learns from a frozen teacher with the triple
loss of pipeline/step.py and pipeline/losses.py."""

from __future__ import annotations

import torch

from pipeline import assets, families, flops, models, step as step_lib, storage, teachers
from pipeline.batches import labeler
from pipeline.config import OptimSection
from pipeline.train.tasks.base import WorkerContext
from pipeline.train.tasks.mlm import MaskedLMTask


class DistillTask(MaskedLMTask):
    """DistilBERT's distillation (Sanh et al. 2019): α_ce·L_ce + α_mlm·L_mlm + α_cos·L_cos (+ α_mse·L_mse)."""

    role = "student"

    def __init__(self, ctx: WorkerContext):
        self.teacher, self.real_vocab = None, 0
        super().__init__(ctx)

    def _train_masker(self):
        return labeler(self.family.objective, self.ctx.cfg.masking, self.ctx.tokenizer, token_counts=self._token_counts(),
                       device=self.ctx.device, starts_word=self.family.starts_word)

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
        """The student, from a teacher cut to the tokenizer's rows (its own padded rows, as NVIDIA's 30,528 for
        30,522 tokens, would be logits for ids no text has) and then padded to ``compute.pad_vocab_multiple`` rows
        with −inf logits (the student inherits the padded table; export cuts it back); with ``compute.compile`` the
        teacher's encoder and head and the student are compiled in place (``nn.Module.compile``: their state_dict
        keys, checkpoints and exports do not change)."""
        cfg = self.ctx.cfg
        self.teacher = teachers.load_teacher(self.ctx.work.teacher_uri, cache_root=cfg.cache_dir, dtype=cfg.teacher.dtype,
                                             num_tokens=assets.tokenizer_rows(self.ctx.tokenizer)).to(self.ctx.device)
        self.real_vocab = models.pad_vocab(self.teacher, cfg.compute.pad_vocab_multiple)
        student = models.build_student(cfg.student, self.teacher, seed=cfg.run.seed)
        models.mask_padded_logits(student, self.real_vocab)  # a random-init student has no −inf bias to copy
        if cfg.compute.compile != "none":
            family = families.of(self.teacher)
            for module in (family.encoder(self.teacher), *family.head_modules(self.teacher), student):
                module.compile(mode=cfg.compute.compile)
        return student

    def _teacher(self):
        return self.teacher

    def count(self, batch: step_lib.Batch) -> torch.Tensor:
        return step_lib.count_supervised(batch, self.ctx.cfg.loss.kd_positions)  # [N_ce, N_mlm]

    def loss(self, model, batch, norms_K):
        return self._named(step_lib.distill_step(model, self.teacher, batch, loss_cfg=self.ctx.cfg.loss,
                                                 norm_ce=norms_K[0], norm_mlm=norms_K[1]))

    def flops_per_token(self, model) -> float:
        cfg = self.ctx.cfg
        return flops.step_flops_per_token(model.config, self.teacher.config, seq_len=cfg.data.max_seq_len,
                                          mask_prob=cfg.masking.mask_prob)
